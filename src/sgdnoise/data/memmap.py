"""Prepared datasets too large for memory (ImageNet): uint8 .npy files read through np.memmap.

`MemmapImages` stands in for the float32 input tensor of `InMemoryData`: the training loop
indexes it with a LongTensor of example indices (`X[mb]`) or a slice (`x[i:j]`, evaluation)
and gets normalised float32 tensors on the training device, like indexing the in-memory
tensor. Only the requested rows are read from disk (through the page cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

# meta.json "layout" of a folder of .npy files (absent: the single tensors.pt).
LAYOUT = "npy"
# Each array of a prepared folder in this layout: <name>.npy.
ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def npy_problem(path: Path, meta: dict[str, Any]) -> str | None:
    """Why the .npy files of `path` do not match meta.json, or None when they do.

    A cheap check (existence, byte size, header shape and dtype): hashing a few hundred GB
    at every load is not affordable, so the full sha256 is computed once, by `prepare`.
    """
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != {f"{a}.npy" for a in ARRAYS}:
        return f"{path / 'meta.json'} lists no .npy files"
    for name, rec in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{file} is missing"
        if size != rec.get("bytes"):
            return f"{file} has {size} bytes, meta.json records {rec.get('bytes')}"
        try:
            array = np.load(file, mmap_mode="r")  # reads only the header
        except (OSError, ValueError) as e:
            return f"{file} is not a readable .npy file ({type(e).__name__})"
        if list(array.shape) != rec.get("shape") or str(array.dtype) != rec.get("dtype"):
            return f"{file} holds {array.dtype}{list(array.shape)}, not what meta.json records"
    return None


def npy_record(file: Path, sha256: str) -> dict[str, Any]:
    """What meta.json records of one .npy file: what `npy_problem` checks, and its sha256."""
    array = np.load(file, mmap_mode="r")
    return {
        "bytes": file.stat().st_size,
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "sha256": sha256,
    }


class MemmapImages:
    """(N, C, H, W) uint8 images on disk, indexed like a float32 tensor on `device`.

    `x[idx]` (a 1-D LongTensor, on any device) and `x[i:j]` return normalised float32
    tensors on `device`, computed exactly as `store` normalises an in-memory dataset.
    """

    def __init__(self, file: Path, norm: dict[str, Any] | None, device: torch.device | str = "cpu"):
        self._array = np.load(file, mmap_mode="r")
        if self._array.ndim != 4 or self._array.dtype != np.uint8:
            raise ValueError(f"{file} holds {self._array.dtype}{self._array.shape}, not uint8 NCHW")
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.shape = torch.Size(self._array.shape)
        self._affine = None
        if norm and norm.get("at") == "load":
            view = (1, -1, 1, 1)  # per channel, over dim 1
            mean = torch.tensor(norm["mean"], dtype=torch.float32, device=self.device).view(view)
            std = torch.tensor(norm["std"], dtype=torch.float32, device=self.device).view(view)
            self._affine = (float(norm.get("scale", 1.0)), mean, std)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"MemmapImages(shape={tuple(self.shape)}, device={self.device})"

    def __getitem__(self, key: slice | int | torch.Tensor) -> torch.Tensor:
        if isinstance(key, slice):
            # A copy out of the map: torch cannot own a read-only view of it.
            return self._normalise(self._to_device(np.array(self._array[key])))
        if isinstance(key, int):
            return self[key : key + 1 or None][0]
        if isinstance(key, torch.Tensor) and key.dim() == 1 and _is_index(key):
            return self._normalise(self._gather(key))
        raise TypeError(f"MemmapImages takes a slice, an int or a 1-D index tensor, not {key!r}")

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 rows `idx`, in that order, on the device."""
        host = idx.detach().to("cpu", torch.int64).numpy()
        # Rows in ascending file order: the page cache and the disk's read-ahead see a
        # forward scan instead of random jumps. Both fancy indexings copy whole rows
        # (numpy: a few ms for 256 ImageNet images; torch's CPU indexing was 10x slower).
        order = np.argsort(host, kind="stable")
        rows = self._array[host[order]]
        if not np.array_equal(order, np.arange(len(order))):
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            rows = rows[inverse]
        return self._to_device(rows)

    def _to_device(self, rows: np.ndarray) -> torch.Tensor:
        # uint8 moves to the device, a quarter of float32's bytes; the accelerator converts.
        return torch.from_numpy(np.ascontiguousarray(rows)).to(self.device)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # The same operations, in the same order, as store._inputs: bit-identical values.
        x = x.to(torch.float32)
        if self._affine is None:
            return x
        scale, mean, std = self._affine
        return (x / scale - mean) / std


def _is_index(t: torch.Tensor) -> bool:
    """Integer positions (not a boolean mask, not floats)."""
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
