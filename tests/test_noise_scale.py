"""Gradient noise scale (McCandlish et al. 2018, appendix A) on synthetic gradients."""

import math

import numpy as np
import pytest
import torch

from sgdnoise.theory.noise_scale import NoiseWindow, estimate


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


def _feed(window: NoiseWindow, micro: np.ndarray) -> None:
    """One step of gradient accumulation as the run loop shows it to the window: after each
    micro-batch the accumulated gradient (sum of micro-batch gradients / their number), then
    the full one. micro: (members, micro-batches, dim)."""
    k = micro.shape[1]
    acc = torch.zeros(micro.shape[0], micro.shape[2], dtype=torch.float64)
    for j in range(k):
        acc = acc + torch.from_numpy(micro[:, j]) / k
        window.after_micro_batch([acc.clone()], j)
    window.after_step([acc])


def test_window_recovers_b_simple_as_a_ratio_of_averages():
    # Known B_simple = tr(Σ)/|G|² = 32, b_small = 8 (8 micro-batches), b_big = 64. Over a
    # window of n steps the estimate is the ratio of the averaged |G|² and tr(Σ) estimates;
    # its standard deviation (delta method, the per-step estimates' sample covariance / n)
    # is σ_ratio, and we allow 5 σ_ratio.
    n_steps = 3000
    rng, g, a = make_problem(dim=40, b_simple=32.0, seed=1)
    z = rng.standard_normal((n_steps, 8, 8, len(g)))
    micro = (g + z @ a.T).mean(axis=2)  # (steps, micro-batches, dim)
    window = NoiseWindow(members=1, micro_batches=8, micro=8, batch=64)
    for step in micro:
        _feed(window, step[None])
    small_sq = np.mean(np.sum(micro**2, axis=-1), axis=1)
    big_sq = np.sum(micro.mean(axis=1) ** 2, axis=-1)
    g_est, tr_est = estimate(small_sq, 8, big_sq, 64)
    cov = np.cov(np.stack([g_est, tr_est])) / n_steps
    grad = np.array([-32.0 / 1.0**2, 1.0 / 1.0])  # ∂(tr/g)/∂(g, tr) at the truth
    sigma_ratio = math.sqrt(grad @ cov @ grad)
    (got,) = window.estimates()
    assert got == pytest.approx(32.0, abs=5 * sigma_ratio)
    assert 5 * sigma_ratio < 0.2 * 32.0  # the check is informative, not vacuous
    # Exactly the ratio of the averages of the per-step estimates.
    assert got == pytest.approx(float(tr_est.mean() / g_est.mean()), rel=1e-9)
    assert window.estimates() == [None]  # a new window: nothing measured yet


def test_window_members_are_independent_and_edge_cases():
    # Two members, two steps with known squared norms (one micro-batch direction each):
    # member 0: |G|² 1 then 3 with tr(Σ) 10: the ratio of averages 10 / 2 = 5, not the
    # average of ratios (10 + 10/3) / 2 = 6.67; member 1: |G|² <= 0, so no estimate.
    def step(g_sq: float, tr: float) -> np.ndarray:
        bs, bb = 4, 8
        small, big = g_sq + tr / bs, g_sq + tr / bb
        # Two micro-batch gradients u ± v with |u|² = big (their mean) and |u|² + |v|² =
        # small (their mean squared norm): any orthogonal u, v will do.
        u = np.array([math.sqrt(big), 0.0])
        v = np.array([0.0, math.sqrt(max(small - big, 0.0))])
        return np.stack([u + v, u - v])[None]  # (1 member, k, dim)

    window = NoiseWindow(members=2, micro_batches=2, micro=4, batch=8)
    for g_sq in (1.0, 3.0):
        _feed(window, np.concatenate([step(g_sq, 10.0), step(-0.5, 10.0)]))
    first, second = window.estimates()
    assert first == pytest.approx(10.0 / 2.0) and first != pytest.approx(6.67, abs=0.01)
    assert second is None
    state = window.state(0)
    assert state["steps"] == 0 and state["sums"].tolist() == [0.0, 0.0, 0.0]
    window.select([1])
    assert window.sums.shape == (1, 3)


def test_the_noise_scale_figure_does_not_depend_on_the_runs_mlflow_ids(tmp_path):
    """A new study of the same runs (new random run ids) draws the same figure, to the byte:
    its lines are drawn in the order of optimizer, seed and ε_eff."""
    import pandas as pd

    from analysis.figures import noise_scale_vs_progress

    rows = []  # the two sgd runs cross: the one drawn last covers the other where they meet
    values = {("sgd", 0): [40, 80, 160], ("sgd", 1): [160, 80, 40], ("momentum", 0): [60, 60, 60]}
    for i, ((optimizer, seed), ys) in enumerate(values.items()):
        for step, y in zip((1, 2, 3), ys, strict=True):
            rows.append({"optimizer": optimizer, "seed": seed, "lr_eff": 2.0,
                         "run_id": f"id{i}", "step": step, "progress": step / 3,
                         "grad_noise_scale": float(y)})  # fmt: skip
    curve = pd.DataFrame(rows)
    swapped = curve.assign(run_id=curve["run_id"].map({"id0": "id9", "id1": "id0", "id2": "id1"}))
    pngs = []
    for name, c in (("a", curve), ("b", swapped)):
        (tmp_path / name).mkdir()
        png = noise_scale_vs_progress(c, "t", tmp_path / name)[0]
        pngs.append(png.read_bytes())
    assert pngs[0] == pngs[1]
