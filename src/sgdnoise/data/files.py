"""The names and checksums of files: a prepared dataset's (data/prepared/<dataset>/), and the
user's own data and code, which a run's identity hashes (light: no torch, no numpy)."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

TENSORS, META = "tensors.pt", "meta.json"
# What `data.name: tensors` reads from `data.path`: one file of these kinds, or a folder
# holding one .npy file per array.
TENSOR_FILES = (".pt", ".npz")
ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256_file, computed once per (path, size, mtime) in a process: a config is
    resolved for every grid point of a study, and a user's data file may be large."""
    st = path.stat()
    return _cached(str(path), st.st_size, st.st_mtime_ns)


@cache
def _cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def data_path_sha256(path: Path) -> str:
    """SHA-256 of what `data.name: tensors` reads at `path`: the file, or the folder's
    `<array>.npy` files by name. Raises FileNotFoundError or ValueError (not a kind we read)."""
    if path.is_dir():
        found = [(n, path / f"{n}.npy") for n in ARRAYS if (path / f"{n}.npy").is_file()]
        if not found:
            raise ValueError(f"{path} holds none of {', '.join(n + '.npy' for n in ARRAYS)}")
        lines = "".join(f"{n}:{cached_sha256(p)}\n" for n, p in found)
        return hashlib.sha256(lines.encode()).hexdigest()
    if not path.exists():
        raise FileNotFoundError(path)
    if path.suffix not in TENSOR_FILES:
        raise ValueError(f"{path.name} is not a .pt or .npz file or a folder of .npy files")
    return cached_sha256(path)


def prepared_source_sha256(folder: Path) -> str | None:
    """The hash of the user's data that the prepared `folder` was written from, or None: a
    machine holding that folder (fetched with `dvc pull`) but not the user's file still
    identifies the data, and so its runs, exactly as the machine that prepared it."""
    try:
        meta = json.loads((folder / META).read_text())
        sha = meta["source"]["source_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sha if isinstance(sha, str) else None
