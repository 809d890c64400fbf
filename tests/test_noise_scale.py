"""Gradient noise scale (McCandlish et al. 2018, appendix A) on synthetic gradients."""

import math

import numpy as np
import pytest

from sgdnoise.theory.noise_scale import NoiseScaleTracker, estimate


def make_problem(dim: int, b_simple: float, seed: int):
    """A known mean gradient G (|G|² = 1) and a non-isotropic Σ = A Aᵀ with tr(Σ) = b_simple."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(dim)
    g /= np.linalg.norm(g)
    a = rng.standard_normal((dim, dim)) * np.linspace(0.2, 2.0, dim)  # unequal directions
    a *= math.sqrt(b_simple / np.sum(a * a))  # tr(A Aᵀ) = ‖A‖_F²
    return rng, g, a


def draw_steps(rng, g, a, n_steps: int, n_micro: int, b_small: int):
    """Per step: |G_small|² averaged over the micro-batches, and |G_big|² of their union.

    Per-example gradients are drawn from N(G, Σ) as G + A z, z ~ N(0, I).
    """
    dim = len(g)
    z = rng.standard_normal((n_steps, n_micro, b_small, dim))
    examples = g + z @ a.T
    micro = examples.mean(axis=2)  # (steps, micro, dim): micro-batch gradients
    full = micro.mean(axis=1)  # (steps, dim): the accumulated gradient of b_big examples
    small_sq = np.mean(np.sum(micro**2, axis=-1), axis=1)
    big_sq = np.sum(full**2, axis=-1)
    return small_sq, big_sq


def test_estimate_exact_on_expected_norms():
    # Feeding the exact expectations E|G_b|² = |G|² + tr(Σ)/b must return (|G|², tr(Σ)).
    for g_sq, tr, bs, bb in [(1.0, 32.0, 8, 64), (0.02, 5.0, 1, 2), (3.0, 0.0, 16, 4096)]:
        got = estimate(g_sq + tr / bs, bs, g_sq + tr / bb, bb)
        assert got == pytest.approx((g_sq, tr), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError):
        estimate(1.0, 64, 1.0, 8)  # b_small must be the smaller one


def test_estimate_is_unbiased():
    # One-step estimates are noisy (often negative |G|²) but unbiased: their mean over many
    # independent steps is within 4.5 standard errors of the truth (a correct estimator misses
    # that with probability ~1e-5; using e.g. 1/b in place of b in |G|² shifts the mean by
    # tens of SE). B_simple = 16 with b_small = 4, b_big = 16: a regime where single-step
    # estimates are far from the truth.
    rng, g, a = make_problem(dim=20, b_simple=16.0, seed=0)
    small_sq, big_sq = draw_steps(rng, g, a, n_steps=20_000, n_micro=4, b_small=4)
    g_est, tr_est = estimate(small_sq, 4, big_sq, 16)
    for est, truth in ((g_est, 1.0), (tr_est, 16.0)):
        se = est.std(ddof=1) / math.sqrt(len(est))
        assert abs(est.mean() - truth) <= 4.5 * se, (est.mean(), truth, se)
    assert np.mean(g_est < 0) > 0.05  # single steps really are noisy


def test_tracker_recovers_b_simple():
    # Known B_simple = tr(Σ)/|G|² = 32, b_small = 8 (8 micro-batches), b_big = 64.
    # Tolerance: the tracker's averages after n ≫ 1/(1−β) steps are weighted means of
    # independent per-step estimates; their standard deviation is the per-step one times
    # sqrt(Σ w²) with the bias-corrected EMA weights w (≈ sqrt((1−β)/(1+β)) = 0.07 for
    # β = 0.99). Propagating both through the ratio (delta method, with the sample
    # covariance of the per-step estimates) gives σ_ratio; we allow 5 σ_ratio (≈ 13% here,
    # about half the typical 25% error of a single step's ratio).
    beta, n_steps = 0.99, 3000
    rng, g, a = make_problem(dim=40, b_simple=32.0, seed=1)
    small_sq, big_sq = draw_steps(rng, g, a, n_steps=n_steps, n_micro=8, b_small=8)
    tracker = NoiseScaleTracker(beta=beta)
    for s, b in zip(small_sq.tolist(), big_sq.tolist(), strict=True):
        tracker.update(s, 8, b, 64)
    g_est, tr_est = estimate(small_sq, 8, big_sq, 64)
    w = (1 - beta) * beta ** np.arange(n_steps)[::-1] / (1 - beta**n_steps)
    cov = np.cov(np.stack([g_est, tr_est])) * np.sum(w**2)
    grad = np.array([-32.0 / 1.0**2, 1.0 / 1.0])  # ∂(tr/g)/∂(g, tr) at the truth
    sigma_ratio = math.sqrt(grad @ cov @ grad)
    assert tracker.count == n_steps
    assert tracker.b_simple == pytest.approx(32.0, abs=5 * sigma_ratio)
    assert 5 * sigma_ratio < 0.2 * 32.0  # the check is informative, not vacuous
    # The tracker is the bias-corrected EMA of the per-step estimates, exactly.
    assert tracker.g_sq == pytest.approx(float(w @ g_est), rel=1e-9)
    assert tracker.tr_sigma == pytest.approx(float(w @ tr_est), rel=1e-9)


def test_tracker_ratio_of_averages_and_edge_cases():
    def norms(g_sq: float, tr: float, bs: int = 4, bb: int = 32):
        return g_sq + tr / bs, bs, g_sq + tr / bb, bb

    t = NoiseScaleTracker(beta=0.5)
    assert t.b_simple is None and t.g_sq is None and t.tr_sigma is None
    t.update(*norms(1.0, 10.0))
    # Bias correction: after one update the averages are that step's estimates.
    assert t.g_sq == pytest.approx(1.0) and t.tr_sigma == pytest.approx(10.0)
    assert t.b_simple == pytest.approx(10.0)
    t.update(*norms(3.0, 10.0))
    # EMA weights after two updates with β = 0.5: (0.25, 0.5) / 0.75 = (1/3, 2/3).
    g_avg, tr_avg = 1 / 3 * 1.0 + 2 / 3 * 3.0, 10.0
    assert t.g_sq == pytest.approx(g_avg) and t.tr_sigma == pytest.approx(tr_avg)
    assert t.b_simple == pytest.approx(tr_avg / g_avg)  # 4.29: ratio of averages ...
    assert t.b_simple != pytest.approx(1 / 3 * 10.0 + 2 / 3 * 10.0 / 3.0)  # ... not 5.56
    t.update(float("nan"), 4, 1.0, 32)  # a bad step is skipped, not averaged in
    assert t.skipped == 1 and t.count == 2 and t.b_simple == pytest.approx(tr_avg / g_avg)
    neg = NoiseScaleTracker()
    neg.update(*norms(-0.5, 10.0))  # |G|² estimate ≤ 0: B_simple undefined
    assert neg.b_simple is None and neg.tr_sigma == pytest.approx(10.0)
    with pytest.raises(ValueError):
        NoiseScaleTracker(beta=1.0)
