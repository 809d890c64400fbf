"""Where a sweep's Optuna study lives, and the study-wide lock.

- default: a journal file per study, `<project root>/optuna/<study>-<grid hash>.log`
  (JournalStorage + JournalFileBackend: safe for several processes on one machine;
  Optuna's RDB storage on SQLite is not, its writers contend for the database lock),
  liveness by per-worker file locks.
- `--storage PATH`: that journal file.
- `--storage postgresql://...`: one database for workers on many machines; liveness by
  Optuna's heartbeat (RDBStorage heartbeat_interval / grace_period).

Every change to which trials exist (creating the study, enqueueing, recovering a dead
worker's trial, adding edge points) and every claim happens under the study lock: an
exclusive flock on a file next to the journal, or a PostgreSQL advisory lock. That is
what makes "at most one live trial per grid point" hold with any number of workers;
Optuna's own enqueue (`skip_if_exists`) is not atomic across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sgdnoise.config import ConfigError
from sgdnoise.paths import store_root
from sgdnoise.sweep.liveness import FileLiveness, HeartbeatLiveness, Liveness
from sgdnoise.sweep.spec import Heartbeat
from sgdnoise.tracking import redact, redact_text

ALLOWED = "postgresql://user@host:port/db, a journal file path, or nothing (optuna/ at the root)"
WATCH_SECONDS = 0.01  # how often a waiting worker looks at a journal for news


def _quiet_optuna() -> None:
    import optuna

    # One line per created study/trial on stderr would drown the sweep's own progress.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class SweepStorage:
    """Base: one Optuna storage per process, created lazily (workers are forked)."""

    display: str

    def __init__(self) -> None:
        self._optuna: Any = None

    def optuna(self) -> Any:
        if self._optuna is None:
            _quiet_optuna()
            self._optuna = self._create()
        return self._optuna

    def _create(self) -> Any:
        raise NotImplementedError

    def exists(self, study_name: str) -> bool:
        raise NotImplementedError

    def lock(self, study_name: str) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def delete(self, study_name: str) -> None:
        """Forget the study's trials (its MLflow runs stay where they are)."""
        import optuna

        if self.exists(study_name):
            optuna.delete_study(study_name=study_name, storage=self.optuna())

    def liveness(self, study_name: str, worker_id: str) -> Liveness:
        raise NotImplementedError

    def release(self) -> None:
        """Drop this process's handles before forking workers (they open their own)."""
        self._optuna = None

    def version(self) -> Any:
        """A token that changes when any worker writes to the storage (None: unknown)."""
        return None

    def wait(self, token: Any, seconds: float) -> None:
        """Sleep up to `seconds`, less if the storage changes from `token` (`version()`
        taken before the state that said to wait was read)."""
        time.sleep(seconds)


class JournalSweepStorage(SweepStorage):
    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.display = str(path)

    def _create(self) -> Any:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(self.path)))

    def exists(self, study_name: str) -> bool:
        if not self.path.is_file():
            return False  # never create a journal just to look
        try:
            self.optuna().get_study_id_from_name(study_name)
        except KeyError:
            return False
        return True

    @contextlib.contextmanager
    def lock(self, study_name: str) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent / f".{study_name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the OS if this process dies
            yield
        finally:
            os.close(fd)

    def liveness(self, study_name: str, worker_id: str) -> Liveness:
        return FileLiveness(self.path.parent / f".{study_name}.workers", worker_id)

    def version(self) -> Any:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def wait(self, token: Any, seconds: float) -> None:
        # A waiting worker waits for another's result (an edge point, the last runs of a
        # study): a cheap look at the journal every few milliseconds lets it claim the work
        # that result frees at once, not up to a whole poll later (in the default study,
        # 2-2.5 s of a constant_steps sweep's 66-69 went to such a wait).
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(WATCH_SECONDS, left))
            if self.version() != token:
                return


class PostgresSweepStorage(SweepStorage):
    def __init__(self, url: str, heartbeat: Heartbeat):
        super().__init__()
        self.url = url
        self.heartbeat = heartbeat
        self.display = redact(url)
        self._lock_engine: Any = None
        self._stale: list[Any] = []
        self._known: set[str] = set()

    def _create(self) -> Any:
        from optuna.exceptions import ExperimentalWarning
        from optuna.storages import RDBStorage

        def create() -> Any:
            with warnings.catch_warnings():
                # heartbeat_interval is "experimental" since Optuna 2.9; it is the
                # documented liveness mechanism of database storages.
                warnings.simplefilter("ignore", category=ExperimentalWarning)
                return RDBStorage(
                    self.url,
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=self.heartbeat.interval,
                    grace_period=self.heartbeat.grace_period,
                    heartbeat_stale_trial_callback=lambda s, trial: self._stale.append(trial),
                )

        return self._racing(create)

    def _racing(self, make: Any) -> Any:
        """make(), an RDBStorage: it creates Optuna's tables and its version table where they
        are missing, and workers on several machines that start at once create them at once:
        one wins, the others fail (a duplicate key) and try again."""
        import sqlalchemy.exc

        for attempt in range(3):
            try:
                return make()
            except sqlalchemy.exc.OperationalError as e:
                raise ConfigError(
                    "--storage", f"cannot connect to {self.display} ({_first_line(e)})", ALLOWED
                ) from None
            except sqlalchemy.exc.SQLAlchemyError:
                if attempt == 2:
                    raise
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")

    def exists(self, study_name: str) -> bool:
        if study_name in self._known:
            return True  # studies are never deleted by a sweep; the progress bar asks often
        import sqlalchemy
        from optuna.exceptions import StorageInternalError
        from optuna.storages import RDBStorage

        _quiet_optuna()
        # Look before touching: RDBStorage would write its version table into a fresh
        # database, and `status` must never create anything.
        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        try:
            if not sqlalchemy.inspect(engine).has_table("studies"):
                return False
        except sqlalchemy.exc.OperationalError as e:
            raise ConfigError(
                "--storage", f"cannot connect to {self.display} ({_first_line(e)})", ALLOWED
            ) from None
        finally:
            engine.dispose()
        # The tables may be half made by a worker starting on another machine: its version
        # table too, which RDBStorage writes if it is missing.
        storage = self._racing(
            lambda: RDBStorage(self.url, skip_table_creation=True, skip_compatibility_check=True)
        )
        try:
            storage.get_study_id_from_name(study_name)
        except (KeyError, StorageInternalError):
            return False
        finally:
            storage.engine.dispose()
        self._known.add(study_name)
        return True

    @contextlib.contextmanager
    def lock(self, study_name: str) -> Iterator[None]:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._lock_engine is None:
            self._lock_engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        # A session-level advisory lock: the server drops it if this process dies.
        with self._lock_engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()

    def liveness(self, study_name: str, worker_id: str) -> Liveness:
        return HeartbeatLiveness(self, worker_id)

    def take_stale(self) -> list[Any]:
        out, self._stale = self._stale, []
        return out

    def release(self) -> None:
        if self._optuna is not None:
            self._optuna.engine.dispose()
        if self._lock_engine is not None:
            self._lock_engine.dispose()
            self._lock_engine = None
        super().release()


def _first_line(e: BaseException) -> str:
    """A driver's message, first line, credentials removed (it may quote the URL)."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return redact_text(text[0] if text else type(e).__name__)


def _postgres_driver() -> str:
    """SQLAlchemy's dialect+driver for a bare postgresql:// URL: SQLAlchemy 2.1 defaults to
    psycopg (3), but the project installs psycopg2-binary; use whichever is there."""
    import importlib.util

    for module, scheme in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return scheme
    raise ConfigError("--storage", "no PostgreSQL driver installed", "pip install psycopg2-binary")


def open_storage(
    url: str | None, root: Path, optuna_name: str, heartbeat: Heartbeat
) -> SweepStorage:
    """The study's storage from `--storage` (None: the local journal). Bad URL: ConfigError."""
    if url is None or not url.strip():
        return JournalSweepStorage(store_root(root) / "optuna" / f"{optuna_name}.log")
    url = url.strip()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
        if scheme in ("postgresql", "postgres"):
            url = f"{_postgres_driver()}://{url.split('://', 1)[1]}"
        return PostgresSweepStorage(url, heartbeat)
    if scheme.startswith("sqlite"):
        raise ConfigError(
            "--storage", "SQLite is unsafe for parallel Optuna workers", ALLOWED
        )  # fmt: skip
    if scheme:
        raise ConfigError("--storage", f"unsupported scheme {scheme!r} in {redact(url)}", ALLOWED)
    path = Path(url).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    if path.is_dir():
        path = path / f"{optuna_name}.log"
    return JournalSweepStorage(path)
