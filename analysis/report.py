"""`analyze`: one study's runs -> table.md/csv, summary.json, figures + CSVs.

What the CLI's `analyze` command calls (the CLI then logs the files to the study's parent
run: this library only reads MLflow). Every output names the selection rule, because
the paper's bracket rule is not confirmed and the two rules can disagree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from analysis import figures, noise
from analysis.query import load_study, metric_history
from analysis.regimes import Regimes, b_simple, estimate
from analysis.selection import RULES, Rule, build_cube
from analysis.tables import (
    Objective,
    batch_size_markdown,
    batch_size_table,
    budget_label,
    default_objective,
    epoch_budget_markdown,
    epoch_budget_table,
    series_labels,
    study_kind,
)

RULE_TEXT = {
    "per_seed": "per_seed: each seed's best lr; mean ± std of the seeds' best metrics; "
    "median (in log2) of the seeds' optimal lrs, range min to max",
    "mean_curve": "mean_curve: metric averaged over seeds at each lr; the best mean ± its std "
    "over seeds; range = lrs whose mean lies within one std of the best",
}


def analyze(
    study: str,
    *,
    tracking_uri: str,
    experiment: str,
    out_dir: Path | None,
    selection: str = "per_seed",
    metric: str | None = None,
    direction: str | None = None,
) -> dict[str, Any]:
    """Analyze a study and write its results under `out_dir` (None: write nothing, e.g. for
    a notebook that wants the table alone).

    Returns {"summary": <the summary.json content>, "markdown": <table.md text>,
    "table": <table.csv as a DataFrame>, "runs": <the study's runs, one row each>,
    "files": [written paths]}. Raises LookupError when the study is missing and ValueError
    for an unknown selection rule, metric or direction.
    """
    if selection not in RULES:
        raise ValueError(f"selection {selection!r} is not one of {', '.join(RULES)}")
    rule = cast(Rule, selection)
    if direction is not None and direction not in ("maximize", "minimize"):
        raise ValueError(f"direction {direction!r} is not one of maximize, minimize")
    runs = load_study(
        study,
        tracking_uri=tracking_uri,
        experiment=experiment,
        metrics=(metric,) if metric else (),
    )
    table = runs.table
    objective = default_objective(table, metric, direction)
    kind = "noise_scale" if noise.is_noise_scale_study(table) else study_kind(table)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

    summary: dict[str, Any] = {
        "study": study,
        "experiment": experiment,
        "parent_run_id": runs.parent_run_id,
        "kind": kind,
        "selection": selection,
        "metric": objective.metric,
        "direction": objective.direction,
        "n_runs": len(table),
        "n_diverged": int(table["diverged"].sum()),
        "n_duplicates": runs.n_duplicates,
        "notes": "; ".join(runs.notes),
    }
    header = _header(study, experiment, runs.parent_run_id, kind, selection, objective, runs.notes)
    if kind == "noise_scale":
        history = metric_history(tracking_uri, list(table["run_id"]), noise.METRIC)
        body, main, files = _noise_scale(table, history, study, out_dir, summary)
    elif kind == "epoch_budget":
        body, main, files = _epoch_budget(table, objective, rule, study, out_dir, summary)
    else:
        body, main, files = _batch_size(table, objective, rule, study, out_dir, summary)

    text = header + "\n\n" + body + "\n"
    if out_dir is not None:
        files += _write(out_dir, text, main, summary)
    return {"summary": summary, "markdown": text, "table": main, "runs": table, "files": files}


def _header(
    study: str,
    experiment: str,
    parent: str,
    kind: str,
    rule: str,
    objective: Objective,
    notes: list[str],
) -> str:
    lines = [
        f"# Study {study!r} ({kind.replace('_', '-')} study)",
        "",
        f"- experiment: {experiment}, parent run: {parent}",
        f"- selection rule: {RULE_TEXT[rule]}",
        f"- selection metric: {objective.metric} ({objective.direction})",
    ]
    lines += [f"- note: {n}" for n in notes]
    return "\n".join(lines)


def _batch_size(
    table: pd.DataFrame,
    objective: Objective,
    rule: Rule,
    study: str,
    out_dir: Path | None,
    summary: dict[str, Any],
) -> tuple[str, pd.DataFrame, list[Path]]:
    t = batch_size_table(table, objective, rule)
    df = table.assign(series=series_labels(table))
    all_b = np.sort(df["batch_size"].unique())
    regimes: dict[str, Regimes] = {}
    for series, sdf in df.groupby("series", sort=True):
        cube = build_cube(sdf, "batch_size", objective.metric, objective.direction)
        regimes[series] = estimate(series, cube, rule, all_b, b_simple(sdf))
    t["regime"] = [
        regimes[s].regime.get(int(b), "") for s, b in zip(t["series"], t["batch_size"], strict=True)
    ]
    labels = {
        (s, int(b)): r for s, b, r in zip(t["series"], t["batch_size"], t["regime"], strict=True)
    }

    summary["groups"] = {
        f"{r.series}/B={r.batch_size}": _clean(
            {
                "metric_mean": r.metric_mean,
                "metric_std": r.metric_std,
                "lr_opt": r.lr_opt,
                "lr_lo": r.lr_lo,
                "lr_hi": r.lr_hi,
                "n_seeds": r.n_seeds,
                "n_runs": r.n_runs,
                "n_diverged": r.n_diverged,
                "edge": r.edge,
                "regime": r.regime,
                "train_loss_at_opt": r.final_train_loss_mean,
            }
        )
        for r in t.itertuples()
    }
    summary["regimes"] = {
        s: _clean(
            {
                "b_crit": g.b_crit,
                "b_crit_lo": g.b_crit_lo,
                "b_crit_hi": g.b_crit_hi,
                "eps_max": g.eps_max,
                "slope_below_b_crit": g.slope_below,
                "slope_above_b_crit": g.slope_above,
                "b_simple": g.b_simple,
                "n_boot": g.n_boot,
                "message": g.message,
            }
        )
        for s, g in regimes.items()
    }
    title = f"{study}"
    files: list[Path] = []
    if out_dir is not None:
        files += figures.best_metric_vs_batch(t, title, out_dir)
        files += figures.optimal_lr_vs_batch(t, regimes, title, out_dir)
        files += figures.train_loss_vs_batch(t, title, out_dir)
        files += figures.metric_vs_lr(df, objective.metric, "batch_size", "B", title, out_dir)
    body = batch_size_markdown(t, labels) + "\n\n## Regimes\n\n" + _regimes_markdown(regimes)
    return body, t, files


def _regimes_markdown(regimes: dict[str, Regimes]) -> str:
    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.3g}"

    lines = [
        "| series | B_crit | 95% bootstrap interval | ε_max | slope below B_crit "
        "| measured B_simple | not estimated |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, g in regimes.items():
        interval = "—" if g.b_crit_lo is None else f"{g.b_crit_lo:.3g} to {g.b_crit_hi:.3g}"
        lines.append(
            f"| {s} | {num(g.b_crit)} | {interval} | {num(g.eps_max)} | {num(g.slope_below)} "
            f"| {num(g.b_simple)} | {g.message} |"
        )
    return "\n".join(lines)


def _epoch_budget(
    table: pd.DataFrame,
    objective: Objective,
    rule: Rule,
    study: str,
    out_dir: Path | None,
    summary: dict[str, Any],
) -> tuple[str, pd.DataFrame, list[Path]]:
    t = epoch_budget_table(table, objective, rule)
    summary["groups"] = {
        f"{r.optimizer}/{budget_label(r.budget_unit, r.budget_value).replace(' ', '_')}": _clean(
            {
                "budget": r.budget_value,
                "train_lr_opt": r.train_lr_opt,
                "train_lr_lo": r.train_lr_lo,
                "train_lr_hi": r.train_lr_hi,
                "train_lr_ratio": r.train_lr_ratio,
                "train_loss_mean": r.train_metric_mean,
                "train_loss_std": r.train_metric_std,
                "test_lr_opt": r.test_lr_opt,
                "test_lr_lo": r.test_lr_lo,
                "test_lr_hi": r.test_lr_hi,
                "test_lr_ratio": r.test_lr_ratio,
                "metric_mean": r.test_metric_mean,
                "metric_std": r.test_metric_std,
                "n_seeds": r.n_seeds,
                "n_runs": r.n_runs,
                "n_diverged": r.n_diverged,
                "train_edge": r.train_edge,
                "test_edge": r.test_edge,
            }
        )
        for r in t.itertuples()
    }
    df = table.assign(series=table["optimizer"])
    if out_dir is None:
        return epoch_budget_markdown(t), t, []
    files = figures.lr_vs_budget(t, study, out_dir)
    files += figures.metric_vs_lr(
        df, objective.metric, "budget_value", "budget", study, out_dir, name="metric_vs_lr"
    )
    files += figures.metric_vs_lr(
        df, "final_train_loss", "budget_value", "budget", study, out_dir, name="train_loss_vs_lr"
    )
    return epoch_budget_markdown(t), t, files


def _noise_scale(
    table: pd.DataFrame,
    history: pd.DataFrame,
    study: str,
    out_dir: Path | None,
    summary: dict[str, Any],
) -> tuple[str, pd.DataFrame, list[Path]]:
    curve = noise.curves(table, history)
    t = noise.summarize(table, curve)
    summary["groups"] = {r["optimizer"]: _clean(r) for r in t.to_dict("records")}
    files = [] if out_dir is None else figures.noise_scale_vs_progress(curve, study, out_dir)
    text = (
        "Gradient noise scale B_simple = tr(Σ)/|G|², estimated at every evaluation over the "
        "steps since the previous one; per run the median of its windows, per optimizer the "
        "median over runs.\n\n" + noise.markdown(t)
    )
    return text, t, files


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe values: numpy scalars to Python, NaN/inf to null."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def _write(out_dir: Path, text: str, main: pd.DataFrame, summary: dict[str, Any]) -> list[Path]:
    md, csv, js = out_dir / "table.md", out_dir / "table.csv", out_dir / "summary.json"
    md.write_text(text)
    main.to_csv(csv, index=False)
    js.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    headline = out_dir / "metrics.json"
    headline.write_text(json.dumps(headline_metrics(summary), indent=2) + "\n")
    return [md, csv, js, headline]


def headline_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The few numbers `dvc metrics show` prints per study (summary.json holds the rest):
    per series its B_crit with the 95 % interval and its best metric; per optimizer
    of an epoch-budget study the falls of the train- and test-optimal ε_eff; per optimizer
    of a noise-scale study the measured B_simple."""
    kind, groups = summary.get("kind"), summary.get("groups", {})
    out: dict[str, Any] = {"runs": summary.get("n_runs")}
    if kind == "noise_scale":
        for opt, g in groups.items():
            out[opt] = {"B_simple": _round(g.get("b_simple"))}
        return out
    if kind == "epoch_budget":
        by_opt: dict[str, list[dict[str, Any]]] = {}
        for key, g in groups.items():
            by_opt.setdefault(key.rpartition("/")[0], []).append(g)
        for opt, gs in by_opt.items():
            gs = sorted(gs, key=lambda g: g["budget"])
            out[opt] = {
                "train_lr_fall": _fall(gs[0], gs[-1], "train_lr_opt"),
                "test_lr_fall": _fall(gs[0], gs[-1], "test_lr_opt"),
                "best": _round(max((g.get("metric_mean") or -1e300) for g in gs)),
            }
        return out
    sign = 1.0 if summary.get("direction") == "maximize" else -1.0
    for series, r in summary.get("regimes", {}).items():
        mine = [(g["metric_mean"], int(k.rpartition("=")[2])) for k, g in groups.items()
                if k.startswith(f"{series}/B=") and g.get("metric_mean") is not None]  # fmt: skip
        best = max(mine, key=lambda m: sign * m[0]) if mine else (None, None)  # (value, B)
        b_crit = r.get("b_crit")
        crit = None
        if b_crit is not None:
            crit = f"{b_crit:.3g}"
            if r.get("b_crit_lo") is not None:
                crit += f" ({r['b_crit_lo']:.3g}-{r['b_crit_hi']:.3g})"
        out[series] = {"B_crit": crit, "best": _round(best[0])}
    return out


def _fall(first: dict[str, Any], last: dict[str, Any], key: str) -> float | None:
    """How many times lower the optimum is at the longest budget than at the shortest."""
    a, b = first.get(key), last.get(key)
    return _round(a / b) if a and b else None


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")
