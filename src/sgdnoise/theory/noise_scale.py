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
separately over steps and taking the ratio of the averages: :class:`NoiseScaleTracker`.

Plain floats (numpy-compatible arithmetic): no torch import, so this module is cheap to load.
"""

from __future__ import annotations

import math

__all__ = ["NoiseScaleTracker", "estimate"]


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


class NoiseScaleTracker:
    """Bias-corrected exponential moving averages of |G|² and tr(Σ), and B_simple.

    After n updates with estimates x_1..x_n, the average is
    m_n / (1 − βⁿ) with m_n = β m_{n−1} + (1 − β) x_n, m_0 = 0 (Adam-style bias correction:
    after one update it equals x_1). The two quantities are averaged separately and
    B_simple is the ratio of the averages (McCandlish et al.), not an average of ratios.
    Non-finite inputs (e.g. an overflowed norm) are skipped and counted in ``skipped`` so a
    single bad step cannot poison the averages.
    """

    def __init__(self, beta: float = 0.95) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.count = 0
        self.skipped = 0
        self._g_sq = 0.0
        self._tr_sigma = 0.0

    def update(self, small_sq: float, b_small: int, big_sq: float, b_big: int) -> None:
        """Fold in one step's squared norms (see :func:`estimate` for the arguments)."""
        g_sq, tr_sigma = estimate(small_sq, b_small, big_sq, b_big)
        g_sq, tr_sigma = float(g_sq), float(tr_sigma)
        if not (math.isfinite(g_sq) and math.isfinite(tr_sigma)):
            self.skipped += 1
            return
        self.count += 1
        self._g_sq = self.beta * self._g_sq + (1.0 - self.beta) * g_sq
        self._tr_sigma = self.beta * self._tr_sigma + (1.0 - self.beta) * tr_sigma

    def _correction(self) -> float:
        return 1.0 - self.beta**self.count

    @property
    def g_sq(self) -> float | None:
        """Bias-corrected average of the |G|² estimates (None before the first update)."""
        return self._g_sq / self._correction() if self.count else None

    @property
    def tr_sigma(self) -> float | None:
        """Bias-corrected average of the tr(Σ) estimates (None before the first update)."""
        return self._tr_sigma / self._correction() if self.count else None

    @property
    def b_simple(self) -> float | None:
        """tr(Σ) / |G|² from the averages; None before any update or while |G|² <= 0.

        It can be negative when the tr(Σ) average is (a sign the averages are still noise).
        """
        g_sq, tr_sigma = self.g_sq, self.tr_sigma
        if g_sq is None or tr_sigma is None or g_sq <= 0.0:
            return None
        return tr_sigma / g_sq
