"""Is the worker that holds a RUNNING trial still alive?

Optuna's journal storage has no heartbeat: a worker killed with -9 leaves its trial
RUNNING forever. Two mechanisms, one interface:

- FileLiveness (local journal): each worker holds an exclusive `flock` on its own file
  `<journal dir>/.<study>.workers/<worker id>` for its whole life and writes into it the
  id of the trial it claims. The kernel releases a flock when the process dies, however
  it dies, so "the lock can be taken" means "the worker is dead", exactly, with no
  timeout to tune. A RUNNING trial is alive iff a live worker's file names it. Claims and
  checks both run under the study lock, so a worker is never seen between claiming a
  trial and naming it.
- HeartbeatLiveness (PostgreSQL): Optuna's heartbeat. Each worker records a heartbeat for
  its trial every `interval` seconds; a RUNNING trial silent for `grace_period` seconds
  is failed by `optuna.storages.fail_stale_trials`. The first heartbeat is recorded just
  before the claim, so there is no window in which a claimed trial has none (Optuna
  ignores trials without a heartbeat row).

`reap` (called under the study lock) FAILs the trials of dead workers and returns them;
the worker then re-enqueues their grid points.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

# A worker's file names the trials it holds, one id per line (a pack holds up to a few
# dozen); read in one go.
READ_BYTES = 4096


def _ids(text: str) -> list[int]:
    return [int(w) for w in text.split() if w.isdigit()]


class Liveness:
    def start(self) -> None:
        """Register this worker (before its first claim)."""

    def before_claim(self, trial_id: int, *, add: bool = False) -> None:
        """Called under the study lock just before trying to claim `trial_id`; `add` keeps
        the trials claimed before it (a pack) as this worker's too."""

    def running(self, trial_ids: list[int]) -> contextlib.AbstractContextManager[None]:
        """Held while the trials train."""
        return contextlib.nullcontext()

    def reap(self, trials: Any, running: list[FrozenTrial]) -> list[FrozenTrial]:
        """Fail the RUNNING trials whose worker is dead; return them. Under the study lock."""
        return []

    def stop(self) -> None:
        """Unregister (normal exit)."""


class FileLiveness(Liveness):
    def __init__(self, folder: Path, worker_id: str):
        self.folder, self.worker_id = folder, worker_id
        self.fd: int | None = None
        self.claimed: list[int] = []

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / self.worker_id, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: never contended
        self.fd = fd

    def before_claim(self, trial_id: int, *, add: bool = False) -> None:
        assert self.fd is not None, "start() first"
        self.claimed = [*self.claimed, trial_id] if add else [trial_id]
        data = "".join(f"{t}\n" for t in self.claimed).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def live_claims(self) -> dict[int, str]:
        """trial id -> worker id for every live worker; removes dead workers' files."""
        claims: dict[int, str] = {}
        for path in sorted(self.folder.glob("*")):
            if path.name == self.worker_id:
                text = os.pread(self.fd, READ_BYTES, 0).decode() if self.fd is not None else ""
                claims.update(dict.fromkeys(_ids(text), self.worker_id))
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # reaped by someone else just now
            try:
                text = os.pread(fd, READ_BYTES, 0).decode()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    claims.update(dict.fromkeys(_ids(text), path.name))  # held: it lives
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # we hold its lock: the worker is gone
            finally:
                os.close(fd)
        return claims

    def reap(self, trials: Any, running: list[FrozenTrial]) -> list[FrozenTrial]:
        if not running:
            return []
        claims = self.live_claims()
        dead = [t for t in running if trials.id(t) not in claims]
        for t in dead:
            # Under the study lock nobody else reaps; the state was read under it too.
            trials.fail(t)
        return dead

    def stop(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            (self.folder / self.worker_id).unlink()
        os.close(self.fd)
        self.fd = None


class HeartbeatLiveness(Liveness):
    def __init__(self, store: Any, worker_id: str):
        """`store`: the PostgreSQL SweepStorage (sweep.storage), whose Optuna storage holds
        the heartbeats and whose stale-trial callback collects what `reap` fails."""
        self.store, self.worker_id = store, worker_id

    def before_claim(self, trial_id: int, *, add: bool = False) -> None:
        self.store.optuna().record_heartbeat(trial_id)

    @contextlib.contextmanager
    def running(self, trial_ids: list[int]) -> Iterator[None]:
        storage = self.store.optuna()
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.store.heartbeat.interval):
                for trial_id in trial_ids:  # a finished member's beat is harmless
                    try:
                        storage.record_heartbeat(trial_id)
                    except Exception:  # a blip; the next beat retries, grace covers it
                        pass

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial_ids[0]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def reap(self, trials: Any, running: list[FrozenTrial]) -> list[FrozenTrial]:
        from optuna.storages import fail_stale_trials

        if not running:
            return []
        self.store.take_stale()
        fail_stale_trials(trials.study)  # FAILs stale trials; our callback collects them
        return self.store.take_stale()
