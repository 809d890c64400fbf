"""Checkpoints of one run: atomic, pruned, verified, loaded without unpickling code.

A run holds no global random state: its data order, augmentation and initialisation are
derived from (seed, epoch/step), so a checkpoint is the model and optimizer state, the step
reached and the metrics so far: tensors and plain values only, loaded with
`weights_only=True` (Accelerate's save_state would also pickle RNG states, which must be
unpickled with weights_only=False). Checkpoints live under
<project root>/checkpoints/[<parent run id>-]<run key>/step-<n>.pt and are written only at
optimizer-step boundaries, to a temporary file that is fsynced and then renamed, so a kill
at any moment leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sgdnoise.config import Config
from sgdnoise.paths import store_root

KEEP = 2  # the newest and one fallback, in case the newest is damaged
_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full); the previous one is intact."""


class Checkpointer:
    def __init__(self, cfg: Config, root: Path, scope: str | None = None):
        """`scope` (a sweep's parent run id) keeps the same config in two studies apart."""
        every = cfg.train.checkpoint_every
        self.unit, self.value = every.unit, every.value
        base = store_root(root) / "checkpoints"  # not in a DVC experiment's deleted copy
        self.dir = base / (f"{scope}-{cfg.run_key}" if scope else cfg.run_key)
        self._last_time = time.monotonic()
        self._last_step = 0

    @property
    def enabled(self) -> bool:
        return self.unit != "off"

    def due(self, step: int) -> bool:
        if self.unit == "steps":
            return step - self._last_step >= self.value
        if self.unit == "minutes":
            return time.monotonic() - self._last_time >= 60 * self.value
        return False

    def next_due(self) -> int | None:
        """The step at which a checkpoint by steps falls due (None: by time, or off)."""
        return self._last_step + int(self.value) if self.unit == "steps" else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        blob = buf.getvalue()
        digest = hashlib.sha256(blob).hexdigest()
        final = self.dir / f"step-{step}.pt"
        tmp = self.dir / f".step-{step}.pt.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(digest.encode() + b"\n" + blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"could not write checkpoint {final}: {e.strerror or e}") from e
        self._last_step, self._last_time = step, time.monotonic()
        self._prune()
        return final

    def _steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name)))

    def _prune(self) -> None:
        for step in self._steps()[:-KEEP]:
            (self.dir / f"step-{step}.pt").unlink(missing_ok=True)

    def load_latest(self) -> dict[str, Any] | None:
        """The newest intact checkpoint; a damaged one is reported and skipped."""
        for step in reversed(self._steps()):
            path = self.dir / f"step-{step}.pt"
            try:
                state = _read(path)
            except (OSError, ValueError, RuntimeError, EOFError) as e:
                print(f"warning: checkpoint {path} is damaged ({e}); trying an older one",
                      file=sys.stderr)  # fmt: skip
                continue
            self._last_step = step
            return state
        return None

    def clear(self) -> None:
        """Remove this run's checkpoints once it has finished."""
        for step in self._steps():
            (self.dir / f"step-{step}.pt").unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass


def _read(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    digest, _, blob = raw.partition(b"\n")
    if hashlib.sha256(blob).hexdigest().encode() != digest:
        raise ValueError("checksum mismatch (truncated or corrupted)")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
