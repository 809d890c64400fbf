"""The paper's tables from a tidy run table: batch-size studies and epoch-budget studies.

A study's kind comes from the data: several budgets at a single batch size is an
epoch-budget study; anything else is a batch-size study, with one series per optimizer
(and per budget, when a study mixes budgets and batch sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import numpy as np
import pandas as pd

from analysis.selection import Direction, Rule, build_cube, select

TRAIN_METRIC = "final_train_loss"


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: Direction


def default_objective(table: pd.DataFrame, metric: str | None, direction: str | None) -> Objective:
    """Test accuracy (maximize) when logged, else test loss (minimize); a metric named by
    the caller without a direction is maximized only if it is an accuracy."""
    if metric is None:
        has_acc = "final_test_accuracy" in table and table["final_test_accuracy"].notna().any()
        metric = "final_test_accuracy" if has_acc else "final_test_loss"
    if metric not in table or table[metric].isna().all():
        raise ValueError(f"metric {metric!r} was not logged by any finished run of the study")
    if direction is None:
        direction = "maximize" if "acc" in metric else "minimize"
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction {direction!r} is not one of maximize, minimize")
    return Objective(metric, cast(Direction, direction))


def study_kind(table: pd.DataFrame) -> str:
    n_budgets = len(table[["budget_unit", "budget_value"]].drop_duplicates())
    n_batch = table["batch_size"].nunique()
    return "epoch_budget" if n_budgets > 1 and n_batch == 1 else "batch_size"


def budget_label(unit: str, value: float) -> str:
    return f"{value:g} {unit}"


def series_labels(table: pd.DataFrame) -> pd.Series:
    """Series of a batch-size study: the optimizer, plus the budget when budgets vary."""
    budgets = table[["budget_unit", "budget_value"]].drop_duplicates()
    if len(budgets) == 1:
        return table["optimizer"].astype(str)
    return (
        table["optimizer"].astype(str)
        + " @ "
        + [
            budget_label(u, v)
            for u, v in zip(table["budget_unit"], table["budget_value"], strict=True)
        ]
    )


def _counts(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return df.groupby(by, sort=True).agg(n_runs=("run_id", "size"), n_diverged=("diverged", "sum"))


def batch_size_table(table: pd.DataFrame, objective: Objective, rule: Rule) -> pd.DataFrame:
    """One row per (series, B): best metric mean ± std, optimal lr and range, counts."""
    df = table.assign(series=series_labels(table))
    parts = []
    for series, sdf in df.groupby("series", sort=True):
        cube = build_cube(sdf, "batch_size", objective.metric, objective.direction, (TRAIN_METRIC,))
        sel = select(cube, rule).rename(columns={"group": "batch_size"})
        first = sdf.iloc[0]
        sel.insert(0, "series", series)
        sel.insert(1, "optimizer", first["optimizer"])
        sel.insert(2, "budget_unit", first["budget_unit"])
        sel.insert(3, "budget_value", first["budget_value"])
        parts.append(sel)
    out = pd.concat(parts, ignore_index=True)
    counts = _counts(df, ["series", "batch_size"]).reset_index()
    out = out.merge(counts, on=["series", "batch_size"], how="left")
    out["batch_size"] = out["batch_size"].astype(int)
    out["n_diverged"] = out["n_diverged"].astype(int)
    out.insert(0, "selection", rule)
    out.insert(1, "metric", objective.metric)
    out.insert(2, "direction", objective.direction)
    return out


def epoch_budget_table(table: pd.DataFrame, objective: Objective, rule: Rule) -> pd.DataFrame:
    """One row per (optimizer, budget): the train-optimal lr (minimum final training
    loss) and the test-optimal lr (selection metric), each with its range and its ratio
    to the smallest budget's."""
    parts = []
    for optimizer, odf in table.groupby("optimizer", sort=True):
        train = select(build_cube(odf, "budget_value", TRAIN_METRIC, "minimize"), rule)
        test = select(build_cube(odf, "budget_value", objective.metric, objective.direction), rule)
        part = pd.DataFrame({"optimizer": optimizer, "budget_value": train["group"]})
        part["budget_unit"] = odf["budget_unit"].iloc[0]
        part["batch_size"] = int(odf["batch_size"].iloc[0])
        for prefix, sel in (("train", train), ("test", test)):
            for col in ("lr_opt", "lr_lo", "lr_hi", "edge", "metric_mean", "metric_std"):
                part[f"{prefix}_{col}"] = sel[col].to_numpy()
            base = sel["lr_opt"].iloc[0]
            part[f"{prefix}_lr_ratio"] = sel["lr_opt"].to_numpy() / base
        part["n_seeds"] = test["n_seeds"].to_numpy()
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    counts = _counts(table, ["optimizer", "budget_value"]).reset_index()
    out = out.merge(counts, on=["optimizer", "budget_value"], how="left")
    out["n_diverged"] = out["n_diverged"].astype(int)
    out.insert(0, "selection", rule)
    out.insert(1, "metric", objective.metric)
    out.insert(2, "direction", objective.direction)
    return out


# ---- formatting -------------------------------------------------------------------------


def fmt_exp(x: float) -> str:
    """log2 exponent rounded to 2 decimals, written as an integer when it is one."""
    e = round(math.log2(x), 2)
    return f"2^{int(e)}" if e == int(e) else f"2^{e:g}"


def fmt_lr(opt: float, lo: float, hi: float) -> str:
    """`2^a (2^b to 2^c)`; a dash when there is no optimum (all runs diverged)."""
    if not np.isfinite(opt):
        return "—"
    return f"{fmt_exp(opt)} ({fmt_exp(lo)} to {fmt_exp(hi)})"


def fmt_mean_std(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.4g} ± {std:.2g}" if np.isfinite(std) else f"{mean:.4g} ± n/a"


EDGE_TEXT = {"low": "at lowest lr_eff", "high": "at highest lr_eff", "": ""}


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def batch_size_markdown(t: pd.DataFrame, regimes: dict[tuple[str, int], str]) -> str:
    metric = t["metric"].iloc[0]
    header = [
        "series",
        "B",
        f"best {metric} (mean ± std)",
        "optimal lr_eff",
        "seeds",
        "diverged",
        "edge",
        "regime",
    ]
    rows = [
        [
            str(r.series),
            str(r.batch_size),
            fmt_mean_std(r.metric_mean, r.metric_std),
            fmt_lr(r.lr_opt, r.lr_lo, r.lr_hi),
            str(r.n_seeds),
            str(r.n_diverged),
            EDGE_TEXT[r.edge],
            regimes.get((r.series, r.batch_size), ""),
        ]
        for r in t.itertuples()
    ]
    return markdown(rows, header)


def epoch_budget_markdown(t: pd.DataFrame) -> str:
    metric = t["metric"].iloc[0]
    header = [
        "optimizer",
        "budget",
        "train-optimal lr_eff",
        "ratio",
        f"{TRAIN_METRIC} (mean ± std)",
        f"{metric}-optimal lr_eff",
        "ratio",
        f"{metric} (mean ± std)",
        "seeds",
        "diverged",
        "edge (train / test)",
    ]
    rows = []
    for r in t.itertuples():
        edges = f"{r.train_edge or '-'} / {r.test_edge or '-'}"
        rows.append(
            [
                str(r.optimizer),
                budget_label(r.budget_unit, r.budget_value),
                fmt_lr(r.train_lr_opt, r.train_lr_lo, r.train_lr_hi),
                f"{r.train_lr_ratio:.3g}",
                fmt_mean_std(r.train_metric_mean, r.train_metric_std),
                fmt_lr(r.test_lr_opt, r.test_lr_lo, r.test_lr_hi),
                f"{r.test_lr_ratio:.3g}",
                fmt_mean_std(r.test_metric_mean, r.test_metric_std),
                str(r.n_seeds),
                str(r.n_diverged),
                edges if edges != "- / -" else "",
            ]
        )
    return markdown(rows, header)
