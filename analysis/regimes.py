"""Noise- vs curvature-dominated regimes: fit ε_opt(B) = ε_max / (1 + B_crit / B).

McCandlish et al.'s form, fitted by least squares on log ε_opt (the lr grid is
geometric, so errors are multiplicative). For a given B_crit the best log ε_max is a
mean, so the fit is a 1-D search over log B_crit. The interval comes from resampling
seeds and refitting with the same selection rule. Whatever cannot be estimated is
said in `message` instead of raised: a half-finished sweep is still worth a look.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.selection import Cube, Rule, optimal_log2_lr

MIN_BATCH_SIZES = 3
N_BOOT = 200
# Search B_crit this many octaves beyond the batch sizes tried; a fit pinned to either
# end means the data only bound it.
OCTAVES_BEYOND = 4


@dataclass
class Fit:
    b_crit: float
    eps_max: float
    at_bound: str  # "", "low" (ε_opt flat: B_crit below the data) or "high" (ε_opt ∝ B)


@dataclass
class Regimes:
    series: str
    b_crit: float | None = None
    b_crit_lo: float | None = None
    b_crit_hi: float | None = None
    eps_max: float | None = None
    slope_below: float | None = None  # d log ε_opt / d log B for B < B_crit
    slope_above: float | None = None
    b_simple: float | None = None  # measured gradient noise scale (median over runs)
    n_boot: int = 0
    fit: Fit | None = None  # the point fit, also when B_crit itself is only bounded
    regime: dict[int, str] = field(default_factory=dict)  # B -> "noise" | "curvature"
    messages: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        return "; ".join(self.messages)


def _sse(log_b: np.ndarray, y: np.ndarray, log_bc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual sum of squares and log ε_max for each candidate log B_crit."""
    f = np.logaddexp(0.0, log_bc[:, None] - log_b[None, :])  # log(1 + B_crit / B)
    log_eps_max = (y[None, :] + f).mean(axis=1)
    resid = y[None, :] - (log_eps_max[:, None] - f)
    return (resid**2).sum(axis=1), log_eps_max


def fit_b_crit(batch_sizes: np.ndarray, eps_opt: np.ndarray) -> Fit:
    """Least-squares fit of log ε_opt = log ε_max - log(1 + B_crit / B)."""
    log_b = np.log(np.asarray(batch_sizes, dtype=float))
    y = np.log(np.asarray(eps_opt, dtype=float))
    lo = log_b.min() - OCTAVES_BEYOND * np.log(2)
    hi = log_b.max() + OCTAVES_BEYOND * np.log(2)
    grid = np.linspace(lo, hi, 401)
    sse, _ = _sse(log_b, y, grid)
    i = int(np.argmin(sse))
    at_bound = "low" if i == 0 else "high" if i == len(grid) - 1 else ""
    if not at_bound:
        # Golden-section refinement inside the bracketing grid cells.
        a, b = grid[i - 1], grid[i + 1]
        g = (np.sqrt(5) - 1) / 2
        for _ in range(40):
            c, d = b - g * (b - a), a + g * (b - a)
            if _sse(log_b, y, np.array([c]))[0][0] < _sse(log_b, y, np.array([d]))[0][0]:
                b = d
            else:
                a = c
        best = np.array([(a + b) / 2])
    else:
        best = grid[i : i + 1]
    _, log_eps_max = _sse(log_b, y, best)
    return Fit(
        b_crit=float(np.exp(best[0])), eps_max=float(np.exp(log_eps_max[0])), at_bound=at_bound
    )


def predict(fit: Fit, batch_sizes: np.ndarray) -> np.ndarray:
    return fit.eps_max / (1.0 + fit.b_crit / np.asarray(batch_sizes, dtype=float))


def _slope(b: np.ndarray, eps: np.ndarray) -> float | None:
    if len(b) < 2:
        return None
    return float(np.polyfit(np.log2(b), np.log2(eps), 1)[0])


def estimate(
    series: str,
    cube: Cube,
    rule: Rule,
    all_batch_sizes: np.ndarray | None = None,
    b_simple: float | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Regimes:
    """Fit B_crit for one series (cube groups are batch sizes) and label each B.

    `all_batch_sizes`: the batch sizes any series of the study has, to report gaps.
    """
    out = Regimes(series=series, b_simple=b_simple)
    batch = cube.groups.astype(float)
    if all_batch_sizes is not None:
        missing = sorted(set(int(b) for b in all_batch_sizes) - set(int(b) for b in batch))
        if missing:
            out.messages.append(f"no runs at B = {', '.join(map(str, missing))}")
    log2_opt = optimal_log2_lr(cube.score, cube.lrs, rule)
    ok = np.isfinite(log2_opt)
    if (~ok).any():
        dead = ", ".join(str(int(b)) for b in batch[~ok])
        out.messages.append(f"no optimum at B = {dead} (all runs diverged)")
    b_ok, eps_ok = batch[ok], 2.0 ** log2_opt[ok]
    if len(b_ok) < MIN_BATCH_SIZES:
        out.messages.append(
            f"B_crit not estimated: needs an optimal lr at ≥{MIN_BATCH_SIZES} batch sizes, "
            f"has {len(b_ok)}"
        )
        return out

    fit = fit_b_crit(b_ok, eps_ok)
    out.fit, out.eps_max = fit, fit.eps_max
    if fit.at_bound == "high":
        out.messages.append(
            f"B_crit not estimated: above the largest batch size ({int(b_ok.max())}); "
            "ε_opt still grows with B"
        )
        out.regime = {int(b): "noise" for b in batch}
        out.slope_below = _slope(b_ok, eps_ok)
    elif fit.at_bound == "low":
        out.messages.append(
            f"B_crit not estimated: below the smallest batch size ({int(b_ok.min())}); "
            "ε_opt does not grow with B"
        )
        out.regime = {int(b): "curvature" for b in batch}
        out.slope_above = _slope(b_ok, eps_ok)
    else:
        out.b_crit = fit.b_crit
        if not b_ok.min() <= fit.b_crit <= b_ok.max():
            out.messages.append(
                f"B_crit = {fit.b_crit:.4g} lies outside the batch sizes tried "
                f"({int(b_ok.min())} to {int(b_ok.max())}): an extrapolation"
            )
        out.regime = {int(b): "noise" if b < fit.b_crit else "curvature" for b in batch}
        below, above = b_ok < fit.b_crit, b_ok >= fit.b_crit
        out.slope_below = _slope(b_ok[below], eps_ok[below])
        out.slope_above = _slope(b_ok[above], eps_ok[above])
        if out.slope_below is None:
            out.messages.append("slope below B_crit not estimated: fewer than 2 batch sizes there")
    _bootstrap(out, cube, rule, n_boot, seed)
    return out


def _bootstrap(out: Regimes, cube: Cube, rule: Rule, n_boot: int, seed: int) -> None:
    n_seeds = len(cube.seeds)
    if n_seeds < 2:
        out.messages.append("no bootstrap interval for B_crit: a single seed")
        return
    rng = np.random.default_rng(seed)
    batch = cube.groups.astype(float)
    fits = []
    # With a few seeds most resamples repeat (3 seeds: 27 distinct draws in N_BOOT): each
    # distinct draw is fitted once.
    fitted: dict[tuple[int, ...], float | None] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, n_seeds, n_seeds)
        key = tuple(int(i) for i in idx)
        if key not in fitted:
            log2_opt = optimal_log2_lr(cube.score[:, :, idx], cube.lrs, rule)
            ok = np.isfinite(log2_opt)
            # A fit pinned to a search bound stays in as that bound: the interval then
            # reaches the bound, which is what the data say.
            fitted[key] = (fit_b_crit(batch[ok], 2.0 ** log2_opt[ok]).b_crit
                           if ok.sum() >= MIN_BATCH_SIZES else None)  # fmt: skip
        if fitted[key] is not None:
            fits.append(fitted[key])
    out.n_boot = len(fits)
    if len(fits) < 10:
        out.messages.append(f"no bootstrap interval for B_crit: only {len(fits)} resamples fit")
        return
    lo, hi = np.exp(np.percentile(np.log(fits), [2.5, 97.5]))
    out.b_crit_lo, out.b_crit_hi = float(lo), float(hi)


def b_simple(df: pd.DataFrame) -> float | None:
    """Median measured gradient noise scale over the non-diverged runs, if logged."""
    if "grad_noise_scale" not in df:
        return None
    values = df.loc[~df["diverged"], "grad_noise_scale"].to_numpy(dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    return float(np.median(values)) if len(values) else None
