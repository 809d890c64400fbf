"""Keep freed memory in the process for the next step, instead of handing it back.

A training step frees and allocates the same parameter-sized tensors (gradients, activations)
every step. glibc serves allocations above its mmap threshold with fresh mappings and returns
freed heap tops to the kernel, so each step pays a page fault per 4 KiB touched: about a
third of a small packed model's step on CPU (benchmarks/study_efficiency.py). Raising both
thresholds makes glibc reuse the freed blocks; a process then holds its peak memory until it
exits, which a training process does anyway.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory() -> None:
    """Once per process; a no-op where the C library is not glibc."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31)
    except (OSError, AttributeError):  # another C library (musl): leave it as it is
        pass
