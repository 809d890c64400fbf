"""The order in which examples are seen: a function of (dataset size, seed, B) only.

The training stream is the concatenation of one random permutation per epoch, each seeded
by (seed, epoch). Step s trains on stream positions [s·B, (s+1)·B): no example is dropped,
an epoch budget is exact for any B (even B larger than the dataset), and the global batch
of a step does not depend on the micro-batch size or the number of processes. Each process
takes its contiguous share of the global batch, then splits it into micro-batches.
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; independent streams for independent purposes."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchOrder:
    """Global batches of example indices, generated lazily one epoch at a time."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.device = torch.device(device)
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        perm = self._cache.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(derived_seed("order", self.seed, epoch))
            perm = torch.randperm(self.n, generator=g).to(self.device)
            # Batches only move forward, so older epochs can go.
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = perm
        return perm

    def global_batch(self, step: int) -> torch.Tensor:
        return self.batches(step, step + 1)

    def batches(self, first_step: int, stop_step: int) -> torch.Tensor:
        """The global batches of steps [first_step, stop_step), one after the other:
        (stop_step - first_step) · B indices."""
        start, stop = first_step * self.batch_size, stop_step * self.batch_size
        first, last = start // self.n, (stop - 1) // self.n
        if first == last:
            off = start - first * self.n
            return self._perm(first)[off : off + stop - start]
        parts = []
        for e in range(first, last + 1):
            lo = max(start, e * self.n) - e * self.n
            hi = min(stop, (e + 1) * self.n) - e * self.n
            parts.append(self._perm(e)[lo:hi])
        return torch.cat(parts)

    def epochs(self, steps: int) -> float:
        return steps * self.batch_size / self.n
