"""The paper's claims, evaluated as data on what `analyze` wrote (summary.json, table.csv).

Every claim gets a verdict, "holds", "does not hold" or "cannot tell", and the numbers
behind it. The thresholds below are fixed module constants, chosen from the lr and batch
grids' resolution and the seeds' spread, never from the paper's numbers or from a run's
outcome: what the runs show is what the verdict says. Missing data (a study not run, a
B_crit the fit could not place, a single seed, an optimum at the edge of the lr grid)
gives "cannot tell" with the reason instead of a guess.

Claims (docs/protocol.md), each on one of the paper's three studies:
- accuracy_flat_then_falls (constant epoch budget): best test metric flat (within the
  seeds' spread) over at least three consecutive smallest batch sizes, then falling by a
  clear margin at the largest B.
- lr_rises_at_small_b, lr_flat_at_large_b (constant epoch budget): over that flat region
  (the noise-dominated regime) the optimal ε_eff grows ∝ B (log-log slope near 1); at and
  above the fitted B_crit it stops growing (slope near 0).
- momentum_only_helps_at_large_b (constant epoch budget): Momentum the same as SGD at the
  smallest B, better at each of the largest ones.
- large_batches_lose_at_constant_steps (constant step budget): the largest B loses test
  accuracy even though its training loss is lower or equal.
- train_optimal_lr_falls_faster (epoch-budget study): as the budget grows, the
  train-loss-optimal ε_eff falls faster than the test-optimal one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HOLDS, FAILS, UNKNOWN = "holds", "does not hold", "cannot tell"
VERDICTS = (HOLDS, FAILS, UNKNOWN)

# The role each of the paper's studies plays -> the study name in params.yaml `studies:`.
ROLES: dict[str, str] = {
    "constant_epochs": "constant_epochs",
    "constant_steps": "constant_steps",
    "epoch_budgets": "epoch_budgets",
    # Not a claim of its own: the measured B_simple set beside constant_epochs' B_crit.
    "noise_scale": "noise_scale",
}
SGD, MOMENTUM = "sgd", "momentum"  # series names of the two optimizers (train.optimizer)

# ---- thresholds (documented in REPORT.md from these values) -----------------------------
# "ε_opt ∝ B": the log2-log2 slope of the optimal ε_eff vs B below B_crit lies in this
# closed interval. On power-of-two grids one lr step per B doubling is slope 1; ±0.5 is
# half a grid step per doubling either way.
SLOPE_PROPORTIONAL = (0.5, 1.5)
# "ε_opt independent of B": |slope| at or below this above B_crit, i.e. less than one lr
# grid step (a factor 2) per three doublings of B.
SLOPE_FLAT_MAX = 1 / 3
# A slope needs at least this many batch sizes with an optimum on its side of B_crit.
MIN_SLOPE_POINTS = 3
# Two best-metric values are "the same" when they differ by at most
# max(N_STD * pooled seed std, floor): floor = 1 percentage point for accuracies
# (logged in [0, 1]) and 1 % of the larger magnitude for any other metric (a loss).
N_STD = 2.0
MIN_DIFF_ACCURACY = 0.01
MIN_DIFF_RELATIVE = 0.01
# A seed std needs at least two seeds; with fewer, no claim can be told from seed noise.
MIN_SEEDS = 2
# Below this many seeds a miss names the seed count as a possible cause (the paper: 5).
FEW_SEEDS = 3
# Accuracy-vs-B claims need at least this many batch sizes with a best metric.
MIN_BATCH_SIZES = 3
# "Flat at small B": at least this many batch sizes, from the smallest up, all "the
# same" as the best one; the slope of "ε_opt ∝ B" is measured over that region.
MIN_FLAT_POINTS = 3
# Momentum vs SGD: "the same" at this many smallest batch sizes, "ahead" at this many
# largest ones.
MOMENTUM_SMALL_POINTS = 1
MOMENTUM_LARGE_POINTS = 2
# Epoch-budget study: the budgets must span at least this factor (the paper: 128x).
MIN_BUDGET_SPAN = 4.0
# "Falls faster": the train-optimal ε_eff falls by at least this many octaves (factors
# of 2, one grid step) more than the test-optimal one over the budget range.
MIN_EXTRA_FALL_OCTAVES = 1.0

THRESHOLDS: dict[str, str] = {
    "slope near 1": f"log-log slope of optimal ε_eff vs B within "
    f"[{SLOPE_PROPORTIONAL[0]:g}, {SLOPE_PROPORTIONAL[1]:g}], over the flat-accuracy region "
    f"(≥{MIN_SLOPE_POINTS} batch sizes)",
    "slope near 0": f"|slope| ≤ {SLOPE_FLAT_MAX:.2g} (under one lr grid step per three "
    f"doublings of B), over ≥{MIN_SLOPE_POINTS} batch sizes at or above B_crit",
    "same metric": f"difference ≤ max({N_STD:g} × pooled seed std, "
    f"{MIN_DIFF_ACCURACY * 100:g} percentage point for accuracies or "
    f"{MIN_DIFF_RELATIVE * 100:g} % of the value for losses); a larger gap is a real difference",
    "seeds": f"every verdict needs ≥{MIN_SEEDS} seeds per grid point: with one, a difference "
    "cannot be told from seed noise",
    "flat at small B": f"≥{MIN_FLAT_POINTS} consecutive batch sizes, from the smallest up, "
    f"the same as the best; ≥{MIN_BATCH_SIZES} batch sizes in all; the largest B below the "
    "best by more than the tolerance",
    "momentum vs SGD": f"the same at the {MOMENTUM_SMALL_POINTS} smallest B, Momentum ahead by "
    f"more than the tolerance at each of the {MOMENTUM_LARGE_POINTS} largest B",
    "edge of the lr grid": "an optimum at the lowest or highest lr tried is only a bound: "
    "a slope through it cannot be told; a budget ratio through it only where the bound "
    "could change the verdict",
    "falls faster": f"train-optimal ε_eff falls ≥{MIN_EXTRA_FALL_OCTAVES:g} octave(s) "
    f"(factor {2**MIN_EXTRA_FALL_OCTAVES:g}) more than the test-optimal one, over budgets "
    f"spanning ≥{MIN_BUDGET_SPAN:g}x",
}


@dataclass
class Claim:
    key: str
    title: str  # the paper's claim, in words
    role: str  # which of the paper's studies tests it
    study: str  # the study name that played that role
    verdict: str  # HOLDS, FAILS or UNKNOWN
    detail: str  # one or two sentences with the numbers behind the verdict
    numbers: dict[str, Any] = field(default_factory=dict)
    hints: list[str] = field(default_factory=list)  # what might explain a miss, from the data


@dataclass(frozen=True)
class StudyResult:
    """One study's analysis outputs as read back from results/<study>/."""

    name: str
    path: Path
    summary: dict[str, Any]
    table: pd.DataFrame | None  # table.csv
    markdown: str | None  # table.md


def load_result(results_dir: Path, study: str) -> StudyResult | None:
    """results/<study>/{summary.json, table.csv, table.md}; None without a summary."""
    path = Path(results_dir) / study
    js = path / "summary.json"
    if not js.is_file():
        return None
    csv, md = path / "table.csv", path / "table.md"
    return StudyResult(
        name=study,
        path=path,
        summary=json.loads(js.read_text()),
        table=pd.read_csv(csv, keep_default_na=False, na_values=[""]) if csv.is_file() else None,
        markdown=md.read_text() if md.is_file() else None,
    )


def evaluate(
    results_dir: Path,
    studies: Iterable[str] | None = None,
    roles: Mapping[str, str] = ROLES,
) -> list[Claim]:
    """Every claim's verdict from the studies under `results_dir` (restricted to `studies`
    when given: a role whose study is not among them counts as not run)."""
    allowed = None if studies is None else set(studies)
    results = {
        role: (load_result(results_dir, name) if allowed is None or name in allowed else None)
        for role, name in roles.items()
    }
    return evaluate_results(results, roles)


def evaluate_results(
    results: Mapping[str, StudyResult | None], roles: Mapping[str, str] = ROLES
) -> list[Claim]:
    """The claims from results keyed by role (None: the study was not run)."""
    epochs = results.get("constant_epochs")
    steps = results.get("constant_steps")
    budgets = results.get("epoch_budgets")
    names = {role: roles.get(role, role) for role in ROLES}
    return [
        _lr_claim("lr_rises_at_small_b", epochs, names["constant_epochs"]),
        _lr_claim("lr_flat_at_large_b", epochs, names["constant_epochs"]),
        _accuracy_claim(epochs, names["constant_epochs"]),
        _momentum_claim(epochs, names["constant_epochs"]),
        _steps_claim(steps, names["constant_steps"]),
        _budget_claim(budgets, names["epoch_budgets"]),
    ]


def claims_to_json(claims: list[Claim]) -> str:
    """Deterministic JSON (claim order fixed, NaN written as null)."""
    return json.dumps([_jsonable(asdict(c)) for c in claims], indent=2, ensure_ascii=False) + "\n"


TITLES = {
    "lr_rises_at_small_b": "optimal ε_eff ∝ B at small B (noise-dominated regime)",
    "lr_flat_at_large_b": "optimal ε_eff independent of B at large B (curvature-dominated)",
    "accuracy_flat_then_falls": "constant epoch budget: test accuracy flat at small B, "
    "then falling with B",
    "momentum_only_helps_at_large_b": "Momentum the same as SGD at small B, better at large B",
    "large_batches_lose_at_constant_steps": "constant step budget: the largest batches lose "
    "test accuracy although their training loss is lower or equal",
    "train_optimal_lr_falls_faster": "growing epoch budget: the train-optimal ε_eff falls "
    "faster than the test-optimal one",
}
ROLE_OF = {
    "lr_rises_at_small_b": "constant_epochs",
    "lr_flat_at_large_b": "constant_epochs",
    "accuracy_flat_then_falls": "constant_epochs",
    "momentum_only_helps_at_large_b": "constant_epochs",
    "large_batches_lose_at_constant_steps": "constant_steps",
    "train_optimal_lr_falls_faster": "epoch_budgets",
}


# ---- reading the outputs -----------------------------------------------------------------


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan


def batch_groups(result: StudyResult) -> pd.DataFrame:
    """One row per (series, B) of a batch-size study, from summary.json's groups (keys
    `<series>/B=<B>`), plus the training loss std at the optimum from table.csv."""
    rows = []
    for key, g in result.summary.get("groups", {}).items():
        series, _, b = key.rpartition("/B=")
        rows.append(
            {
                "series": series,
                "batch_size": int(b),
                "metric_mean": _num(g.get("metric_mean")),
                "metric_std": _num(g.get("metric_std")),
                "lr_opt": _num(g.get("lr_opt")),
                "n_seeds": int(g.get("n_seeds") or 0),
                "edge": g.get("edge") or "",
                "regime": g.get("regime") or "",
                "train_loss_mean": _num(g.get("train_loss_at_opt")),
                "train_loss_std": math.nan,
            }
        )
    df = pd.DataFrame(rows, columns=BATCH_COLUMNS)
    t = result.table
    std_col = "final_train_loss_std"
    if t is not None and len(df) and {"series", "batch_size", std_col} <= set(t.columns):
        stds = {
            (str(s), int(b)): float(v)
            for s, b, v in zip(t["series"], t["batch_size"], t[std_col], strict=True)
        }
        df["train_loss_std"] = [
            stds.get((s, int(b)), math.nan)
            for s, b in zip(df["series"], df["batch_size"], strict=True)
        ]
    return df.sort_values(["series", "batch_size"], kind="mergesort").reset_index(drop=True)


BATCH_COLUMNS = [
    "series",
    "batch_size",
    "metric_mean",
    "metric_std",
    "lr_opt",
    "n_seeds",
    "edge",
    "regime",
    "train_loss_mean",
    "train_loss_std",
]


def budget_groups(result: StudyResult) -> pd.DataFrame:
    """One row per (optimizer, budget) of an epoch-budget study."""
    rows = []
    for key, g in result.summary.get("groups", {}).items():
        rows.append(
            {
                "optimizer": key.rpartition("/")[0],
                "budget": _num(g.get("budget")),
                # keys are <optimizer>/<budget>_<unit>
                "unit": key.rpartition("_")[2] if "_" in key.rpartition("/")[2] else "",
                "train_lr_opt": _num(g.get("train_lr_opt")),
                "test_lr_opt": _num(g.get("test_lr_opt")),
                "train_edge": g.get("train_edge") or "",
                "test_edge": g.get("test_edge") or "",
                "n_seeds": int(g.get("n_seeds") or 0),
            }
        )
    df = pd.DataFrame(
        rows,
        columns=[
            "optimizer",
            "budget",
            "unit",
            "train_lr_opt",
            "test_lr_opt",
            "train_edge",
            "test_edge",
            "n_seeds",
        ],
    )
    return df.sort_values(["optimizer", "budget"], kind="mergesort").reset_index(drop=True)


# ---- shared helpers ----------------------------------------------------------------------


def is_accuracy(metric: str) -> bool:
    return "acc" in metric


def fmt_metric(x: float, metric: str) -> str:
    """Accuracies in percent, anything else with 4 significant digits."""
    if not math.isfinite(x):
        return "n/a"
    return f"{100 * x:.2f}%" if is_accuracy(metric) else f"{x:.4g}"


def fmt_diff(x: float, metric: str) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{100 * x:.2f} pp" if is_accuracy(metric) else f"{x:.3g}"


def fmt_b(values: Iterable[int]) -> str:
    return ", ".join(str(int(b)) for b in values)


def _gain(a: float, b: float, direction: str) -> float:
    """How much better a is than b under the metric's direction (positive = a better)."""
    return a - b if direction == "maximize" else b - a


def _tolerance(metric: str, s1: float, s2: float, m1: float, m2: float) -> float:
    """Largest difference of two means (stds s1, s2) still counted as "the same"."""
    pooled = math.sqrt((s1**2 + s2**2) / 2)
    if is_accuracy(metric):
        floor = MIN_DIFF_ACCURACY
    else:
        floor = MIN_DIFF_RELATIVE * max(abs(m1), abs(m2))
    return max(N_STD * pooled, floor)


def _at_edge(rows: pd.DataFrame, nums: dict[str, Any]) -> str:
    """The batch sizes among `rows` whose optimum sits at the lr grid's edge, as text ("" if
    none); recorded in `nums` as edge_batch_sizes."""
    edges = rows[rows["edge"] != ""]
    if not len(edges):
        return ""
    nums["edge_batch_sizes"] = [int(b) for b in edges["batch_size"]]
    return ", ".join(f"{int(r.batch_size)} ({r.edge})" for r in edges.itertuples())


def _slope(b: np.ndarray, lr: np.ndarray) -> float:
    return float(np.polyfit(np.log2(b), np.log2(lr), 1)[0])


def _combine(parts: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """Per-series verdicts -> one: any miss is a miss, all holding is holding, else unknown."""
    verdicts = [v for v, _ in parts.values()]
    if not verdicts:
        return UNKNOWN, "no series with results"
    if FAILS in verdicts:
        verdict = FAILS
    elif all(v == HOLDS for v in verdicts):
        verdict = HOLDS
    else:
        verdict = UNKNOWN
    if len(parts) == 1:
        detail = "; ".join(f"{s}: {text}" for s, (_, text) in parts.items())
    else:
        # Several series: each says its own verdict, so a split result reads as one.
        detail = "; ".join(f"{s} ({v}): {text}" for s, (v, text) in parts.items())
    return verdict, detail


def _per_series(
    g: pd.DataFrame, part: Callable[[str, pd.DataFrame], tuple[str, str, dict[str, Any]]]
) -> tuple[str, str, dict[str, Any]]:
    """Judge each series (optimizer) on its own, then combine: any miss is a miss."""
    parts: dict[str, tuple[str, str]] = {}
    numbers: dict[str, Any] = {}
    for series, sg in g.groupby("series", sort=True):
        verdict, text, nums = part(str(series), sg)
        parts[str(series)] = (verdict, text)
        numbers[str(series)] = nums
    verdict, detail = _combine(parts)
    return verdict, detail, numbers


def _missing(key: str, study: str, why: str) -> Claim:
    return Claim(key, TITLES[key], ROLE_OF[key], study, UNKNOWN, why)


def _groups(key: str, result: StudyResult | None, study: str, kind: str) -> pd.DataFrame | Claim:
    """The study's groups, or a 'cannot tell' claim when it is absent or of the wrong kind."""
    if result is None:
        return _missing(key, study, f"study {study!r} has no results (not run or not analyzed)")
    got = result.summary.get("kind")
    if got != kind:
        why = f"study {study!r} is a {got} study, not a {kind.replace('_', '-')} study"
        return _missing(key, study, why)
    groups = batch_groups(result) if kind == "batch_size" else budget_groups(result)
    if groups.empty:
        return _missing(key, study, f"study {study!r} has no groups in its summary")
    return groups


def _edge_hints(groups: pd.DataFrame) -> list[str]:
    """Best metrics at an optimum on the lr grid's edge may be underestimated."""
    edges = groups[groups["edge"] != ""]
    if edges.empty:
        return []
    where = ", ".join(f"{r.series} B={r.batch_size}" for r in edges.itertuples())
    return [f"the optimum sits at the edge of the lr grid at {where}: a wider grid may do better"]


def _seed_hints(groups: pd.DataFrame) -> list[str]:
    seeds = int(groups["n_seeds"].min()) if len(groups) else 0
    return [f"only {seeds} seed(s) per grid point"] if seeds < FEW_SEEDS else []


# ---- claims on the constant-epoch study ---------------------------------------------------


def _segments(
    g: pd.DataFrame, reg: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, str] | None:
    """Batch sizes (with an optimum) below and at/above B_crit, and how B_crit was placed.
    None when the analysis could not fit it at all."""
    finite = g[np.isfinite(g["lr_opt"])]
    b_crit = reg.get("b_crit")
    if b_crit is not None:
        below = finite[finite["batch_size"] < b_crit]
        return below, finite[finite["batch_size"] >= b_crit], f"B_crit ≈ {b_crit:.3g}"
    if reg.get("slope_below_b_crit") is not None:
        # The fit pinned B_crit above the largest B: ε_opt still grows there.
        return finite, finite.iloc[0:0], "B_crit above the largest batch size"
    if reg.get("slope_above_b_crit") is not None:
        # Pinned below the smallest B: ε_opt does not grow anywhere.
        return finite.iloc[0:0], finite, "B_crit below the smallest batch size"
    return None


def _flat_part(g: pd.DataFrame, reg: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """ε_opt independent of B at and above the fitted B_crit."""
    seg = _segments(g, reg)
    if seg is None:
        return UNKNOWN, f"B_crit not estimated ({reg.get('message') or 'no fit'})", {}
    below, above, placed = seg
    nums: dict[str, Any] = {"b_crit": reg.get("b_crit"), "placed": placed}
    if len(below) >= 2:
        nums["slope_other_side"] = _slope(
            below["batch_size"].to_numpy(float), below["lr_opt"].to_numpy()
        )
    if above.empty:
        all_b = below
        slope_all = (
            _slope(all_b["batch_size"].to_numpy(float), all_b["lr_opt"].to_numpy())
            if len(all_b) >= 2
            else math.nan
        )
        nums["slope_all"] = slope_all
        if where := _at_edge(all_b, nums):
            # A rise made by optima pinned to the grid's edge is the grid's.
            return (
                UNKNOWN,
                f"{placed} (slope over all B {slope_all:.2f}), but the optimum sits at the "
                f"edge of the lr grid at B = {where}",
                nums,
            )
        what = "ε_opt still grows at the largest batch size tried"
        return FAILS, f"{what} ({placed}; slope over all B {slope_all:.2f})", nums
    bs = above["batch_size"].to_numpy(float)
    nums["batch_sizes"] = [int(b) for b in bs]
    if len(above) < MIN_SLOPE_POINTS:
        why = f"only {len(above)} batch size(s) at or above {placed} (needs {MIN_SLOPE_POINTS})"
        return UNKNOWN, why, nums
    slope = _slope(bs, above["lr_opt"].to_numpy())
    nums["slope"] = slope
    span = f"B = {int(bs.min())} to {int(bs.max())}"
    seeds = int(above["n_seeds"].min())
    if seeds < MIN_SEEDS:
        return UNKNOWN, f"slope {slope:.2f} over {span}, from {seeds} seed(s) only", nums
    if where := _at_edge(above, nums):
        return (
            UNKNOWN,
            f"slope {slope:.2f} over {span}, but the optimum sits at the edge of the lr grid "
            f"at B = {where}, so the slope is only bounded",
            nums,
        )
    verdict = HOLDS if abs(slope) <= SLOPE_FLAT_MAX else FAILS
    sign = "" if verdict == HOLDS else "not "
    want = f"near 0: |slope| ≤ {SLOPE_FLAT_MAX:.2g}"
    return verdict, f"slope {slope:.2f} over {span} ({placed}; {sign}{want})", nums


def _rise_part(
    g: pd.DataFrame, reg: dict[str, Any], metric: str, direction: str
) -> tuple[str, str, dict[str, Any]]:
    """ε_opt ∝ B over the noise-dominated region: the smallest batch sizes whose best test
    metric is flat (the same as the best, within the seeds' spread)."""
    nums: dict[str, Any] = {
        "b_crit": reg.get("b_crit"),
        "slope_below_b_crit": reg.get("slope_below_b_crit"),
    }
    acc = g[np.isfinite(g["metric_mean"])]
    if len(acc) < MIN_BATCH_SIZES:
        return UNKNOWN, f"only {len(acc)} batch size(s) with a result", nums
    few = acc[(acc["n_seeds"] < MIN_SEEDS) | ~np.isfinite(acc["metric_std"])]
    if len(few):
        why = f"no seed std at B = {fmt_b(few['batch_size'])} (single seed): no flat region"
        return UNKNOWN, why, nums
    flat = _flat_region(acc, metric, direction)
    nums["flat_batch_sizes"] = flat
    part = g[g["batch_size"].isin(flat) & np.isfinite(g["lr_opt"])]
    if len(part) < MIN_SLOPE_POINTS:
        where = f"B = {fmt_b(flat)}" if flat else "no batch size"
        return (
            UNKNOWN,
            f"the test metric is flat over {where} only: no noise-dominated region of "
            f"≥{MIN_SLOPE_POINTS} batch sizes to measure the slope over",
            nums,
        )
    bs = part["batch_size"].to_numpy(float)
    slope = _slope(bs, part["lr_opt"].to_numpy())
    nums["slope"] = slope
    span = f"B = {int(bs.min())} to {int(bs.max())} (flat test metric)"
    if where := _at_edge(part, nums):
        return (
            UNKNOWN,
            f"slope {slope:.2f} over {span}, but the optimum sits at the edge of the lr grid "
            f"at B = {where}, so the slope is only bounded",
            nums,
        )
    lo, hi = SLOPE_PROPORTIONAL
    verdict = HOLDS if lo <= slope <= hi else FAILS
    sign = "" if verdict == HOLDS else "not "
    return verdict, f"slope {slope:.2f} over {span}; {sign}near 1: within [{lo:g}, {hi:g}]", nums


def _lr_claim(key: str, result: StudyResult | None, study: str) -> Claim:
    g = _groups(key, result, study, "batch_size")
    if isinstance(g, Claim):
        return g
    summary = result.summary if result is not None else {}
    regimes = summary.get("regimes", {})
    if key == "lr_rises_at_small_b":
        metric, direction = summary["metric"], summary["direction"]
        verdict, detail, numbers = _per_series(
            g, lambda series, sg: _rise_part(sg, regimes.get(series, {}), metric, direction)
        )
    else:
        verdict, detail, numbers = _per_series(
            g, lambda series, sg: _flat_part(sg, regimes.get(series, {}))
        )
    hints = [
        f"{series}: the lr grid does not bracket the optimum everywhere"
        for series, nums in numbers.items()
        if nums.get("edge_batch_sizes")
    ]
    if verdict != HOLDS:
        b = g["batch_size"]
        hints.append(f"batch sizes span {int(b.min())} to {int(b.max())} only")
    return Claim(key, TITLES[key], ROLE_OF[key], study, verdict, detail, numbers, hints)


def _same_as_best(
    g: pd.DataFrame, metric: str, direction: str
) -> Callable[[pd.Series], tuple[bool, float, float]]:
    """r -> (the same as g's best within the tolerance, gap to the best, tolerance)."""
    score = g["metric_mean"] if direction == "maximize" else -g["metric_mean"]
    best = g.loc[score.idxmax()]

    def same(r: pd.Series) -> tuple[bool, float, float]:
        tol = _tolerance(metric, r.metric_std, best.metric_std, r.metric_mean, best.metric_mean)
        gap = _gain(best.metric_mean, r.metric_mean, direction)
        return gap <= tol, gap, tol

    return same


def _flat_region(g: pd.DataFrame, metric: str, direction: str) -> list[int]:
    """The batch sizes, from the smallest up and without a gap, whose best metric is the
    same as the best one (g: one series, sorted by B, finite metrics)."""
    same = _same_as_best(g, metric, direction)
    flat: list[int] = []
    for _, r in g.iterrows():
        if not same(r)[0]:
            break
        flat.append(int(r.batch_size))
    return flat


def _accuracy_part(g: pd.DataFrame, metric: str, direction: str) -> tuple[str, str, dict[str, Any]]:
    g = g[np.isfinite(g["metric_mean"])]
    if len(g) < MIN_BATCH_SIZES:
        return UNKNOWN, f"only {len(g)} batch size(s) with a result", {}
    few = g[(g["n_seeds"] < MIN_SEEDS) | ~np.isfinite(g["metric_std"])]
    if len(few):
        return UNKNOWN, f"no seed std at B = {fmt_b(few['batch_size'])} (single seed)", {}
    score = g["metric_mean"] if direction == "maximize" else -g["metric_mean"]
    best = g.loc[score.idxmax()]
    largest = g.iloc[-1]
    same_as_best = _same_as_best(g, metric, direction)
    flat = len(_flat_region(g, metric, direction))
    _, drop, tol = same_as_best(largest)
    pooled = math.sqrt((largest.metric_std**2 + best.metric_std**2) / 2)
    nums = {
        "best_batch_size": int(best.batch_size),
        "best_mean": best.metric_mean,
        "best_std": best.metric_std,
        "largest_batch_size": int(largest.batch_size),
        "largest_mean": largest.metric_mean,
        "largest_std": largest.metric_std,
        "drop": drop,
        "drop_in_seed_std": drop / pooled if pooled > 0 else math.nan,
        "tolerance": tol,
        "flat_batch_sizes": [int(b) for b in g["batch_size"].iloc[:flat]],
    }
    in_std = f"{nums['drop_in_seed_std']:.1f} seed-std" if pooled > 0 else "seed std 0"
    fall_text = (
        f"best {fmt_metric(best.metric_mean, metric)} at B = {int(best.batch_size)}, "
        f"{fmt_metric(largest.metric_mean, metric)} at B = {int(largest.batch_size)}: "
        f"drop {fmt_diff(drop, metric)} ({in_std}; tolerance {fmt_diff(tol, metric)})"
    )
    flat_text = (
        f"flat (the same as the best) for B = {fmt_b(nums['flat_batch_sizes'])}"
        if flat
        else f"already {fmt_diff(same_as_best(g.iloc[0])[1], metric)} below the best at the "
        f"smallest B = {int(g.iloc[0].batch_size)}"
    )
    falls = drop > tol
    verdict = HOLDS if flat >= MIN_FLAT_POINTS and falls else FAILS
    if flat >= len(g):
        flat_text = f"flat over every B ({fmt_b(g['batch_size'])})"
    elif flat < MIN_FLAT_POINTS and flat:
        flat_text += f" only (needs {MIN_FLAT_POINTS} batch sizes)"
    if not falls:
        fall_text += ", within the tolerance: no fall"
    return verdict, f"{flat_text}; {fall_text}", nums


def _accuracy_claim(result: StudyResult | None, study: str) -> Claim:
    key = "accuracy_flat_then_falls"
    g = _groups(key, result, study, "batch_size")
    if isinstance(g, Claim):
        return g
    summary = result.summary if result is not None else {}
    metric, direction = summary["metric"], summary["direction"]
    verdict, detail, per = _per_series(g, lambda _, sg: _accuracy_part(sg, metric, direction))
    numbers: dict[str, Any] = {"metric": metric, **per}
    hints = _seed_hints(g) + _edge_hints(g) if verdict != HOLDS else []
    if verdict == FAILS:
        hints.append(f"the largest batch size tried is {int(g['batch_size'].max())}")
    return Claim(key, TITLES[key], ROLE_OF[key], study, verdict, detail, numbers, hints)


def _momentum_claim(result: StudyResult | None, study: str) -> Claim:
    key = "momentum_only_helps_at_large_b"
    g = _groups(key, result, study, "batch_size")
    if isinstance(g, Claim):
        return g
    summary = result.summary if result is not None else {}
    metric, direction = summary["metric"], summary["direction"]

    def claim(verdict: str, detail: str, numbers: dict | None = None, hints=()) -> Claim:
        return Claim(
            key, TITLES[key], ROLE_OF[key], study, verdict, detail, numbers or {}, list(hints)
        )

    series = set(g["series"])
    if not {SGD, MOMENTUM} <= series:
        return claim(UNKNOWN, f"needs series {SGD!r} and {MOMENTUM!r}, has {sorted(series)}")
    g = g[np.isfinite(g["metric_mean"])]
    sgd = g[g["series"] == SGD].set_index("batch_size")
    mom = g[g["series"] == MOMENTUM].set_index("batch_size")
    common = sorted(set(sgd.index) & set(mom.index))
    need = MOMENTUM_SMALL_POINTS + MOMENTUM_LARGE_POINTS
    if len(common) < need:
        why = f"only {len(common)} batch size(s) with results for both (needs {need})"
        return claim(UNKNOWN, why)
    few = [
        b
        for b in common
        if min(sgd.at[b, "n_seeds"], mom.at[b, "n_seeds"]) < MIN_SEEDS
        or not (math.isfinite(sgd.at[b, "metric_std"]) and math.isfinite(mom.at[b, "metric_std"]))
    ]
    if few:
        return claim(UNKNOWN, f"no seed std at B = {fmt_b(few)} (single seed)")
    rows = []
    for b in common:
        s, m = sgd.loc[b], mom.loc[b]
        tol = _tolerance(metric, s.metric_std, m.metric_std, s.metric_mean, m.metric_mean)
        rows.append(
            {
                "batch_size": int(b),
                "sgd_mean": s.metric_mean,
                "sgd_std": s.metric_std,
                "momentum_mean": m.metric_mean,
                "momentum_std": m.metric_std,
                "momentum_advantage": _gain(m.metric_mean, s.metric_mean, direction),
                "tolerance": tol,
            }
        )
    # The paper: the same at small B (noise-dominated for both), Momentum ahead at large B.
    small, large = common[:MOMENTUM_SMALL_POINTS], common[-MOMENTUM_LARGE_POINTS:]
    by_b = {r["batch_size"]: r for r in rows}
    better_small = [b for b in small if by_b[b]["momentum_advantage"] > by_b[b]["tolerance"]]
    worse_small = [b for b in small if by_b[b]["momentum_advantage"] < -by_b[b]["tolerance"]]
    not_ahead = [b for b in large if by_b[b]["momentum_advantage"] <= by_b[b]["tolerance"]]

    def adv(bs: list[int]) -> str:
        return ", ".join(
            f"B={b}: {fmt_diff(by_b[b]['momentum_advantage'], metric)} "
            f"(tolerance {fmt_diff(by_b[b]['tolerance'], metric)})"
            for b in bs
        )

    text = f"Momentum minus SGD at the smallest {adv(small)}; at the largest {adv(large)}"
    if better_small:
        text += f"; Momentum is better already at B = {fmt_b(better_small)}"
    if worse_small:
        text += f"; SGD is better at B = {fmt_b(worse_small)}"
    if not_ahead:
        text += f"; no Momentum advantage at B = {fmt_b(not_ahead)}"
    verdict = HOLDS if not better_small and not worse_small and not not_ahead else FAILS
    hints = _seed_hints(g) + _edge_hints(g) if verdict != HOLDS else []
    if verdict != HOLDS and not_ahead:
        hints.append(
            f"B = {fmt_b(not_ahead)} may not be far enough into the curvature-dominated regime"
        )
    numbers = {
        "metric": metric,
        "small_batch_sizes": [int(b) for b in small],
        "large_batch_sizes": [int(b) for b in large],
        "rows": rows,
    }
    return claim(verdict, text, numbers, hints)


# ---- constant-step study ------------------------------------------------------------------


def _steps_part(g: pd.DataFrame, metric: str, direction: str) -> tuple[str, str, dict[str, Any]]:
    g = g[np.isfinite(g["metric_mean"])]
    if len(g) < MIN_BATCH_SIZES:
        return UNKNOWN, f"only {len(g)} batch size(s) with a result", {}
    few = g[(g["n_seeds"] < MIN_SEEDS) | ~np.isfinite(g["metric_std"])]
    if len(few):
        return UNKNOWN, f"no seed std at B = {fmt_b(few['batch_size'])} (single seed)", {}
    score = g["metric_mean"] if direction == "maximize" else -g["metric_mean"]
    best, largest = g.loc[score.idxmax()], g.iloc[-1]
    tol = _tolerance(
        metric, best.metric_std, largest.metric_std, best.metric_mean, largest.metric_mean
    )
    drop = _gain(best.metric_mean, largest.metric_mean, direction)
    tl_best, tl_large = best.train_loss_mean, largest.train_loss_mean
    s_best = best.train_loss_std if math.isfinite(best.train_loss_std) else 0.0
    s_large = largest.train_loss_std if math.isfinite(largest.train_loss_std) else 0.0
    # Training loss "lower or equal": above the best B's by no more than the same kind of
    # tolerance as the test metric (a loss: relative floor).
    tl_tol = _tolerance("final_train_loss", s_best, s_large, tl_best, tl_large)
    nums = {
        "best_batch_size": int(best.batch_size),
        "best_mean": best.metric_mean,
        "best_std": best.metric_std,
        "largest_batch_size": int(largest.batch_size),
        "largest_mean": largest.metric_mean,
        "largest_std": largest.metric_std,
        "drop": drop,
        "tolerance": tol,
        "train_loss_best_b": tl_best,
        "train_loss_largest_b": tl_large,
        "train_loss_tolerance": tl_tol,
        # Context, not the verdict (which is the largest B's): every B above the best one.
        "above_best": [
            {
                "batch_size": int(r.batch_size),
                "drop": _gain(best.metric_mean, r.metric_mean, direction),
                "tolerance": _tolerance(
                    metric, best.metric_std, r.metric_std, best.metric_mean, r.metric_mean
                ),
                "train_loss": r.train_loss_mean,
            }
            for r in g[g["batch_size"] > best.batch_size].itertuples()
        ],
    }
    acc = (
        f"{fmt_metric(best.metric_mean, metric)} ± {fmt_diff(best.metric_std, metric)} at "
        f"B = {int(best.batch_size)} vs {fmt_metric(largest.metric_mean, metric)} ± "
        f"{fmt_diff(largest.metric_std, metric)} at the largest B = {int(largest.batch_size)} "
        f"(drop {fmt_diff(drop, metric)}, tolerance {fmt_diff(tol, metric)})"
    )
    if best.batch_size == largest.batch_size:
        top = f"{fmt_metric(best.metric_mean, metric)} ± {fmt_diff(best.metric_std, metric)}"
        return FAILS, f"the largest B = {int(best.batch_size)} has the best result ({top})", nums
    if not (math.isfinite(tl_best) and math.isfinite(tl_large)):
        return UNKNOWN, f"{acc}; no training loss at the optimum to compare", nums
    loss = f"training loss {tl_large:.4g} at the largest B vs {tl_best:.4g} at B = {int(best.batch_size)}"
    others = [r for r in nums["above_best"] if r["batch_size"] != int(largest.batch_size)]
    if others:
        loss += (
            " (between them: "
            + ", ".join(
                f"B = {r['batch_size']}: drop {fmt_diff(r['drop'], metric)}, training loss "
                f"{r['train_loss']:.4g}"
                for r in others
            )
            + ")"
        )
    if drop <= tol:
        return FAILS, f"{acc}: no loss of test accuracy; {loss}", nums
    if tl_large <= tl_best + tl_tol:
        return (
            HOLDS,
            f"{acc}; {loss} (lower or equal: within {tl_tol:.4g}, the seeds' spread)",
            nums,
        )
    # The largest B also trains worse: the test drop may be under-training, not a
    # generalization gap, so the data cannot separate the two.
    return UNKNOWN, f"{acc}, but {loss} is higher: not a generalization gap alone", nums


def _steps_claim(result: StudyResult | None, study: str) -> Claim:
    key = "large_batches_lose_at_constant_steps"
    g = _groups(key, result, study, "batch_size")
    if isinstance(g, Claim):
        return g
    summary = result.summary if result is not None else {}
    metric, direction = summary["metric"], summary["direction"]
    verdict, detail, per = _per_series(g, lambda _, sg: _steps_part(sg, metric, direction))
    numbers: dict[str, Any] = {"metric": metric, **per}
    hints = _seed_hints(g) + _edge_hints(g) if verdict != HOLDS else []
    if verdict != HOLDS:
        hints.append(
            f"the largest batch size tried is {int(g['batch_size'].max())}; the paper needed "
            "very large batches (B ≥ 16384 for the Wide-ResNet) to see the drop"
        )
    return Claim(key, TITLES[key], ROLE_OF[key], study, verdict, detail, numbers, hints)


# ---- epoch-budget study -------------------------------------------------------------------


def _budget_part(g: pd.DataFrame) -> tuple[str, str, dict[str, Any]]:
    g = g[np.isfinite(g["train_lr_opt"]) & np.isfinite(g["test_lr_opt"])]
    if len(g) < 2:
        return UNKNOWN, f"only {len(g)} budget(s) with both optima", {}
    first, last = g.iloc[0], g.iloc[-1]
    span = last.budget / first.budget
    train_fall = first.train_lr_opt / last.train_lr_opt
    test_fall = first.test_lr_opt / last.test_lr_opt
    extra = math.log2(train_fall) - math.log2(test_fall)
    nums = {
        "budgets": [float(b) for b in g["budget"]],
        "budget_span": span,
        "train_lr_fall": train_fall,
        "test_lr_fall": test_fall,
        "extra_fall_octaves": extra,
    }
    unit = f" {first.unit}" if first.unit else ""
    text = (
        f"budget ×{span:g} ({first.budget:g} to {last.budget:g}{unit}): test-optimal ε_eff "
        f"{_times(test_fall)}, train-optimal {_times(train_fall)}"
    )
    if span < MIN_BUDGET_SPAN:
        return UNKNOWN, f"{text}; budgets span under {MIN_BUDGET_SPAN:g}x", nums
    seeds = int(g["n_seeds"].min())
    if seeds < MIN_SEEDS:
        return UNKNOWN, f"{text}; from {seeds} seed(s) only", nums
    verdict = HOLDS if extra >= MIN_EXTRA_FALL_OCTAVES else FAILS

    # An optimum at a grid edge makes that fall a bound: only a bound that could flip the
    # verdict makes it untellable.
    def bound(prefix: str) -> str:
        e_first, e_last = first[f"{prefix}_edge"], last[f"{prefix}_edge"]
        lower = e_last == "low" or e_first == "high"  # the true fall could be larger
        upper = e_last == "high" or e_first == "low"  # ... or smaller
        return "both" if lower and upper else "lower" if lower else "upper" if upper else ""

    tb, sb = bound("train"), bound("test")
    nums["train_fall_bound"], nums["test_fall_bound"] = tb, sb
    risky = (
        (tb in ("upper", "both") or sb in ("lower", "both"))
        if verdict == HOLDS
        else (tb in ("lower", "both") or sb in ("upper", "both"))
    )
    if risky:
        return (
            UNKNOWN,
            f"{text}, but an optimum at the edge of the lr grid makes a fall only a bound "
            f"(train: {tb or 'exact'}, test: {sb or 'exact'})",
            nums,
        )
    return verdict, f"{text}: the train-optimal falls {extra:.2g} octave(s) more", nums


def _times(fall: float) -> str:
    if math.isclose(fall, 1.0):
        return "unchanged"
    return f"{fall:.3g}× lower" if fall > 1 else f"{1 / fall:.3g}× higher"


def _budget_claim(result: StudyResult | None, study: str) -> Claim:
    key = "train_optimal_lr_falls_faster"
    g = _groups(key, result, study, "epoch_budget")
    if isinstance(g, Claim):
        return g
    parts: dict[str, tuple[str, str]] = {}
    numbers: dict[str, Any] = {}
    for optimizer, og in g.groupby("optimizer", sort=True):
        verdict, text, nums = _budget_part(og)
        parts[str(optimizer)] = (verdict, text)
        numbers[str(optimizer)] = nums
    verdict, detail = _combine(parts)
    hints = _seed_hints(g) if verdict != HOLDS else []
    if verdict != HOLDS:
        span = g["budget"].max() / g["budget"].min()
        hints.append(
            f"the budgets span {span:g}x (the paper: 128x; at small scale a split needs well "
            "over 16x)"
        )
    return Claim(key, TITLES[key], ROLE_OF[key], study, verdict, detail, numbers, hints)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        # 6 significant digits: last-bit float noise (a slope of 5.7e-17) is not a result.
        return float(f"{x:.6g}") if math.isfinite(x) else None
    return x
