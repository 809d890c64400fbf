"""The gradient noise scale study: B_simple = tr(Σ)/|G|² along training, per optimizer.

Training logs `grad_noise_scale` at every evaluation, estimated over the steps since the
previous one from the micro-batch and full-batch gradients that accumulation computes
(McCandlish et al. 2018; docs/protocol.md). A study whose runs all share one B and one
budget and carry that metric is a noise-scale study. Its number per run is the median of
its windows, which reads the whole run (B_simple grows as the loss falls) without letting
the first window, taken from a random initialisation, or the last one dominate; per
optimizer, the median over its runs and their range. This is what the report sets beside
each optimizer's fitted B_crit of the constant-epoch study.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sgdnoise import contract as C

METRIC = C.GRAD_NOISE_SCALE


def is_noise_scale_study(table: pd.DataFrame) -> bool:
    """One B, one budget, and a measured noise scale in every run that did not diverge."""
    if table["batch_size"].nunique() != 1:
        return False
    if len(table[["budget_unit", "budget_value"]].drop_duplicates()) != 1:
        return False
    ok = table[~table["diverged"]]
    return METRIC in table and len(ok) > 0 and bool(np.isfinite(ok[METRIC]).all())


def curves(table: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """history (run_id, step, value) joined to the runs: one row per window, with the
    optimizer, seed, lr and the progress step / total_steps in (0, 1]."""
    runs = table[~table["diverged"]].set_index("run_id")
    h = history[history["run_id"].isin(runs.index) & np.isfinite(history["value"])]
    h = h[h["value"] > 0]
    out = h.join(runs[["optimizer", "seed", "lr_eff", "total_steps"]], on="run_id")
    out["progress"] = out["step"] / out["total_steps"]
    out = out.rename(columns={"value": METRIC})
    cols = ["optimizer", "seed", "lr_eff", "run_id", "step", "progress", METRIC]
    return out[cols].sort_values(["optimizer", "seed", "lr_eff", "step"], kind="mergesort")


def summarize(table: pd.DataFrame, curve: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer: B_simple (median over runs of each run's median window), its range
    over runs, the runs and windows behind it, and the batch sizes it was measured at."""
    per_run = curve.groupby(["optimizer", "run_id"])[METRIC].median().rename("run_median")
    rows = []
    for optimizer, values in per_run.groupby(level="optimizer", sort=True):
        runs = table[table["optimizer"] == optimizer]
        rows.append(
            {
                "optimizer": optimizer,
                "b_simple": float(np.median(values)),
                "b_simple_lo": float(values.min()),
                "b_simple_hi": float(values.max()),
                "n_runs": int(len(values)),
                "n_windows": int((curve["optimizer"] == optimizer).sum()),
                "batch_size": int(runs["batch_size"].iloc[0]),
                "micro_batch_size": _int_or_none(runs["micro_batch_size"].iloc[0]),
                "lr_eff": float(runs["lr_eff"].iloc[0]),
            }
        )
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame) -> str:
    lines = [
        "| optimizer | measured B_simple (median over runs) | range over runs | runs | "
        "windows | B | micro-batch | ε_eff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.optimizer} | {r.b_simple:.3g} | {r.b_simple_lo:.3g} to {r.b_simple_hi:.3g} "
            f"| {r.n_runs} | {r.n_windows} | {r.batch_size} | {r.micro_batch_size} "
            f"| {r.lr_eff:g} |"
        )
    return "\n".join(lines)


def _int_or_none(x: float) -> int | None:
    return int(x) if pd.notna(x) else None
