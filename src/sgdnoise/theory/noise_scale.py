"""The gradient noise scale B_simple of McCandlish et al. (2018, appendix A).

With G the full-batch gradient and Σ the per-example gradient covariance, the mean of b
independent per-example gradients, G_b, satisfies

    E|G_b|² = |G|² + tr(Σ) / b.

Measuring |G_b|² at two batch sizes b_small < b_big and solving the two equations gives the
unbiased estimators

    |G|²   ≈ (b_big |G_big|² − b_small |G_small|²) / (b_big − b_small)
    tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1/b_small − 1/b_big)

and B_simple = tr(Σ) / |G|². In data-parallel or gradient-accumulation training both come
for free: |G_small|² is the squared norm of a micro-batch gradient (average it over the
step's micro-batches to reduce variance: each is an unbiased estimate of E|G_small|²) and
|G_big|² that of the accumulated gradient of the whole step (b_big = the step's batch).

A single step's estimates are very noisy (either can be negative), and the ratio of two
noisy quantities is biased, so McCandlish et al. recommend averaging |G|² and tr(Σ)
separately over steps and taking the ratio of the averages: :class:`NoiseWindow` sums the
squared norms over the steps between two evaluations of a run (or of every member of a
pack at once), on the device, and `estimate` turns the averages into B_simple.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the window works on torch tensors; the estimate on plain numbers
    import torch

__all__ = ["NoiseWindow", "estimate"]


def estimate(small_sq: float, b_small: int, big_sq: float, b_big: int) -> tuple[float, float]:
    """Unbiased one-step estimates (|G|², tr(Σ)) from squared gradient norms at two batch sizes.

    Args:
        small_sq: |G_small|², the squared norm of a gradient averaged over b_small examples
            (or the mean of several such squared norms).
        b_small: the small batch size.
        big_sq: |G_big|², the squared norm of a gradient averaged over b_big examples.
        b_big: the big batch size, > b_small.

    Returns:
        (|G|² estimate, tr(Σ) estimate); unbiased when E[small_sq] = |G|² + tr(Σ)/b_small and
        E[big_sq] = |G|² + tr(Σ)/b_big. Arrays of norms broadcast elementwise.
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    tr_sigma = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, tr_sigma


class NoiseWindow:
    """B_simple of each of K members, from the gradients accumulation computes anyway.

    Micro-batch j's gradient is `micro_batches` times the change of the accumulated .grad;
    the full-batch gradient is .grad before the update. Squared norms are summed per member
    on the device over the steps since the last `estimates()` (no host sync per step).
    Gradients carry a leading member axis (a single run's are viewed with one). Under DDP
    the last micro-batch's gradient is already averaged over processes, so only the others
    count as small batches.
    """

    def __init__(self, members: int, micro_batches: int, micro: int, batch: int,
                 processes: int = 1, device: torch.device | str = "cpu"):  # fmt: skip
        import torch

        self.k, self.micro, self.batch, self.processes = micro_batches, micro, batch, processes
        self.prev: list[torch.Tensor] | None = None  # the accumulated gradients so far
        # Per member: summed |G_micro|², summed |G_batch|², micro-batches counted.
        self.sums = torch.zeros(members, 3, dtype=torch.float64, device=device)
        self.steps = 0

    @staticmethod
    def _sq(tensors: list[torch.Tensor]) -> torch.Tensor:
        return sum(t.double().pow(2).flatten(1).sum(1) for t in tensors)  # type: ignore[return-value]

    def after_micro_batch(self, grads: list[torch.Tensor], j: int) -> None:
        import torch

        if self.processes > 1 and j == self.k - 1:
            return
        if self.prev is None:
            self.prev = [torch.zeros_like(g) for g in grads]
        self.sums[:, 0] += self._sq(torch._foreach_sub(grads, self.prev)) * self.k**2
        self.sums[:, 2] += 1
        torch._foreach_copy_(self.prev, grads)

    def after_step(self, grads: list[torch.Tensor]) -> None:
        import torch

        self.sums[:, 1] += self._sq(grads)
        if self.prev is not None:
            torch._foreach_zero_(self.prev)
        self.steps += 1

    def add_step(self, small_sq: torch.Tensor, micro_batches: int, big_sq: torch.Tensor) -> None:
        """A whole step's sums at once, from a kernel that summed its micro-batches itself
        (one process): per member, the squared norms of the micro-batches' gradients added
        up, and that of their mean; what after_micro_batch and after_step add."""
        self.sums[:, 0] += small_sq.to(self.sums)
        self.sums[:, 1] += big_sq.to(self.sums)
        self.sums[:, 2] += micro_batches
        self.steps += 1

    def estimates(self) -> list[float | None]:
        """B_simple per member over the window since the last call (None without data or
        while |G|² <= 0); starts a new window."""
        if self.steps == 0:
            return [None] * self.sums.shape[0]
        out: list[float | None] = []
        for small, big, n in self.sums.tolist():
            g_sq, tr_sigma = estimate(small / max(n, 1.0), self.micro, big / self.steps,
                                      self.batch)  # fmt: skip
            out.append(tr_sigma / g_sq if g_sq > 0 and math.isfinite(tr_sigma) else None)
        self.sums.zero_()
        self.steps = 0
        return out

    def state(self, k: int) -> dict[str, Any]:
        """Member k's open window, for its checkpoint."""
        return {"sums": self.sums[k].cpu(), "steps": self.steps}

    def load(self, states: list[dict[str, Any]]) -> None:
        """The members' windows from their checkpoints (all at one step)."""
        import torch

        if all(s.get("sums") is not None for s in states):
            self.sums.copy_(torch.stack([s["sums"] for s in states]))
            self.steps = int(states[0]["steps"])

    def select(self, keep: list[int]) -> None:
        import torch

        index = torch.tensor(keep, device=self.sums.device)
        if self.prev is not None:
            self.prev = [p.index_select(0, index) for p in self.prev]
        self.sums = self.sums.index_select(0, index)
