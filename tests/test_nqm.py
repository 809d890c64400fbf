"""The noisy quadratic model: exact recursions vs closed forms, Monte Carlo, and the regimes.

Loss convention throughout (as in sgdnoise.theory.nqm): the expected loss is
E[L_t] = Σ_i ℓ_i,t with ℓ_i,t = ½ h_i E[θ_i,t²].
"""

import warnings

import numpy as np
import pytest

from sgdnoise.theory.nqm import (
    NQMConfig,
    expected_loss,
    recorded_steps,
    run,
    search_lr,
    spectrum,
    steady_state_loss,
    steps_to_target,
)


def sgd_closed_form(h: float, c: float, lr: float, batch: int, theta0_sq: float, t: np.ndarray):
    """docs/protocol.md: E[ℓ_t] = (1 − αh)^{2t} ℓ_0 + α c / (2B (2 − αh)) · (1 − (1 − αh)^{2t}).

    With ℓ = ½ h E[θ²]: the recursion E[θ²]' = (1 − αh)² E[θ²] + α² c/B has fixed point
    α² c / (B (1 − (1 − αh)²)) = α c / (B h (2 − αh)); times ½ h gives the constant above.
    """
    decay = (1.0 - lr * h) ** (2 * t)
    return decay * 0.5 * h * theta0_sq + lr * c / (2 * batch * (2 - lr * h)) * (1 - decay)


def momentum_steady_state(h: float, c: float, lr: float, batch: int, beta: float) -> float:
    """docs/protocol.md (Zhang et al.): ℓ_∞ = (1 + β) α c / (2B (1 − β)(2β + 2 − αh)), ℓ = ½ h E[θ²]."""
    return (1 + beta) * lr * c / (2 * batch * (1 - beta) * (2 * beta + 2 - lr * h))


# (h, c, α, B): fast and slow decay, αh near 0, near 1, and above 1 (oscillating mean, still
# stable), noise comparable to / much smaller than the signal.
SGD_CASES = [
    (1.0, 1.0, 0.1, 1),
    (1.0, 1.0, 1.5, 8),
    (0.3, 2.0, 0.5, 4),
    (1e-3, 1e-3, 1.0, 2),
    (5.0, 0.7, 0.35, 128),
    (0.05, 3.0, 0.9, 16),
]


@pytest.mark.parametrize(("h", "c", "lr", "batch"), SGD_CASES)
def test_sgd_matches_closed_form(h, c, lr, batch):
    n = 500
    theta0_sq = 1.7
    curve = expected_loss(np.array([h]), np.array([c]), theta0_sq, np.full(n, lr), batch)
    want = sgd_closed_form(h, c, lr, batch, theta0_sq, np.arange(n + 1))
    assert curve.shape == (n + 1,)
    np.testing.assert_allclose(curve, want, rtol=1e-9, atol=0.0)


def test_sgd_closed_form_summed_over_spectrum():
    # Dimensions are independent: the total is the sum of the per-dimension closed forms.
    h, c, t0 = spectrum(NQMConfig(dim=50, h_power=1.5, c_scale=0.3, theta0=2.0))
    n, lr, batch = 300, 0.7, 3
    curve = expected_loss(h, c, t0, np.full(n, lr), batch)
    t = np.arange(n + 1)[:, None]
    want = sgd_closed_form(h[None], c[None], lr, batch, 4.0, t).sum(axis=1)
    np.testing.assert_allclose(curve, want, rtol=1e-9)


@pytest.mark.parametrize(
    ("h", "c", "lr", "batch", "beta"),
    [
        (1.0, 1.0, 0.1, 1, 0.9),
        (0.3, 0.5, 0.5, 4, 0.5),
        (2.0, 1.0, 0.05, 3, 0.8),
        (1.0, 2.0, 3.0, 16, 0.9),  # αh > 2: unstable for SGD, stable for heavy ball (< 2(1+β))
    ],
)
def test_momentum_steady_state(h, c, lr, batch, beta):
    # α is the raw step size. Convergence is geometric (rate ≤ max(β, 1 − αh/(1−β))² per
    # step, < 0.95² here), so after 3000 steps the transient is below 1e-60 of ℓ_0.
    n = 3000
    curve = expected_loss(np.array([h]), np.array([c]), 1.0, np.full(n, lr), batch, beta)
    want = momentum_steady_state(h, c, lr, batch, beta)
    assert curve[-1] == pytest.approx(want, rel=1e-9)
    assert steady_state_loss(np.array([h]), np.array([c]), lr, batch, beta) == pytest.approx(
        want, rel=1e-12
    )


def test_steady_state_loss_sgd_and_unstable():
    h, c, _ = spectrum(NQMConfig(dim=10))
    got = steady_state_loss(h, c, 0.3, 5)
    want = np.sum(sgd_closed_form(h, c, 0.3, 5, 0.0, np.array(10**6)))  # t → ∞
    assert got == pytest.approx(want, rel=1e-12)
    assert steady_state_loss(h, c, 2.5, 5) == float("inf")  # αh_max > 2
    assert np.isfinite(steady_state_loss(h, c, 2.5, 5, momentum=0.5))  # < 2(1 + β) = 3


def test_momentum_matches_sgd_at_effective_lr():
    # Heavy ball with step α and β behaves like SGD with α_eff = α / (1 − β) when
    # u = α_eff h_max is small: its velocity settles to g / (1 − β) within ~1/(1 − β) steps.
    # The main leftover is that start-up lag of β/(1 − β) steps; the loss decays by at most a
    # factor (1 − u)² per step, so the relative gap is at most about 2 u β/(1 − β)
    # = 2 · 0.001 · 9 = 1.8% (the stationary noise floors differ by only O(u) = 0.1%).
    # Tolerance: 2% at every step, transient included. Observed ≈ 0.8%.
    beta, lr_eff, batch, n = 0.9, 0.001, 4, 5000
    h, c, t0 = spectrum(NQMConfig(dim=20))
    mom = expected_loss(h, c, t0, np.full(n, lr_eff * (1 - beta)), batch, beta)
    sgd = expected_loss(h, c, t0, np.full(n, lr_eff), batch)
    np.testing.assert_allclose(mom, sgd, rtol=0.02)
    assert mom[-1] < 0.5 * mom[0]  # the comparison covers real progress, not just step 0
    # Not true at large u: the same comparison at α_eff h_max = 1 fails by a wide margin,
    # which is where momentum starts to matter (Zhang et al.).
    mom = expected_loss(h, c, t0, np.full(200, 1.0 * (1 - beta)), batch, beta)
    sgd = expected_loss(h, c, t0, np.full(200, 1.0), batch)
    assert np.max(np.abs(mom / sgd - 1)) > 0.2


def simulate(h, c, lrs, batch, beta, n_chains, seed):
    """Monte Carlo of the NQM: independent chains, g = hθ + N(0, c/B), heavy ball (β=0: SGD)."""
    rng = np.random.default_rng(seed)
    theta = np.ones((n_chains, len(h)))
    v = np.zeros_like(theta)
    sd = np.sqrt(c / batch)
    losses = [0.5 * (theta**2 @ h)]
    for lr in lrs:
        g = h * theta + sd * rng.standard_normal(theta.shape)
        v = beta * v + g
        theta = theta - lr * v
        losses.append(0.5 * (theta**2 @ h))
    return np.array(losses)  # (steps + 1, chains)


@pytest.mark.parametrize(("beta", "lr_eff"), [(0.0, 0.5), (0.9, 0.5), (0.5, 1.5)])
def test_monte_carlo_agrees_with_exact_expectation(beta, lr_eff):
    # A small spectrum and a piecewise-constant schedule (constant, then halved twice) so the
    # coefficient updates are exercised. 4000 chains, fixed seed. We compare at 7 steps over
    # 3 cases: |mean − exact| ≤ 4.5 standard errors (a two-sided 4.5σ miss has probability
    # ~7e-6 per comparison, so a correct recursion essentially never fails, while a wrong
    # coefficient shifts the mean by many SE).
    h = np.array([1.0, 0.5, 0.2, 0.1, 0.05])
    c = np.array([1.0, 2.0, 0.2, 0.5, 0.05])
    batch, n = 2, 200
    lrs = lr_eff * (1 - beta) * np.where(np.arange(n) < 100, 1.0, 0.5)
    lrs[150:] *= 0.5
    exact = expected_loss(h, c, 1.0, lrs, batch, beta)
    sim = simulate(h, c, lrs, batch, beta, n_chains=4000, seed=1234)
    for t in (1, 5, 20, 60, 120, 160, 200):
        se = sim[t].std(ddof=1) / np.sqrt(sim.shape[1])
        assert abs(sim[t].mean() - exact[t]) <= 4.5 * se, (t, sim[t].mean(), exact[t], se)


def test_record_every_and_stop_at():
    h, c, t0 = spectrum(NQMConfig(dim=30))
    lrs = np.linspace(1.0, 0.1, 103)
    for beta in (0.0, 0.7):
        full = expected_loss(h, c, t0, lrs, 8, beta)
        steps = recorded_steps(103, 10)
        assert steps.tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 103]
        np.testing.assert_allclose(expected_loss(h, c, t0, lrs, 8, beta, 10), full[steps])
        target = 0.5 * full[0]
        n = steps_to_target(full, target)
        assert n is not None and full[n] <= target < full[n - 1]
        short = expected_loss(h, c, t0, lrs, 8, beta, stop_at=target)
        assert len(short) == n + 1
        np.testing.assert_allclose(short, full[: n + 1])
    assert steps_to_target(full, -1.0) is None
    # At 10-step resolution the hit is reported at the first recorded step at or after n.
    assert steps_to_target(full[steps], target, steps) == steps[np.searchsorted(steps, n)]


def test_divergence_is_clean():
    h, c, t0 = spectrum(NQMConfig(dim=100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # overflow must not surface as RuntimeWarnings
        for momentum, lr_eff in ((0.0, 2.5), (0.9, 50.0)):  # αh_max > 2 and > 2(1 + β)
            out = run(
                NQMConfig(dim=100), batch_size=4, momentum=momentum, lr_eff=lr_eff, n_steps=3000
            )
            assert out["diverged"]
            assert not np.any(np.isnan(out["curve"]))
            assert out["final_loss"] == np.inf  # overflowed: then reported as inf
        stable = run(NQMConfig(dim=100), batch_size=4, momentum=0.9, lr_eff=10.0, n_steps=3000)
        assert not stable["diverged"]  # αh = 1 < 2(1 + β): momentum tolerates lr_eff = 10
        curve = expected_loss(h, c, t0, np.full(20, 2.5), 4)  # mild: finite but growing
        assert np.all(np.isfinite(curve)) and curve[-1] > curve[0]


def test_run_api():
    cfg = NQMConfig(dim=40)
    n = 400

    def halve_late(t: int, total: int) -> float:
        return 1.0 if 2 * t < total else 0.5

    beta = 0.9
    a = run(
        cfg, batch_size=8, momentum=beta, lr_eff=0.8, n_steps=n, schedule=halve_late, target=0.5
    )
    lrs_eff = np.where(np.arange(n) < n // 2, 0.8, 0.4)
    b = run(cfg, batch_size=8, momentum=beta, lrs_eff=lrs_eff, target=0.5)
    np.testing.assert_allclose(a["curve"], b["curve"])
    np.testing.assert_allclose(a["lrs"], lrs_eff * (1 - beta))  # step size α = ε (1 − β)
    h, c, t0 = spectrum(cfg)
    np.testing.assert_allclose(a["curve"], expected_loss(h, c, t0, lrs_eff * 0.1, 8, beta))
    assert a["final_loss"] == a["curve"][-1] and a["initial_loss"] == pytest.approx(0.5 * h.sum())
    assert a["steps_to_target"] == steps_to_target(a["curve"], 0.5)
    assert not a["diverged"] and a["steps"].tolist() == list(range(n + 1))
    r = run(cfg, batch_size=8, lr_eff=0.8, n_steps=n, record_every=50, target=0.5)
    assert r["steps"].tolist() == list(range(0, n + 1, 50)) and len(r["curve"]) == 9
    s = run(cfg, batch_size=8, lr_eff=0.8, n_steps=n, target=0.5, stop_at_target=True)
    assert s["final_loss"] <= 0.5 and len(s["curve"]) == s["steps_to_target"] + 1
    with pytest.raises(ValueError):
        run(cfg, batch_size=8, lr_eff=0.8, lrs_eff=lrs_eff)
    with pytest.raises(ValueError):
        run(cfg, batch_size=8, lr_eff=0.8)
    with pytest.raises(ValueError):
        expected_loss(h, c, t0, np.full(5, 0.1), 8, momentum=1.0)


def test_spectrum_defaults_and_overrides():
    h, c, t0 = spectrum(NQMConfig())
    assert h.shape == (10_000,) and h[0] == 1.0 and h[-1] == pytest.approx(1e-4)
    np.testing.assert_array_equal(c, h)
    np.testing.assert_array_equal(t0, 1.0)
    h2, c2, t2 = spectrum(NQMConfig(h=np.array([3.0, 2.0]), c_scale=2.0, theta0=np.array([1, 3])))
    assert h2.tolist() == [3.0, 2.0] and c2.tolist() == [6.0, 4.0] and t2.tolist() == [1.0, 9.0]


def test_two_regimes_on_default_nqm():
    # Zhang et al.'s set-up: d = 10⁴, h_i = 1/i, c_i = h_i, θ_0 = 1, so E[L_0] = ½ Σ 1/i ≈ 4.89.
    # Target 1.0 (≈ 20% of L_0): far enough to need the slow directions, cheap enough for a
    # unit test (≤ 6000 steps at B = 1). Constant schedule, SGD; lr_eff on powers of 2.
    cfg = NQMConfig()
    grid = 2.0 ** np.arange(-5, 2)  # 1/32 .. 2 (2 = 2 / h_max: the stability edge)
    target = 1.0
    res = {
        b: search_lr(cfg, batch_size=b, lr_effs=grid, target=target, max_steps=50_000)
        for b in (1, 2, 4, 256, 512)
    }
    lr = {b: r[0] for b, r in res.items()}
    steps = {b: r[1] for b, r in res.items()}
    # Noise-dominated (small B): the dynamics depend on α and B mainly through the
    # temperature α/B and the time αt (SDE limit), so doubling B lets α double and halves the
    # steps exactly up to O(αh) discretisation effects, which are a few % at the optimal
    # α ≤ 1/2 here. Tolerance: ratio within 10% of 2.
    assert lr[2] == 2 * lr[1] and lr[4] == 2 * lr[2]  # optimal lr ∝ B
    assert lr[1] > grid[0]  # the optimum is interior, not clipped by the grid
    assert steps[1] / steps[2] == pytest.approx(2.0, rel=0.1)
    assert steps[2] / steps[4] == pytest.approx(2.0, rel=0.1)
    # Curvature-dominated (large B): α is capped by stability (α h_max < 2), so the best
    # grid rate no longer moves with B, and the noise floor α c/(4B) summed is ~1e-2 of the
    # target: steps are within a few % of the noiseless (B = ∞) count, which lower-bounds them
    # (noise only adds loss). Tolerance: ratio in [1, 1.05], and ≤ 5% above B = ∞.
    assert lr[256] == lr[512] < grid[-1]
    assert 1.0 <= steps[256] / steps[512] <= 1.05
    h, _, t0 = spectrum(cfg)
    _, steps_inf = search_lr(
        (h, 0 * h, t0), batch_size=1, lr_effs=grid, target=target, max_steps=50_000
    )
    assert steps_inf <= steps[512] <= 1.05 * steps_inf
    # The two regimes really differ: ≈ 14× fewer steps for 512× more examples per step.
    assert steps[1] / steps[512] < 20


def test_momentum_helps_only_at_large_batch():
    # Zhang et al.: at small B (noise dominated) heavy ball at the same effective rate is no
    # better than SGD; at large B (curvature dominated) it is, because its stability limit
    # α_eff h_max < 2(1 + β)/(1 − β) = 38 (β = 0.9) is far above SGD's α h_max < 2.
    # d = 10³ (E[L_0] ≈ 3.7, target 1.0) keeps the momentum recursion cheap.
    cfg = NQMConfig(dim=1000)
    grid = 2.0 ** np.arange(-5, 6)
    kw = {"lr_effs": grid, "target": 1.0, "max_steps": 50_000}
    sgd_small = search_lr(cfg, batch_size=1, **kw)
    mom_small = search_lr(cfg, batch_size=1, momentum=0.9, **kw)
    sgd_large = search_lr(cfg, batch_size=1024, **kw)
    mom_large = search_lr(cfg, batch_size=1024, momentum=0.9, **kw)
    # Small B: same optimal ε_eff and steps within 10% (observed: 3% fewer, the start-up
    # lag and O(αh) corrections of test_momentum_matches_sgd_at_effective_lr).
    assert mom_small[0] == sgd_small[0]
    assert mom_small[1] == pytest.approx(sgd_small[1], rel=0.1)
    # Large B: momentum's best ε_eff is beyond SGD's stability limit, and it needs
    # several times fewer steps (observed 11 vs 42).
    assert sgd_large[0] <= 2.0 < mom_large[0]
    assert mom_large[1] * 3 < sgd_large[1]


@pytest.mark.parametrize("beta", [0.0, 0.9], ids=["sgd", "momentum"])
def test_the_c_recursion_gives_numpys_curve(beta: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """sgdnoise/native/nqm.c performs numpy's elementwise operations in numpy's order; only
    the loss's sum over dimensions runs in another order. Curves agree to 1e-13, diverged
    steps are inf in both, and the step that reaches a target is the same, across constant
    rates, a schedule, recording intervals, stopping at a target and divergence."""
    from sgdnoise import native

    if native.library("nqm") is None:
        pytest.fail("the NQM kernel could not be built on this machine (cc is required)")
    h, c, t0 = spectrum(NQMConfig(dim=3000))
    cases = [
        (np.full(3000, 0.3 * (1 - beta)), 16, 1, None),
        (np.full(3000, 1.5 * (1 - beta)), 64, 7, None),
        (np.repeat([0.8, 0.4, 0.1], 400) * (1 - beta), 4, 1, 2.0),  # a schedule, a target
        (np.full(500, 5.0), 8, 3, None),  # beyond the stability limit: diverges
    ]
    for lrs, batch, every, stop in cases:
        monkeypatch.setitem(native._libs, "nqm", False)  # numpy's loops
        ref = expected_loss(h, c, t0, lrs, batch, beta, every, stop_at=stop)
        monkeypatch.delitem(native._libs, "nqm")
        got = expected_loss(h, c, t0, lrs, batch, beta, every, stop_at=stop)
        assert got.shape == ref.shape
        finite = np.isfinite(ref)
        assert np.array_equal(np.isfinite(got), finite)
        assert np.allclose(got[finite], ref[finite], rtol=1e-13, atol=0)
        if stop is not None:
            assert steps_to_target(got, stop) == steps_to_target(ref, stop) is not None
    assert not np.isfinite(got[-1])  # the last case diverged
