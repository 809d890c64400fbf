"""results/REPORT.md and the README's results section, from what `analyze` wrote.

Reads only results/<study>/{summary.json, table.csv, table.md, *.png} and the claims
evaluated on them (analysis.claims). The output depends on those files alone: no dates,
no absolute paths, a fixed order, so a rerun on identical data rewrites identical bytes
and `dvc repro` sees nothing new.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.claims import (
    FAILS,
    HOLDS,
    ROLES,
    THRESHOLDS,
    UNKNOWN,
    VERDICTS,
    Claim,
    StudyResult,
    batch_groups,
    budget_groups,
    claims_to_json,
    evaluate_results,
    load_result,
)
from analysis.figures import two_regimes
from analysis.tables import fmt_exp

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
REPORT_NAME, CLAIMS_NAME, CLAIMS_SUMMARY = "REPORT.md", "claims.json", "claims_summary.json"

ROLE_TEXT = {
    "constant_epochs": "constant epoch budget: every batch size B trains for the same number "
    "of epochs, so the number of updates falls as 1/B",
    "constant_steps": "constant step budget: every batch size takes the same number of "
    "updates, so compute grows with B",
    "epoch_budgets": "epoch-budget sweep at one batch size: for each budget, the ε_eff that "
    "minimizes the final training loss and the one that maximizes the test metric",
}
KIND_TEXT = {
    "batch_size": "batch-size study",
    "epoch_budget": "epoch-budget study",
    "noise_scale": "gradient-noise-scale measurement",
}
ROLE_TEXT["noise_scale"] = (
    "gradient noise scale: B_simple = tr(Σ)/|G|² measured along training from the "
    "micro-batch gradients of gradient accumulation, the theory's estimate of the critical "
    "batch size (McCandlish et al. 2018)"
)
LEAD = "two_regimes"  # the report's first figure, drawn from the constant-epoch study

# Figures `analyze` writes, in reading order, with a caption.
FIGURES = {
    "best_metric_vs_batch": "best test metric vs batch size",
    "optimal_lr_vs_batch": "optimal effective learning rate vs batch size",
    "train_loss_vs_batch": "final training loss at the test-optimal ε_eff vs batch size",
    "lr_vs_budget": "train- and test-optimal ε_eff vs epoch budget",
    "noise_scale_vs_progress": "measured gradient noise scale B_simple along training",
    "metric_vs_lr": "raw grid: test metric vs ε_eff",
    "train_loss_vs_lr": "raw grid: final training loss vs ε_eff",
}
# What the paper predicts each figure shows, per study role.
PAPER_SAYS = {
    ("constant_epochs", "best_metric_vs_batch"): "flat up to B_crit, then falling with B; "
    "SGD and Momentum equal at small B, Momentum ahead at large B",
    ("constant_epochs", "optimal_lr_vs_batch"): "ε_opt ∝ B (the dashed slope-1 guide) below "
    "B_crit, independent of B above it",
    ("constant_epochs", "train_loss_vs_batch"): "no claim; context for the accuracy: fewer "
    "updates at large B under a fixed epoch budget",
    ("constant_steps", "best_metric_vs_batch"): "the largest batches lose test accuracy",
    ("constant_steps", "train_loss_vs_batch"): "the largest batches reach an equal or lower "
    "training loss, so their accuracy loss is a generalization gap",
    ("constant_steps", "optimal_lr_vs_batch"): "ε_opt rises with B, then stops",
    ("epoch_budgets", "lr_vs_budget"): "the train-optimal ε_eff falls steeply with the "
    "budget (16× over 128× more epochs), the test-optimal one barely (2×)",
}
FIGURE_CLAIMS = {
    ("constant_epochs", "best_metric_vs_batch"): (
        "accuracy_flat_then_falls",
        "momentum_only_helps_at_large_b",
    ),
    ("constant_epochs", "optimal_lr_vs_batch"): ("lr_rises_at_small_b", "lr_flat_at_large_b"),
    ("constant_steps", "best_metric_vs_batch"): ("large_batches_lose_at_constant_steps",),
    ("constant_steps", "train_loss_vs_batch"): ("large_batches_lose_at_constant_steps",),
    ("epoch_budgets", "lr_vs_budget"): ("train_optimal_lr_falls_faster",),
}
# The README shows these (copied as <study>_<figure>.png) after the lead figure, and the
# constant-epoch table.
MAIN_FIGURES = {
    "constant_steps": ("best_metric_vs_batch", "train_loss_vs_batch"),
    "epoch_budgets": ("lr_vs_budget",),
}
MAIN_TABLE_ROLE = "constant_epochs"

LEAD_CAPTION = (
    "Left: the optimal effective learning rate at each batch size (markers; bars: the "
    "range over seeds), the fit ε_max/(1 + B_crit/B) per optimizer, the slope-1 guide "
    "(ε_opt ∝ B, the noise-dominated prediction) and the measured gradient noise scale "
    "B_simple (dotted). Right: the best test accuracy at each batch size (mean ± std over "
    "seeds). Constant epoch budget."
)

PAPER_SCALE = (
    "a 16-4 Wide-ResNet on CIFAR-10 for 200 epochs, B from 16 to 16384, several seeds per point"
)


def write_report(
    results_dir: Path,
    studies: list[str],
    *,
    readme: Path | None = None,
    figures_dir: Path | None = None,
    setting: str | None = None,
    roles: Mapping[str, str] = ROLES,
) -> Path:
    """Write results_dir/REPORT.md (and claims.json, the verdicts as data) for `studies`;
    with `readme`, also rewrite its section between BEGIN and END (appended if absent)
    and copy the main figures into `figures_dir` (default: docs/figures next to it).

    `setting`: one line on what was run (dataset, model, budgets), quoted in the report
    when explaining a miss. `roles`: which study plays each of the paper's three studies.
    Returns the REPORT.md path.
    """
    results_dir = Path(results_dir)
    results = {name: load_result(results_dir, name) for name in studies}
    by_role = {role: results.get(name) for role, name in roles.items()}
    claims = evaluate_results(by_role, roles)
    report = results_dir / REPORT_NAME
    results_dir.mkdir(parents=True, exist_ok=True)
    lead = draw_lead(results_dir, by_role)
    report.write_text(render_report(studies, results, claims, roles, setting, lead))
    (results_dir / CLAIMS_NAME).write_text(claims_to_json(claims))
    # The verdicts as counts: what `dvc metrics show` prints for the report.
    tally = {v.replace(" ", "_"): sum(c.verdict == v for c in claims) for v in VERDICTS}
    (results_dir / CLAIMS_SUMMARY).write_text(json.dumps({"claims": tally}, indent=2) + "\n")
    if readme is not None:
        readme = Path(readme)
        figures = Path(figures_dir) if figures_dir is not None else readme.parent / "docs/figures"
        update_readme(readme, figures, results_dir, results, claims, roles, lead)
    return report


# ---- the lead figure and the theory table ---------------------------------------------------


def draw_lead(results_dir: Path, by_role: Mapping[str, StudyResult | None]) -> Path | None:
    """results_dir/two_regimes.png from the constant-epoch study's figure data, with the
    noise-scale study's B_simple marked; None (and no file) without that data."""
    path = results_dir / f"{LEAD}.png"
    main = by_role.get("constant_epochs")
    lr_csv = main.path / "optimal_lr_vs_batch.csv" if main is not None else None
    best_csv = main.path / "best_metric_vs_batch.csv" if main is not None else None
    if main is None or not (lr_csv and lr_csv.is_file() and best_csv and best_csv.is_file()):
        for stale in (path, path.with_suffix(".csv")):
            stale.unlink(missing_ok=True)
        return None
    fits = {}
    for series, r in main.summary.get("regimes", {}).items():
        ok = r.get("b_crit") is not None and r.get("eps_max") is not None
        fits[series] = (float(r["b_crit"]), float(r["eps_max"])) if ok else None
    two_regimes(
        pd.read_csv(lr_csv), pd.read_csv(best_csv), fits, measured_b_simple(by_role),
        main.name, results_dir, name=LEAD,
    )  # fmt: skip
    return path


def measured_b_simple(by_role: Mapping[str, StudyResult | None]) -> dict[str, float]:
    """Per optimizer, the noise-scale study's B_simple (empty without that study)."""
    ns = by_role.get("noise_scale")
    if ns is None or ns.summary.get("kind") != "noise_scale":
        return {}
    groups = ns.summary.get("groups", {})
    return {k: float(g["b_simple"]) for k, g in groups.items() if g.get("b_simple") is not None}


def theory_lines(by_role: Mapping[str, StudyResult | None]) -> list[str]:
    """Markdown: each optimizer's fitted B_crit beside its measured B_simple, with the ratio."""
    main, ns = by_role.get("constant_epochs"), by_role.get("noise_scale")
    if main is None or ns is None or ns.summary.get("kind") != "noise_scale":
        return ["Needs the constant-epoch study and the noise-scale study (`noise_scale`)."]
    groups = ns.summary.get("groups", {})
    lines = [
        "| optimizer | fitted B_crit (95% bootstrap interval) | measured B_simple (range over "
        "runs) | B_crit / B_simple | reading |",
        "|---|---|---|---|---|",
    ]
    for series, r in sorted(main.summary.get("regimes", {}).items()):
        g = groups.get(series, {})
        b_crit, b_simple = r.get("b_crit"), g.get("b_simple")
        crit = "not estimated" if b_crit is None else f"{b_crit:.3g}"
        if b_crit is not None and r.get("b_crit_lo") is not None:
            crit += f" ({r['b_crit_lo']:.3g} to {r['b_crit_hi']:.3g})"
        simple = "not measured" if b_simple is None else f"{b_simple:.3g}"
        if b_simple is not None:
            simple += f" ({g['b_simple_lo']:.3g} to {g['b_simple_hi']:.3g})"
        ratio = "—" if b_crit is None or not b_simple else f"{b_crit / b_simple:.2g}"
        lines.append(f"| {series} | {crit} | {simple} | {ratio} | {_theory_reading(r, g)} |")
    where = groups and next(iter(groups.values()))
    if where:
        lines += [
            "",
            f"B_simple measured at B = {where.get('batch_size')} with micro-batches of "
            f"{where.get('micro_batch_size')}, ε_eff = {where.get('lr_eff'):g}, over the whole "
            "budget (per run the median of its evaluation windows). The theory (McCandlish et "
            "al. 2018) expects B_crit ≈ B_noise, and B_simple ≤ B_noise (equal for a "
            "well-conditioned Hessian): a ratio near 1 agrees, a ratio above 1 is consistent "
            "with it, a ratio well below 1 means the optimal ε_eff stopped growing before the "
            "gradient noise stopped dominating.",
        ]
    return lines


def _theory_reading(regime: dict[str, Any], group: dict[str, Any]) -> str:
    """One phrase per optimizer: how its B_crit and B_simple compare (factor-3 bands)."""
    b_crit, b_simple = regime.get("b_crit"), group.get("b_simple")
    if b_crit is None or not b_simple:
        return "—"
    ratio = b_crit / b_simple
    if ratio < 1 / 3:
        eps = regime.get("eps_max")
        cap = f" (ε_max ≈ {eps:.3g})" if eps is not None else ""
        return (
            "B_crit well below the noise scale: the largest stable ε_eff caps the optimal "
            f"one first{cap}"
        )
    if ratio > 3:
        return "B_crit well above B_simple: consistent (B_simple underestimates B_noise)"
    return "agree within a factor of 3"


# ---- REPORT.md ---------------------------------------------------------------------------


def render_report(
    studies: list[str],
    results: Mapping[str, StudyResult | None],
    claims: list[Claim],
    roles: Mapping[str, str],
    setting: str | None,
    lead: Path | None = None,
) -> str:
    role_of = {name: role for role, name in roles.items()}
    by_role = {role: results.get(name) for role, name in roles.items()}
    lines = [
        "# Results: the generalization benefit of noise in SGD, at this project's scale",
        "",
        "Generated by `analysis.reportmd.write_report` from what `sgdnoise analyze` wrote under "
        "`results/<study>/` (table.md, table.csv, summary.json, figures), for the studies "
        f"{', '.join(f'`{s}`' for s in studies)}. `make study` regenerates it; identical runs "
        "give an identical file. Each claim of Smith, Elsen & De (2020) is checked against "
        "fixed thresholds (`analysis/claims.py`, listed at the end) and gets a verdict: "
        f"*{HOLDS}*, *{FAILS}* or *{UNKNOWN}*. The verdicts say what these runs show; they are "
        "never adjusted to the paper. The same verdicts, with every number, are in "
        f"`{CLAIMS_NAME}`.",
        "",
        f"Setting: {setting}." if setting else "Setting: see params.yaml (`studies:`).",
        "",
    ]
    if lead is not None:
        lines += [f"![The two regimes of SGD]({lead.name})", "", LEAD_CAPTION, ""]
    lines += [
        "## The paper's claims at this scale",
        "",
        "| claim | study | verdict | numbers |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c.title} | `{c.study}` | **{c.verdict}** | {_cell(c.detail)} |" for c in claims]
    lines += ["", "## Theory beside the measurement", "", *theory_lines(by_role)]
    for name in studies:
        lines += ["", *_study_section(name, results.get(name), role_of.get(name), claims, setting)]
    lines += ["", "## Thresholds behind the verdicts", ""]
    lines += [f"- {k}: {v}" for k, v in THRESHOLDS.items()]
    return "\n".join(lines) + "\n"


def _study_section(
    name: str,
    result: StudyResult | None,
    role: str | None,
    claims: list[Claim],
    setting: str | None,
) -> list[str]:
    heading = f"## Study `{name}`"
    if role in ROLE_TEXT:
        heading += f": {ROLE_TEXT[role].split(':')[0]}"
    if result is None:
        return [
            heading,
            "",
            f"No results: `results/{name}/summary.json` is missing (the study was not run or "
            "not analyzed), so its claims cannot be told.",
        ]
    s = result.summary
    kind = s.get("kind", "")
    lines = [heading, ""]
    if role in ROLE_TEXT:
        lines += [ROLE_TEXT[role][0].upper() + ROLE_TEXT[role][1:] + ".", ""]
    lines += [
        f"- kind: {KIND_TEXT.get(kind, kind)}; selection rule `{s.get('selection')}`; metric "
        f"`{s.get('metric')}` ({s.get('direction')})",
        f"- runs: {s.get('n_runs')} ({s.get('n_diverged')} diverged, "
        f"{s.get('n_duplicates')} duplicates dropped)",
        "",
        "### Table",
        "",
        *_demoted(result.markdown),
        "",
    ]
    if kind == "batch_size":
        lines += ["### Regime summary", "", *(f"- {x}" for x in _regime_lines(s)), ""]
    elif kind == "epoch_budget":
        lines += ["### Optimal ε_eff vs budget", "", *(f"- {x}" for x in _budget_lines(result)), ""]
    lines += ["### Figures", ""]
    figures = _figures(result)
    if not figures:
        lines += ["No figures.", ""]
    for fig in figures:
        caption = FIGURES.get(fig, fig.replace("_", " "))
        lines += [f"#### {caption}", "", f"![{name}: {caption}]({name}/{fig}.png)", ""]
        if (result.path / f"{fig}.csv").is_file():
            lines += [f"Data: [`{name}/{fig}.csv`]({name}/{fig}.csv).", ""]
        lines += [_figure_reading(role, fig, result, claims), ""]
    mine = [c for c in claims if role is not None and c.role == role]
    lines += ["### Reading against the paper", ""]
    if not mine:
        lines += ["None of the paper's claims is checked on this study."]
    for c in mine:
        lines.append(f"- **{c.verdict}**: {c.title}. {_sentence(c.detail)}")
        if c.verdict != HOLDS:
            lines.append(f"  {_explain(c, setting)}")
    return lines


def _figure_reading(role: str | None, fig: str, result: StudyResult, claims: list[Claim]) -> str:
    parts = []
    paper = PAPER_SAYS.get((role or "", fig))
    if paper:
        parts.append(f"Paper: {paper}.")
    by_key = {c.key: c for c in claims}
    keys = FIGURE_CLAIMS.get((role or "", fig), ())
    if keys:
        here = "; ".join(f"{by_key[k].title}: **{by_key[k].verdict}**" for k in keys)
        parts.append(f"Here: {here} (numbers below).")
    elif fig in ("metric_vs_lr", "train_loss_vs_lr"):
        parts.append(_edge_reading(result))
    elif fig == "optimal_lr_vs_batch":
        parts.append("Here: " + " ".join(_regime_lines(result.summary)))
    elif fig == "train_loss_vs_batch":
        parts.append(_train_loss_reading(result))
    elif fig == "lr_vs_budget":
        parts.append("Here: " + " ".join(_budget_lines(result)))
    if not parts:
        parts.append("No reading: not a figure this report knows.")
    return " ".join(parts)


def _edge_reading(result: StudyResult) -> str:
    """Where an optimum sits at the edge of the lr grid, the grid does not bracket it."""
    if result.summary.get("kind") == "epoch_budget":
        g = budget_groups(result)
        edges = [
            f"{r.optimizer} {r.budget:g} ({which} {edge})"
            for r in g.itertuples()
            for which, edge in (("train", r.train_edge), ("test", r.test_edge))
            if edge
        ]
    else:
        g = batch_groups(result)
        edges = [f"{r.series} B={r.batch_size} ({r.edge})" for r in g.itertuples() if r.edge]
    if not edges:
        return "Every optimum lies inside the lr grid, so the grid brackets it."
    return (
        "Optima at the edge of the lr grid (only bounds; a wider grid would place them): "
        + ", ".join(edges)
        + "."
    )


def _train_loss_reading(result: StudyResult) -> str:
    g = batch_groups(result)
    parts = []
    for series, sg in g.groupby("series", sort=True):
        sg = sg[sg["train_loss_mean"].notna()]
        if len(sg) < 2:
            continue
        first, last = sg.iloc[0], sg.iloc[-1]
        parts.append(
            f"{series} {first.train_loss_mean:.4g} at B = {first.batch_size} to "
            f"{last.train_loss_mean:.4g} at B = {last.batch_size}"
        )
    if not parts:
        return "Here: no training loss at the optimum was logged."
    return "Here: training loss at the test-optimal ε_eff goes from " + "; ".join(parts) + "."


def _regime_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for series, r in summary.get("regimes", {}).items():
        bits = []
        if r.get("b_crit") is not None:
            text = f"B_crit ≈ {r['b_crit']:.3g}"
            if r.get("b_crit_lo") is not None:
                text += f" (95% bootstrap interval {r['b_crit_lo']:.3g} to {r['b_crit_hi']:.3g})"
            bits.append(text)
        if r.get("eps_max") is not None:
            bits.append(f"ε_max ≈ {r['eps_max']:.3g}")
        for key, where in (("slope_below_b_crit", "below"), ("slope_above_b_crit", "above")):
            if r.get(key) is not None:
                bits.append(f"log-log slope of ε_opt {r[key]:.2f} {where} B_crit")
        if r.get("b_simple") is not None:
            bits.append(f"measured B_simple ≈ {r['b_simple']:.3g}")
        if r.get("message"):
            bits.append(f"not estimated: {r['message']}")
        lines.append(f"{series}: " + ("; ".join(bits) or "nothing estimated") + ".")
    return lines or ["no regime fit in the summary."]


def _budget_lines(result: StudyResult) -> list[str]:
    g = budget_groups(result)
    lines = []
    for optimizer, og in g.groupby("optimizer", sort=True):
        steps = ", ".join(
            f"{r.budget:g}: {_lr(r.train_lr_opt)} / {_lr(r.test_lr_opt)}" for r in og.itertuples()
        )
        lines.append(f"{optimizer}, budget: train-optimal / test-optimal ε_eff: {steps}.")
    return lines or ["no budgets in the summary."]


def _lr(x: float) -> str:
    return fmt_exp(x) if pd.notna(x) and x > 0 else "—"


def _explain(c: Claim, setting: str | None) -> str:
    """What might explain a miss (the data's own hints, then the scale), or what is
    missing to tell."""
    hints = _sentence("; ".join(c.hints))
    if c.verdict == UNKNOWN:
        need = (
            "To tell, the study needs what the sentence above says is missing (the study run, "
            "more seeds, a wider lr grid, more batch sizes or budgets)."
        )
        return f"{hints} {need}".strip()
    ours = setting or "a small model on a small dataset"
    scale = (
        f"These runs use {ours} rather than {PAPER_SCALE}: shorter budgets, fewer seeds and a "
        "coarse power-of-two lr grid can hide or blur the effect."
    )
    return f"What might explain it: {hints} {scale}".replace("  ", " ")


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    return text if text.endswith(".") else text + "."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _demoted(markdown: str | None) -> list[str]:
    """table.md under this report's headings: its title dropped, its headings two levels down."""
    if markdown is None:
        return ["(no table.md)"]
    lines = markdown.rstrip("\n").split("\n")
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
        while lines and not lines[0].strip():
            lines = lines[1:]
    return ["##" + line if line.startswith("#") else line for line in lines]


def _figures(result: StudyResult) -> list[str]:
    """PNG names (without suffix) in results/<study>/: known ones in reading order first."""
    present = sorted(p.stem for p in result.path.glob("*.png"))
    known = [f for f in FIGURES if f in present]
    return known + [f for f in present if f not in FIGURES]


# ---- README ------------------------------------------------------------------------------


def main_table(markdown: str | None) -> str | None:
    """The first markdown table in table.md (the per-B table of a batch-size study)."""
    if markdown is None:
        return None
    block: list[str] = []
    for line in markdown.split("\n"):
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    return "\n".join(block) or None


def update_readme(
    readme: Path,
    figures_dir: Path,
    results_dir: Path,
    results: Mapping[str, StudyResult | None],
    claims: list[Claim],
    roles: Mapping[str, str],
    lead: Path | None = None,
) -> None:
    """Replace the README's text between BEGIN and END (append the section if absent)."""
    text = readme.read_text() if readme.is_file() else ""
    body = _readme_section(readme, figures_dir, results_dir, results, claims, roles, lead)
    n_begin, n_end = text.count(BEGIN), text.count(END)
    if n_begin == n_end == 0:
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"{chr(10) if text else ''}## Current results\n\n{BEGIN}\n{body}\n{END}\n"
    elif n_begin == n_end == 1 and text.index(BEGIN) < text.index(END):
        i, j = text.index(BEGIN) + len(BEGIN), text.index(END)
        text = text[:i] + "\n" + body + "\n" + text[j:]
    else:
        # Never guess which part of a hand-edited README is ours.
        raise ValueError(
            f"{readme}: expected one {BEGIN} followed by one {END}, found {n_begin} and {n_end}"
        )
    readme.write_text(text)


def _readme_section(
    readme: Path,
    figures_dir: Path,
    results_dir: Path,
    results: Mapping[str, StudyResult | None],
    claims: list[Claim],
    roles: Mapping[str, str],
    lead: Path | None = None,
) -> str:
    base = readme.parent
    report = _rel(results_dir / REPORT_NAME, base)
    lines = [
        "<!-- Generated by analysis.reportmd.write_report (make study); edits here are "
        "overwritten. -->",
    ]
    figures_dir.mkdir(parents=True, exist_ok=True)
    lead_copy = figures_dir / f"{LEAD}.png"
    if lead is not None:
        _copy_if_changed(lead, lead_copy)
        lines += ["", f"![The two regimes of SGD]({_rel(lead_copy, base)})", "", LEAD_CAPTION]
    elif lead_copy.is_file():
        lead_copy.unlink()
    lines += ["", f"The paper's claims at this scale (readings: [{report}]({report})):", ""]
    lines += ["| claim | verdict | numbers |", "|---|---|---|"]
    lines += [f"| {c.title} | **{c.verdict}** | {_cell(c.detail)} |" for c in claims]
    by_role = {role: results.get(name) for role, name in roles.items()}
    lines += ["", "Theory beside the measurement:", "", *theory_lines(by_role)]
    main_name = roles.get(MAIN_TABLE_ROLE, MAIN_TABLE_ROLE)
    main = results.get(main_name)
    table = main_table(main.markdown) if main is not None else None
    if main is not None and table is not None:
        s = main.summary
        lines += [
            "",
            f"Constant epoch budget (study `{main_name}`; selection rule `{s.get('selection')}`, "
            f"metric `{s.get('metric')}`, {s.get('n_runs')} runs):",
            "",
            table,
        ]
    else:
        lines += ["", f"The main study `{main_name}` has no results yet."]

    wanted: dict[Path, Path] = {}
    for role, figs in MAIN_FIGURES.items():
        name = roles.get(role, role)
        res = results.get(name)
        for fig in figs:
            src = res.path / f"{fig}.png" if res is not None else None
            if src is not None and src.is_file():
                wanted[figures_dir / f"{name}_{fig}.png"] = src
    # Figures of a study no longer shown would be stale: remove only our own file names.
    for role, figs in MAIN_FIGURES.items():
        for fig in figs:
            old = figures_dir / f"{roles.get(role, role)}_{fig}.png"
            if old.is_file() and old not in wanted:
                old.unlink()
    for dst, src in wanted.items():
        _copy_if_changed(src, dst)
        study = dst.stem.removesuffix("_" + src.stem)
        lines += ["", f"![{study}: {FIGURES.get(src.stem, src.stem)}]({_rel(dst, base)})"]
    return "\n".join(lines)


def _copy_if_changed(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if not dst.is_file() or dst.read_bytes() != data:
        shutil.copyfile(src, dst)


def _rel(path: Path, base: Path) -> str:
    """A link relative to the README's folder, with forward slashes on every OS."""
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
