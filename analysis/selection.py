"""The two rules that pick an optimal learning rate from a seeds x lr grid (docs/protocol.md).

- per_seed: each seed's best lr; mean ± std of the seeds' best metrics, the median of
  their optimal lrs (in log2, since the grid is powers of two), their min-to-max range.
- mean_curve: average the metric over seeds at each lr; the lr with the best mean, its
  mean ± std, and the range of lrs whose mean lies within one std of the best.

Both work on a `Cube`: group (batch size or budget) x lr x seed, holding a score where
higher is better. A diverged run (NaN metric) scores -inf, the worst for either
direction; a grid point with no run is NaN and is left out. Ties go to the smaller lr.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

Rule = Literal["per_seed", "mean_curve"]
RULES: tuple[str, ...] = ("per_seed", "mean_curve")
Direction = Literal["maximize", "minimize"]


@dataclass
class Cube:
    groups: np.ndarray  # values along the group axis, sorted
    lrs: np.ndarray  # union of the lr grids, sorted
    seeds: np.ndarray
    score: np.ndarray  # [group, lr, seed]; NaN = no run, -inf = NaN metric
    sign: float  # metric = sign * score
    aux: dict[str, np.ndarray]  # other metrics per cell (e.g. training loss at the optimum)

    @property
    def present(self) -> np.ndarray:
        return ~np.isnan(self.score)


def build_cube(
    df: pd.DataFrame,
    group: str,
    metric: str,
    direction: Direction,
    aux: tuple[str, ...] = (),
) -> Cube:
    """Arrange the rows of `df` (one run each) into a group x lr x seed cube."""
    groups = np.sort(df[group].unique())
    lrs = np.sort(df["lr_eff"].unique())
    seeds = np.sort(df["seed"].unique())
    gi = np.searchsorted(groups, df[group].to_numpy())
    li = np.searchsorted(lrs, df["lr_eff"].to_numpy())
    si = np.searchsorted(seeds, df["seed"].to_numpy())
    sign = 1.0 if direction == "maximize" else -1.0
    shape = (len(groups), len(lrs), len(seeds))

    def fill(values: np.ndarray) -> np.ndarray:
        cube = np.full(shape, np.nan)
        cube[gi, li, si] = values
        return cube

    values = df[metric].to_numpy(dtype=float) * sign
    score = fill(np.where(np.isnan(values), -np.inf, values))
    return Cube(
        groups=groups,
        lrs=lrs,
        seeds=seeds,
        score=score,
        sign=sign,
        aux={name: fill(df[name].to_numpy(dtype=float)) for name in aux},
    )


def _nanstd(x: np.ndarray, axis: int) -> np.ndarray:
    """Sample std (ddof=1) over finite entries; NaN where fewer than two."""
    x = np.where(np.isfinite(x), x, np.nan)
    n = np.sum(~np.isnan(x), axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        std = np.nanstd(x, axis=axis, ddof=1)
    return np.where(n >= 2, std, np.nan)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def per_seed_optima(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each seed's best lr [group, seed], and whether that seed has one."""
    filled = np.where(np.isnan(score), -np.inf, score)
    best = filled.argmax(axis=1)
    best_score = np.take_along_axis(filled, best[:, None, :], axis=1)[:, 0, :]
    return best, np.isfinite(best_score)


def mean_curve(score: np.ndarray) -> np.ndarray:
    """Mean score over seeds [group, lr]; -inf if any seed diverged there, NaN if no run."""
    return _nanmean(score, axis=2)


def optimal_log2_lr(score: np.ndarray, lrs: np.ndarray, rule: Rule) -> np.ndarray:
    """The reported optimal log2 lr per group (NaN where nothing finite): used by the
    tables and, on resampled seeds, by the bootstrap."""
    log2_lrs = np.log2(lrs)
    if rule == "per_seed":
        best, ok = per_seed_optima(score)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(np.where(ok, log2_lrs[best], np.nan), axis=1)
    curve = np.where(np.isnan(m := mean_curve(score)), -np.inf, m)
    best = curve.argmax(axis=1)
    ok = np.isfinite(curve[np.arange(len(best)), best])
    return np.where(ok, log2_lrs[best], np.nan)


def select(cube: Cube, rule: Rule) -> pd.DataFrame:
    """One row per group: optimal lr with its range, metric mean ± std at the optimum,
    aux metrics at the optimum, seeds, and whether the optimum sits at a grid edge."""
    if rule not in RULES:
        raise ValueError(f"selection rule {rule!r} is not one of {', '.join(RULES)}")
    score, lrs = cube.score, cube.lrs
    log2_lrs = np.log2(lrs)
    n_groups = len(cube.groups)
    rows = np.arange(n_groups)
    log2_opt = optimal_log2_lr(score, lrs, rule)

    if rule == "per_seed":
        best, ok = per_seed_optima(score)
        best_log2 = np.where(ok, log2_lrs[best], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanmin(best_log2, axis=1), np.nanmax(best_log2, axis=1)
        at_best = np.take_along_axis(score, best[:, None, :], axis=1)[:, 0, :]
        at_best = np.where(ok, at_best, np.nan)
        metric_mean, metric_std = _nanmean(at_best, 1), _nanstd(at_best, 1)
        aux = {
            name: np.where(ok, np.take_along_axis(v, best[:, None, :], axis=1)[:, 0, :], np.nan)
            for name, v in cube.aux.items()
        }
    else:
        curve = np.where(np.isnan(m := mean_curve(score)), -np.inf, m)
        best_l = curve.argmax(axis=1)
        ok_g = np.isfinite(curve[rows, best_l])
        at_best = score[rows, best_l, :]  # [group, seed]
        metric_mean = np.where(ok_g, curve[rows, best_l], np.nan)
        metric_std = np.where(ok_g, _nanstd(at_best, 1), np.nan)
        # Within one std of the best mean; a single seed has no std, so only the best lr.
        tol = np.nan_to_num(metric_std, nan=0.0)
        near = curve >= (metric_mean - tol)[:, None]
        near_log2 = np.where(near & ok_g[:, None], log2_lrs[None, :], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanmin(near_log2, axis=1), np.nanmax(near_log2, axis=1)
        aux = {name: v[rows, best_l, :] for name, v in cube.aux.items()}
        aux = {name: np.where(ok_g[:, None], v, np.nan) for name, v in aux.items()}

    present = cube.present
    grid_lo = np.array([log2_lrs[p.any(axis=1)].min() for p in present])
    grid_hi = np.array([log2_lrs[p.any(axis=1)].max() for p in present])
    edge = np.where(
        np.isclose(log2_opt, grid_lo), "low", np.where(np.isclose(log2_opt, grid_hi), "high", "")
    )
    out = pd.DataFrame(
        {
            "group": cube.groups,
            "lr_opt": 2.0**log2_opt,
            "lr_lo": 2.0**lo,
            "lr_hi": 2.0**hi,
            "metric_mean": cube.sign * metric_mean,
            "metric_std": metric_std,
            "n_seeds": present.any(axis=1).sum(axis=1),
            "edge": edge,
            "grid_lo": 2.0**grid_lo,
            "grid_hi": 2.0**grid_hi,
        }
    )
    for name, v in aux.items():
        out[f"{name}_mean"] = _nanmean(v, 1)
        out[f"{name}_std"] = _nanstd(v, 1)
    return out
