"""Figures (PNG) and the CSV behind each one, so `dvc plots` can draw the same data.

Uses `matplotlib.figure.Figure` directly rather than pyplot: no global backend or
figure state, so it runs headless and inside other programs unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from analysis.regimes import Regimes, predict
from analysis.tables import TRAIN_METRIC

B_LABEL = "batch size B (examples per update)"
LR_LABEL = "effective learning rate ε_eff = ε / (1 − m)"
DPI = 120


def _label(metric: str) -> str:
    return metric.replace("final_", "final ").replace("_", " ")


def _colors(series: list[str]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {s: palette[i % len(palette)] for i, s in enumerate(series)}


def _save(fig: Figure, data: pd.DataFrame, out_dir: Path, name: str) -> list[Path]:
    png, csv = out_dir / f"{name}.png", out_dir / f"{name}.csv"
    fig.tight_layout()
    fig.savefig(png, dpi=DPI)
    data.to_csv(csv, index=False)
    return [png, csv]


def _log2_axis(ax, axis: str) -> None:
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)


def best_metric_vs_batch(t: pd.DataFrame, title: str, out_dir: Path) -> list[Path]:
    metric, rule = t["metric"].iloc[0], t["selection"].iloc[0]
    colors = _colors(sorted(t["series"].unique()))
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for series, s in t.groupby("series"):
        ax.errorbar(
            s["batch_size"],
            s["metric_mean"],
            yerr=s["metric_std"].fillna(0),
            marker="o",
            capsize=3,
            color=colors[series],
            label=series,
        )
    _log2_axis(ax, "x")
    ax.set_xlabel(B_LABEL)
    ax.set_ylabel(f"best {_label(metric)} (mean ± std over seeds)")
    ax.set_title(f"{title}: best {_label(metric)} vs batch size [{rule}]")
    ax.grid(alpha=0.3)
    ax.legend(title="optimizer")
    cols = ["selection", "series", "batch_size", "metric", "metric_mean", "metric_std"]
    return _save(fig, t[cols], out_dir, "best_metric_vs_batch")


def optimal_lr_vs_batch(
    t: pd.DataFrame, regimes: dict[str, Regimes], title: str, out_dir: Path
) -> list[Path]:
    rule = t["selection"].iloc[0]
    colors = _colors(sorted(t["series"].unique()))
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    rows = []
    for series, s in t.groupby("series"):
        s = s[np.isfinite(s["lr_opt"])]
        reg = regimes.get(series)
        fit = reg.fit if reg is not None else None
        yerr = np.vstack([s["lr_opt"] - s["lr_lo"], s["lr_hi"] - s["lr_opt"]])
        ax.errorbar(
            s["batch_size"],
            s["lr_opt"],
            yerr=yerr,
            marker="o",
            linestyle="none",
            capsize=3,
            color=colors[series],
            label=f"{series}: optimal ε_eff (range)",
        )
        fitted = predict(fit, s["batch_size"]) if fit is not None else np.full(len(s), np.nan)
        if fit is not None and len(s):
            bb = np.geomspace(s["batch_size"].min(), s["batch_size"].max(), 100)
            label = f"{series}: fit ε_max/(1+B_crit/B)"
            if reg is not None and reg.b_crit is not None:
                label += f", B_crit≈{reg.b_crit:.3g}"
            ax.plot(bb, predict(fit, bb), color=colors[series], label=label)
        if reg is not None and reg.b_simple is not None:
            ax.axvline(
                reg.b_simple,
                color=colors[series],
                linestyle=":",
                label=f"{series}: measured B_simple≈{reg.b_simple:.3g}",
            )
        for r, f in zip(s.itertuples(), fitted, strict=True):
            rows.append(
                {
                    "selection": rule,
                    "series": series,
                    "batch_size": r.batch_size,
                    "lr_opt": r.lr_opt,
                    "lr_lo": r.lr_lo,
                    "lr_hi": r.lr_hi,
                    "lr_fit": f,
                    "b_simple": reg.b_simple if reg is not None else np.nan,
                }
            )
    finite = t[np.isfinite(t["lr_opt"])]
    if len(finite):
        # Slope-1 guide (ε_opt ∝ B, the noise-dominated prediction) through the smallest B.
        b0 = finite.loc[finite["batch_size"].idxmin()]
        bb = np.geomspace(finite["batch_size"].min(), finite["batch_size"].max(), 2)
        ax.plot(bb, b0["lr_opt"] * bb / b0["batch_size"], "k--", lw=1, label="slope 1 (ε ∝ B)")
    _log2_axis(ax, "x")
    _log2_axis(ax, "y")
    ax.set_xlabel(B_LABEL)
    ax.set_ylabel(f"optimal {LR_LABEL}")
    ax.set_title(f"{title}: optimal learning rate vs batch size [{rule}]")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, pd.DataFrame(rows), out_dir, "optimal_lr_vs_batch")


def train_loss_vs_batch(t: pd.DataFrame, title: str, out_dir: Path) -> list[Path]:
    rule = t["selection"].iloc[0]
    mean, std = f"{TRAIN_METRIC}_mean", f"{TRAIN_METRIC}_std"
    colors = _colors(sorted(t["series"].unique()))
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for series, s in t.groupby("series"):
        ax.errorbar(
            s["batch_size"],
            s[mean],
            yerr=s[std].fillna(0),
            marker="o",
            capsize=3,
            color=colors[series],
            label=series,
        )
    _log2_axis(ax, "x")
    if (t[mean] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel(B_LABEL)
    ax.set_ylabel("final training loss at the optimal ε_eff (mean ± std)")
    ax.set_title(f"{title}: training loss at the test-optimal lr [{rule}]")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="optimizer")
    cols = ["selection", "series", "batch_size", mean, std]
    return _save(fig, t[cols], out_dir, "train_loss_vs_batch")


def metric_vs_lr(
    table: pd.DataFrame,
    metric: str,
    group: str,
    group_label: str,
    title: str,
    out_dir: Path,
    name: str = "metric_vs_lr",
) -> list[Path]:
    """The raw grid: mean over seeds at each lr, one curve per `group` value, one panel
    per series. Diverged runs are left out of the mean and counted in the CSV."""
    df = table.assign(_m=table[metric].where(np.isfinite(table[metric])))
    grid = (
        df.groupby(["series", group, "lr_eff"])
        .agg(
            mean=("_m", "mean"),
            std=("_m", "std"),
            n=("run_id", "size"),
            n_diverged=("diverged", "sum"),
        )
        .reset_index()
        .rename(columns={"mean": f"{metric}_mean", "std": f"{metric}_std"})
    )
    series = sorted(grid["series"].unique())
    fig = Figure(figsize=(5.2 * len(series), 4.4))
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, name_s in zip(axes, series, strict=True):
        s = grid[grid["series"] == name_s]
        values = sorted(s[group].unique())
        # One colour ramp per panel: small to large batch size (or budget) reads in order.
        colors = [colormaps["viridis"](x) for x in np.linspace(0, 0.9, len(values))]
        for v, c in zip(values, colors, strict=True):
            g = s[s[group] == v]
            ax.plot(g["lr_eff"], g[f"{metric}_mean"], marker="o", ms=3, color=c, label=f"{v:g}")
        _log2_axis(ax, "x")
        ax.set_xlabel(LR_LABEL)
        ax.set_ylabel(f"{_label(metric)} (mean over seeds)")
        ax.set_title(f"{title}: {name_s} (raw grid, mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(title=group_label, fontsize=7)
    return _save(fig, grid, out_dir, name)


def lr_vs_budget(t: pd.DataFrame, title: str, out_dir: Path) -> list[Path]:
    rule, metric = t["selection"].iloc[0], t["metric"].iloc[0]
    unit = t["budget_unit"].iloc[0]
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    for i, (optimizer, s) in enumerate(t.groupby("optimizer")):
        for prefix, marker, what in (
            ("train", "s", f"minimum {_label(TRAIN_METRIC)}"),
            ("test", "o", f"best {_label(metric)}"),
        ):
            opt = s[f"{prefix}_lr_opt"]
            yerr = np.vstack([opt - s[f"{prefix}_lr_lo"], s[f"{prefix}_lr_hi"] - opt])
            ax.errorbar(
                s["budget_value"],
                opt,
                yerr=yerr,
                marker=marker,
                capsize=3,
                color=f"C{i}",
                linestyle="-" if prefix == "test" else "--",
                label=f"{optimizer}: {what}",
            )
    _log2_axis(ax, "x")
    _log2_axis(ax, "y")
    ax.set_xlabel(f"budget ({unit})")
    ax.set_ylabel(f"optimal {LR_LABEL}")
    ax.set_title(f"{title}: train- vs test-optimal lr vs budget [{rule}]")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    cols = ["selection", "optimizer", "budget_unit", "budget_value", "batch_size"]
    cols += [
        f"{p}_{c}" for p in ("train", "test") for c in ("lr_opt", "lr_lo", "lr_hi", "lr_ratio")
    ]
    return _save(fig, t[cols].assign(series=t["optimizer"]), out_dir, "lr_vs_budget")


def noise_scale_vs_progress(curve: pd.DataFrame, title: str, out_dir: Path) -> list[Path]:
    """Measured B_simple along training, one line per run, a colour per optimizer."""
    colors = _colors(sorted(curve["optimizer"].unique()))
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    labelled: set[str] = set()
    # Runs drawn in the order of what they are (not of their random MLflow ids), so that a
    # new study of the same runs draws the same figure, to the byte.
    for (optimizer, *_), run in curve.groupby(["optimizer", "seed", "lr_eff", "run_id"]):
        label = None if optimizer in labelled else optimizer
        labelled.add(optimizer)
        ax.plot(run["progress"], run["grad_noise_scale"], marker="o", ms=3,
                color=colors[optimizer], alpha=0.8, label=label)  # fmt: skip
    ax.set_yscale("log", base=2)
    ax.set_xlabel("fraction of the training budget")
    ax.set_ylabel("measured B_simple = tr(Σ)/|G|²")
    ax.set_title(f"{title}: gradient noise scale along training (one line per run)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="optimizer")
    data = curve.drop(columns="run_id")
    # One line per run in `dvc plots show` too (its templates colour by `series`).
    data.insert(0, "series", data["optimizer"] + " seed " + data["seed"].astype(str))
    return _save(fig, data, out_dir, "noise_scale_vs_progress")


def two_regimes(
    lr: pd.DataFrame,
    best: pd.DataFrame,
    fits: dict[str, tuple[float, float] | None],
    b_simple: dict[str, float],
    title: str,
    out_dir: Path,
    name: str = "two_regimes",
) -> list[Path]:
    """The study's result in one figure: left, the optimal ε_eff vs B of each optimizer with
    the fit ε_max/(1 + B_crit/B), the slope-1 guide and the measured B_simple; right, the
    best test metric vs B. `lr` and `best` are a batch-size study's optimal_lr_vs_batch.csv
    and best_metric_vs_batch.csv; `fits` maps a series to (B_crit, ε_max) when fitted."""
    series = sorted(lr["series"].unique())
    colors = _colors(series)
    fig = Figure(figsize=(12.0, 4.8))
    left, right = fig.subplots(1, 2)
    rows = []
    for s in series:
        d = lr[(lr["series"] == s) & np.isfinite(lr["lr_opt"])]
        yerr = np.vstack([d["lr_opt"] - d["lr_lo"], d["lr_hi"] - d["lr_opt"]])
        left.errorbar(d["batch_size"], d["lr_opt"], yerr=yerr, marker="o", linestyle="none",
                      capsize=3, color=colors[s], label=f"{s}: optimal ε_eff")  # fmt: skip
        fit = fits.get(s)
        if fit is not None and len(d):
            b_crit, eps_max = fit
            bb = np.geomspace(d["batch_size"].min(), d["batch_size"].max(), 100)
            left.plot(bb, eps_max / (1.0 + b_crit / bb), color=colors[s],
                      label=f"{s}: fit, B_crit ≈ {b_crit:.3g}")  # fmt: skip
        if s in b_simple:
            left.axvline(b_simple[s], color=colors[s], linestyle=":",
                         label=f"{s}: measured B_simple ≈ {b_simple[s]:.3g}")  # fmt: skip
        m = best[best["series"] == s]
        right.errorbar(m["batch_size"], m["metric_mean"], yerr=m["metric_std"].fillna(0),
                       marker="o", capsize=3, color=colors[s], label=s)  # fmt: skip
        for r in d.itertuples():
            rows.append({"series": s, "batch_size": r.batch_size, "lr_opt": r.lr_opt,
                         "b_crit": fit[0] if fit else np.nan,
                         "eps_max": fit[1] if fit else np.nan,
                         "b_simple": b_simple.get(s, np.nan)})  # fmt: skip
    finite = lr[np.isfinite(lr["lr_opt"])]
    if len(finite):
        b0 = finite.loc[finite["batch_size"].idxmin()]
        bb = np.geomspace(finite["batch_size"].min(), finite["batch_size"].max(), 2)
        left.plot(bb, b0["lr_opt"] * bb / b0["batch_size"], "k--", lw=1, label="slope 1 (ε ∝ B)")
    for ax in (left, right):
        _log2_axis(ax, "x")
        ax.set_xlabel(B_LABEL)
        ax.grid(alpha=0.3, which="both")
    _log2_axis(left, "y")
    left.set_ylabel(f"optimal {LR_LABEL}")
    left.set_title(f"{title}: noise-dominated (ε ∝ B), then curvature-dominated", fontsize=10)
    left.legend(fontsize=7)
    metric = best["metric"].iloc[0] if len(best) else "metric"
    right.set_ylabel(f"best {_label(metric)} (mean ± std over seeds)")
    right.set_title(f"{title}: best {_label(metric)} vs batch size", fontsize=10)
    right.legend(title="optimizer")
    return _save(fig, pd.DataFrame(rows), out_dir, name)
