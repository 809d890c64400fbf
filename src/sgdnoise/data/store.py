"""Prepared datasets held in memory, on the training device, as plain tensors.

Batches are then gathered by index on the device (no DataLoader, no per-sample Python).
Datasets too large for memory (the .npy layout, see imagefolder) keep their images on disk
behind `MemmapImages`, which the training loop indexes the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgdnoise.config import ConfigError, DataConfig
from sgdnoise.data.files import META, TENSORS
from sgdnoise.data.memmap import LAYOUT, MemmapImages, npy_problem
from sgdnoise.data.prepare import is_current, locked, prepare
from sgdnoise.data.sources import identity
from sgdnoise.paths import prepared_dir


@dataclass
class InMemoryData:
    # Inputs are a MemmapImages for the .npy layout: the labels are always in memory.
    train_x: torch.Tensor | MemmapImages
    train_y: torch.Tensor
    test_x: torch.Tensor | MemmapImages
    test_y: torch.Tensor
    meta: dict[str, Any]

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def augment(self) -> str | None:
        return self.meta.get("augment")

    @property
    def checksum(self) -> str:
        return str(self.meta["checksum"])


def load_prepared(path: Path, device: torch.device | str = "cpu") -> InMemoryData:
    """Load a prepared folder onto `device` as float32 inputs and int64 labels.

    The file is read once and its sha256 checked against meta.json before unpickling.
    Raw (uint8) images move to the device first and are normalised there: a quarter of
    the transfer, and the float copy is made by the accelerator. The .npy layout is opened
    as memory maps after a check of file sizes and shapes (see memmap.npy_problem).
    """
    path = Path(path)
    try:
        with locked(path.parent, shared=True):
            meta = json.loads((path / META).read_text())
            if meta.get("layout") == LAYOUT:
                # Opened under the lock: the maps keep these files even if a later prepare
                # replaces the folder.
                return _open_npy(path, meta, torch.device(device))
            blob = (path / TENSORS).read_bytes()
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(
            "data.name", f"no readable prepared data at {path} ({type(e).__name__})",
            "a folder written by `prepare` (run the prepare step first)",
        ) from None  # fmt: skip
    if hashlib.sha256(blob).hexdigest() != meta.get("checksum"):
        raise ConfigError(
            "data.name", f"{path / TENSORS} does not match the checksum in {META}",
            "an intact prepared folder (delete it and prepare again)",
        )  # fmt: skip
    t = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    device = torch.device(device)
    norm = meta.get("normalization")
    xs = [_inputs(t[k].to(device), norm) for k in ("train_x", "test_x")]
    ys = [t[k].to(device=device, dtype=torch.int64) for k in ("train_y", "test_y")]
    return InMemoryData(xs[0], ys[0], xs[1], ys[1], meta)


def _open_npy(path: Path, meta: dict[str, Any], device: torch.device) -> InMemoryData:
    problem = npy_problem(path, meta)
    if problem is not None:
        raise ConfigError(
            "data.name", problem, "an intact prepared folder (delete it and prepare again)"
        )
    norm = meta.get("normalization")
    xs = [MemmapImages(path / f"{k}.npy", norm, device) for k in ("train_x", "test_x")]
    ys = [
        torch.from_numpy(np.load(path / f"{k}.npy")).to(device=device, dtype=torch.int64)
        for k in ("train_y", "test_y")
    ]
    return InMemoryData(xs[0], ys[0], xs[1], ys[1], meta)


def _inputs(x: torch.Tensor, norm: dict[str, Any] | None) -> torch.Tensor:
    x = x.to(torch.float32)
    if not norm or norm.get("at") != "load":
        return x
    # Per-channel statistics broadcast over dim 1 (C of (N, C, H, W)).
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = torch.tensor(norm["mean"], dtype=torch.float32, device=x.device).view(shape)
    std = torch.tensor(norm["std"], dtype=torch.float32, device=x.device).view(shape)
    return (x / float(norm.get("scale", 1.0)) - mean) / std


def ensure_prepared(cfg: DataConfig, root: Path | None = None) -> Path:
    """The prepared folder for `cfg`, (re)preparing it when missing or stale: what a run
    calls. Without the folder or the files it is read from, says how to get the folder
    (`dvc pull`) rather than what the files should be (that is `prepare`'s message)."""
    from sgdnoise.data.raw import unavailable

    missing = unavailable(cfg, root)  # a stat: the common case pays no second checksum
    if missing is None:
        return prepare(cfg, root)
    folder = prepared_dir(cfg.name, root)
    if is_current(folder, cfg):
        return folder
    raise missing


@dataclass(frozen=True)
class DataFacts:
    """What the checks before any work need to know about a dataset."""

    n_train: int
    input_shape: tuple[int, ...]
    num_classes: int  # 0: no labels (reconstruction)

    @property
    def task(self) -> str:
        return "classification" if self.num_classes else "reconstruction"


def describe(cfg: DataConfig, root: Path | None = None) -> DataFacts:
    """Size, input shape and classes of `cfg`'s data, writing nothing: from the prepared
    folder's meta.json when it is current, else by reading (or generating) the source in
    memory, or listing an ImageFolder copy. Raises ConfigError when the source files are
    missing or (user data) do not hold what training needs."""
    from sgdnoise.data import imagefolder
    from sgdnoise.data.prepare import read_meta, read_source
    from sgdnoise.data.raw import unavailable

    folder = prepared_dir(cfg.name, root)
    if is_current(folder, cfg):
        meta = read_meta(folder)
        assert meta is not None
        return DataFacts(
            int(meta["n_train"]), tuple(meta["input_shape"]), int(meta["num_classes"] or 0)
        )
    # A worker (train, sweep) checks here before anything exists: no prepared folder and
    # no files to prepare it from is one line saying how to get the folder.
    missing = unavailable(cfg, root)
    if missing is not None:
        raise missing
    if cfg.name in imagefolder.FOLDERS:
        found = imagefolder.scan(cfg, root)
        size = cfg.image_size or imagefolder.DEFAULT_IMAGE_SIZE
        return DataFacts(len(found.train), (3, size, size), len(found.classes))
    source = read_source(cfg, root)
    return DataFacts(len(source.train_y), tuple(source.input_shape), source.num_classes)


def load(
    cfg: DataConfig, device: torch.device | str = "cpu", root: Path | None = None
) -> InMemoryData:
    """ensure_prepared + load_prepared: what a training run calls.

    The folder is per dataset name, so a concurrent run with other data settings (another
    num_samples, say) can replace it between the two steps; check what was read, retry once.
    """
    for _ in range(2):
        data = load_prepared(ensure_prepared(cfg, root), device)
        if data.meta.get("source") == identity(cfg):
            return data
    raise ConfigError(
        "data.name",
        f"data/prepared/{cfg.name} keeps being replaced by runs with other data settings",
        "one data setting per dataset and project root at a time",
    )
