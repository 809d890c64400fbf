"""Write a dataset once to `<root>/data/prepared/<name>/`: tensors.pt + meta.json, or for
datasets too large for memory (imagenet, see imagefolder) uint8 .npy files + meta.json.

The folder appears atomically (built in a hidden sibling, then renamed into place), so a
reader never sees a half-written dataset, and an up-to-date folder is left untouched, so
DVC outputs and mtimes stay stable across repeated runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sgdnoise.config import DataConfig
from sgdnoise.data import imagefolder
from sgdnoise.data.files import META, TENSORS, sha256_file
from sgdnoise.data.memmap import LAYOUT, npy_problem
from sgdnoise.data.sources import Source, identity, load_source
from sgdnoise.paths import prepared_dir


def read_meta(path: Path) -> dict[str, Any] | None:
    """meta.json of a prepared folder, or None when absent or unreadable."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_current(path: Path, cfg: DataConfig) -> bool:
    """Whether `path` holds the data `cfg` asks for, intact.

    The cheap test (meta.source) runs first; the checksum then guards against a
    tensors.pt that was truncated or replaced after meta.json was written. The .npy layout
    is checked by size and shape only: its sha256 was computed once, when it was written.
    """
    meta = read_meta(path)
    if meta is None or meta.get("source") != identity(cfg):
        return False
    if meta.get("layout") == LAYOUT:
        return npy_problem(path, meta) is None
    tensors = path / TENSORS
    return tensors.is_file() and sha256_file(tensors) == meta.get("checksum")


def prepare(cfg: DataConfig, root: Path | None = None) -> Path:
    """Prepare `cfg.name` under the project root (or `root`) and return its folder.

    Raises ConfigError (from the source) when official files are missing; then nothing is
    created under data/prepared.
    """
    out = prepared_dir(cfg.name, root)
    if is_current(out, cfg):
        return out
    # Load before creating anything: a missing-files error must leave no trace behind.
    write = _writer(cfg, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(out.parent):
        # Another process (a sweep worker) may have finished it while we were loading.
        if is_current(out, cfg):
            return out
        tmp = _fresh_sibling(out, "tmp")
        try:
            write(tmp)
            _replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _writer(cfg: DataConfig, root: Path | None) -> Callable[[Path], None]:
    """What fills the new folder. Reads (or for an ImageFolder, lists) the source first, so
    missing files raise ConfigError before anything is created."""
    if cfg.name in imagefolder.FOLDERS:
        found = imagefolder.scan(cfg, root)
        return lambda folder: imagefolder.write(folder, found, cfg)
    source = read_source(cfg, root)
    return lambda folder: _write(folder, source, cfg)


def read_source(cfg: DataConfig, root: Path | None = None) -> Source:
    """The arrays of `cfg`, in memory: a built-in dataset's, or the user's (checked)."""
    from sgdnoise.data.tensors import is_user_data, load_user  # numpy/torch only when used

    return load_user(cfg, root) if is_user_data(cfg.name) else load_source(cfg, root)


def _write(folder: Path, source: Source, cfg: DataConfig) -> None:
    tensors = {
        "train_x": source.train_x.contiguous(),
        "train_y": source.train_y.to(torch.int64).contiguous(),
        "test_x": source.test_x.contiguous(),
        "test_y": source.test_y.to(torch.int64).contiguous(),
    }
    # Same tensors -> same bytes: the archive holds no timestamps, so the checksum is stable.
    torch.save(tensors, folder / TENSORS)
    meta = {
        "name": cfg.name,
        "input_shape": list(source.input_shape),
        "num_classes": source.num_classes,
        "n_train": int(source.train_x.shape[0]),
        "n_test": int(source.test_x.shape[0]),
        "augment": source.augment,
        "normalization": source.normalization,
        "checksum": sha256_file(folder / TENSORS),
        "source": identity(cfg),
    }
    if not source.num_classes:  # user data without labels: the model reconstructs its inputs
        meta["task"] = "reconstruction"
    (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _replace_dir(new: Path, out: Path) -> None:
    """Move `new` to `out`, replacing an existing folder (rename cannot overwrite one)."""
    old = None
    if out.exists():
        old = _fresh_sibling(out, "old")
        os.replace(out, old / out.name)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:  # put the previous version back rather than leave nothing
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fresh_sibling(out: Path, tag: str) -> Path:
    """A new hidden folder next to `out` (mkdir, unlike mkdtemp, honours the umask)."""
    path = out.parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


@contextlib.contextmanager
def locked(folder: Path, shared: bool = False) -> Iterator[None]:
    """A lock on `folder` itself (no lock file left behind): writers of prepared data take
    it exclusively while they write and swap; readers take it shared while they read, so
    they never pair one version's meta.json with another's tensors.pt."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking; the atomic rename still protects readers
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
