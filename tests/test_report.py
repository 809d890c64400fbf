"""Claims and REPORT.md: the paper's claims as verdicts, the report, the README section.

The inputs are made by the real `analysis.analyze` (tables, regime fits, figures,
summary.json) on synthetic run tables. Only its MLflow read is replaced: logging the
~1,700 synthetic runs through a sqlite store would take far longer than the whole test
budget, and tests/test_analysis.py covers that read. Two synthetic worlds: one where
every claim of the paper holds, one where each is contradicted.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

import analysis.figures
import analysis.report
from analysis import write_report
from analysis.claims import FAILS, HOLDS, UNKNOWN, evaluate
from analysis.query import StudyRuns
from analysis.reportmd import BEGIN, END

STUDIES = ["constant_epochs", "constant_steps", "epoch_budgets"]
SEED_OFFSET = {0: 0.002, 1: -0.002}  # seed std 0.0028: below the 1-point floor
CURVATURE = 0.005  # accuracy lost per squared octave away from the optimal lr
BATCH = [2**k for k in range(4, 13)]  # 16 to 4096
LOG2_LRS = range(-4, 6)
OPTIMIZERS = ("momentum", "sgd")

Fn = Callable[[str, int], float]


def log2(b: int) -> float:
    return math.log2(b)


def batch_study(opt_lr: Fn, peak: Fn, train_loss: Fn, unit: str, value: float) -> pd.DataFrame:
    """One row per run, as analysis.query returns them: accuracy a parabola in log2 lr
    around opt_lr(optimizer, B) with its top at peak(optimizer, B)."""
    rows = []
    for opt in OPTIMIZERS:
        for b in BATCH:
            for x in LOG2_LRS:
                for seed in SEED_OFFSET:
                    dist = (x - opt_lr(opt, b)) ** 2
                    acc = peak(opt, b) + SEED_OFFSET[seed] - CURVATURE * dist
                    rows.append(
                        run(opt, b, x, seed, unit, value, acc, train_loss(opt, b) + 0.01 * dist)
                    )
    return frame(rows)


def budget_study(train_opt: dict[float, float], test_opt: dict[float, float]) -> pd.DataFrame:
    """Momentum at B = 64, one epoch budget per key."""
    rows = []
    for budget in train_opt:
        for x in range(-5, 4):
            for seed in SEED_OFFSET:
                acc = 0.8 + SEED_OFFSET[seed] - CURVATURE * (x - test_opt[budget]) ** 2
                loss = 0.01 + 0.001 * seed + 0.05 * (x - train_opt[budget]) ** 2
                rows.append(run("momentum", 64, x, seed, "epochs", budget, acc, loss))
    return frame(rows)


def run(opt, b, x, seed, unit, value, acc, train_loss) -> dict:
    return {
        "optimizer": opt,
        "batch_size": b,
        "lr_eff": 2.0**x,
        "seed": seed,
        "budget_unit": unit,
        "budget_value": float(value),
        "status": "finished",
        "diverged": False,
        "final_train_loss": train_loss,
        "final_test_loss": 1.0 - acc,
        "final_test_accuracy": acc,
    }


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    ids = [f"run{i:05d}" for i in range(len(df))]
    df.insert(0, "run_key", ids)
    df.insert(0, "run_id", ids)
    return df


# The paper's world: ε_opt ∝ B up to B = 256 then flat; accuracy flat then falling, Momentum
# ahead only at large B; at constant steps the largest B loses accuracy while training
# further; the train-optimal lr falls 16x over 64x more epochs, the test-optimal 2x.
PAPER = {
    "constant_epochs": batch_study(
        opt_lr=lambda o, b: min(log2(b) - 6, 2),
        peak=lambda o, b: {
            "sgd": {512: 0.88, 1024: 0.85, 2048: 0.80, 4096: 0.74},
            "momentum": {512: 0.885, 1024: 0.88, 2048: 0.87, 4096: 0.84},
        }[o].get(b, 0.90),
        train_loss=lambda o, b: 0.02 * log2(b),
        unit="epochs",
        value=20,
    ),
    "constant_steps": batch_study(
        opt_lr=lambda o, b: min(log2(b) - 6, 2),
        peak=lambda o, b: {16: 0.88, 32: 0.9, 2048: 0.9, 4096: 0.85}.get(b, 0.92),
        train_loss=lambda o, b: 0.3 - 0.02 * log2(b),
        unit="steps",
        value=1000,
    ),
    "epoch_budgets": budget_study(
        train_opt={1.0: 1, 4.0: 0, 16.0: -1, 64.0: -3},
        test_opt={1.0: 1, 4.0: 1, 16.0: 1, 64.0: 0},
    ),
}
# A contrary world: ε_opt falls with B; SGD accuracy flat throughout; Momentum ahead only at
# small B; accuracy rising with B at constant steps; both optima falling alike.
CONTRARY = {
    "constant_epochs": batch_study(
        opt_lr=lambda o, b: 2 - 0.5 * (log2(b) - 4),
        peak=lambda o, b: 0.93 if o == "momentum" and b <= 256 else 0.90,
        train_loss=lambda o, b: 0.1,
        unit="epochs",
        value=20,
    ),
    "constant_steps": batch_study(
        opt_lr=lambda o, b: min(log2(b) - 6, 2),
        peak=lambda o, b: 0.80 + 0.01 * log2(b),
        train_loss=lambda o, b: 0.1,
        unit="steps",
        value=1000,
    ),
    "epoch_budgets": budget_study(
        train_opt={1.0: 1, 4.0: 0, 16.0: 0, 64.0: -1},
        test_opt={1.0: 1, 4.0: 0, 16.0: 0, 64.0: -1},
    ),
}


FIGURES = ("best_metric_vs_batch", "optimal_lr_vs_batch", "train_loss_vs_batch")
FIGURES += ("metric_vs_lr", "lr_vs_budget")


def analyze_all(tables: dict[str, pd.DataFrame], results: Path, figures: bool = True) -> Path:
    def fake_load(study: str, **_: object) -> StudyRuns:
        return StudyRuns(study, "exp-report", "1", f"parent-{study}", tables[study].copy(), "sql")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(analysis.report, "load_study", fake_load)
        if not figures:
            # Drawing is most of analyze's time; a world only read for its verdicts skips it.
            for name in FIGURES:
                mp.setattr(analysis.figures, name, lambda *a, **k: [])
        for study in tables:
            analysis.report.analyze(
                study,
                tracking_uri="sqlite:///unused.db",
                experiment="exp-report",
                out_dir=results / study,
            )
    return results


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> Path:
    return analyze_all(PAPER, tmp_path_factory.mktemp("paper") / "results")


@pytest.fixture(scope="module")
def contrary(tmp_path_factory) -> Path:
    return analyze_all(CONTRARY, tmp_path_factory.mktemp("contrary") / "results", figures=False)


def verdicts(results: Path) -> dict[str, str]:
    return {c.key: c.verdict for c in evaluate(results)}


# ---- claims ------------------------------------------------------------------------------


def test_every_claim_holds_in_the_papers_world(paper):
    claims = {c.key: c for c in evaluate(paper)}
    assert {k: c.verdict for k, c in claims.items()} == dict.fromkeys(claims, HOLDS), {
        k: c.detail for k, c in claims.items()
    }
    rise = claims["lr_rises_at_small_b"].numbers
    assert {s: round(rise[s]["slope"], 2) for s in OPTIMIZERS} == {"momentum": 1.0, "sgd": 1.0}
    flat = claims["lr_flat_at_large_b"].numbers
    assert all(abs(flat[s]["slope"]) < 0.2 for s in OPTIMIZERS)
    acc = claims["accuracy_flat_then_falls"].numbers["sgd"]
    assert acc["largest_batch_size"] == 4096 and acc["drop"] == pytest.approx(0.16)
    assert acc["drop_in_seed_std"] > 20 and acc["flat_batch_sizes"] == [16, 32, 64, 128, 256]
    assert rise["sgd"]["flat_batch_sizes"] == acc["flat_batch_sizes"]
    mom = claims["momentum_only_helps_at_large_b"].numbers
    assert mom["rows"][-1]["momentum_advantage"] == pytest.approx(0.10)
    assert all(abs(r["momentum_advantage"]) < 1e-9 for r in mom["rows"][:3])
    steps = claims["large_batches_lose_at_constant_steps"].numbers["sgd"]
    assert steps["train_loss_largest_b"] < steps["train_loss_best_b"]
    assert steps["drop"] == pytest.approx(0.07)
    budget = claims["train_optimal_lr_falls_faster"]
    assert budget.numbers["momentum"]["train_lr_fall"] == 16.0
    assert budget.numbers["momentum"]["test_lr_fall"] == 2.0
    assert "budget ×64" in budget.detail and "train-optimal 16× lower" in budget.detail


def test_no_claim_holds_in_a_contrary_world(contrary):
    claims = {c.key: c for c in evaluate(contrary)}
    assert {k: c.verdict for k, c in claims.items()} == dict.fromkeys(claims, FAILS), {
        k: c.detail for k, c in claims.items()
    }
    assert "slope -0.50 over B = 16 to 4096 (flat test metric); not near 1" in (
        claims["lr_rises_at_small_b"].detail
    )
    assert claims["lr_flat_at_large_b"].numbers["sgd"]["slope"] == pytest.approx(-0.5, abs=0.1)
    # Momentum's accuracy does fall; SGD's does not, and one series missing is a miss.
    assert claims["accuracy_flat_then_falls"].numbers["momentum"]["drop"] == pytest.approx(0.03)
    assert "sgd (does not hold): flat over every B" in claims["accuracy_flat_then_falls"].detail
    assert "Momentum is better already at B = 16" in claims["momentum_only_helps_at_large_b"].detail
    assert "largest B = 4096 has the best" in claims["large_batches_lose_at_constant_steps"].detail
    assert claims["train_optimal_lr_falls_faster"].numbers["momentum"]["extra_fall_octaves"] == 0
    # A miss comes with what might explain it.
    assert all(c.hints for c in claims.values())


def _edit_summary(path: Path, edit: Callable[[dict], None]) -> None:
    summary = json.loads(path.read_text())
    edit(summary)
    path.write_text(json.dumps(summary))


def test_missing_or_degenerate_data_cannot_be_told(paper, tmp_path):
    assert set(verdicts(tmp_path).values()) == {UNKNOWN}  # nothing analyzed
    assert "has no results" in evaluate(tmp_path)[0].detail

    results = shutil.copytree(paper, tmp_path / "results")
    shutil.rmtree(results / "epoch_budgets")

    def single_seed(s: dict) -> None:
        g = s["groups"]["sgd/B=4096"]
        g["n_seeds"], g["metric_std"] = 1, None

    def no_fit(s: dict) -> None:
        s["regimes"]["sgd"].update(b_crit=None, slope_below_b_crit=None, slope_above_b_crit=None)
        s["groups"]["momentum/B=16"]["n_seeds"] = 1

    def trains_worse(s: dict) -> None:
        for series in OPTIMIZERS:
            s["groups"][f"{series}/B=4096"]["train_loss_at_opt"] = 1.0

    _edit_summary(results / "constant_epochs/summary.json", single_seed)
    _edit_summary(results / "constant_epochs/summary.json", no_fit)
    _edit_summary(results / "constant_steps/summary.json", trains_worse)
    claims = {c.key: c for c in evaluate(results)}
    assert {k: c.verdict for k, c in claims.items()} == dict.fromkeys(claims, UNKNOWN)
    assert "sgd (cannot tell): B_crit not estimated" in claims["lr_flat_at_large_b"].detail
    assert "sgd (cannot tell): no seed std at B = 4096" in claims["lr_rises_at_small_b"].detail
    assert "momentum (cannot tell): no seed std at B = 16 (single seed)" in (
        claims["lr_rises_at_small_b"].detail
    )
    assert "single seed" in claims["accuracy_flat_then_falls"].detail
    assert "single seed" in claims["momentum_only_helps_at_large_b"].detail
    assert "not a generalization gap" in claims["large_batches_lose_at_constant_steps"].detail
    assert "'epoch_budgets' has no results" in claims["train_optimal_lr_falls_faster"].detail


def test_a_short_flat_region_leaves_the_slope_untold_and_fails_flatness(paper, tmp_path):
    """ε_opt ∝ B is measured where accuracy is flat: with two flat batch sizes there is no
    noise-dominated region of three to measure it over, and flatness itself fails."""

    def falls_early(s: dict) -> None:
        for series in OPTIMIZERS:
            for b in (64, 128, 256):
                s["groups"][f"{series}/B={b}"]["metric_mean"] = 0.87

    results = shutil.copytree(paper, tmp_path / "results")
    _edit_summary(results / "constant_epochs/summary.json", falls_early)
    claims = {c.key: c for c in evaluate(results)}
    rise = claims["lr_rises_at_small_b"]
    assert rise.verdict == UNKNOWN, rise.detail
    assert "flat over B = 16, 32 only" in rise.detail
    assert rise.numbers["sgd"]["flat_batch_sizes"] == [16, 32]
    flat = claims["accuracy_flat_then_falls"]
    assert flat.verdict == FAILS and "only (needs 3 batch sizes)" in flat.detail
    assert claims["lr_flat_at_large_b"].verdict == HOLDS  # B_crit's side is untouched


def test_an_optimum_at_the_grid_edge_makes_a_slope_untellable(paper, contrary, tmp_path):
    def edge(s: dict) -> None:
        for series in OPTIMIZERS:
            s["groups"][f"{series}/B=16"]["edge"] = "low"

    for world in (paper, contrary):
        results = shutil.copytree(world, tmp_path / world.parent.name)
        _edit_summary(results / "constant_epochs/summary.json", edge)
        claim = evaluate(results)[0]
        assert claim.verdict == UNKNOWN, claim.detail
        assert "edge of the lr grid at B = 16 (low)" in claim.detail


# ---- REPORT.md and the README ------------------------------------------------------------

README = (
    "# Project\n\nIntro text.\n\n## Results\n\n{begin}\nold table\n{end}\n\n## After\n\nKept.\n"
)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_report_and_readme(paper, tmp_path):
    results = shutil.copytree(paper, tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(README.format(begin=BEGIN, end=END))
    studies = [*STUDIES, "never_run"]
    path = write_report(results, studies, readme=readme, setting="synthetic runs")
    assert path == results / "REPORT.md"
    report = path.read_text()

    for study in STUDIES:
        table = (results / study / "table.md").read_text()
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert rows and all(row in report for row in rows)
        pngs = sorted(p.name for p in (results / study).glob("*.png"))
        assert len(pngs) >= 3
        for png in pngs:
            assert f"]({study}/{png})" in report
    assert "## Study `never_run`" in report and "No results" in report
    assert report.count(f"**{HOLDS}**") >= 6 and "synthetic runs" in report
    assert "## Thresholds behind the verdicts" in report
    assert json.loads((results / "claims.json").read_text())[0]["verdict"] == HOLDS
    assert not any(s in report for s in (str(tmp_path), "20" + "25-", "20" + "26-"))

    text = readme.read_text()
    head, rest = text.split(BEGIN)
    section, tail = rest.split(END)
    assert head == "# Project\n\nIntro text.\n\n## Results\n\n"
    assert tail == "\n\n## After\n\nKept.\n"
    assert "old table" not in section
    main = [r for r in (results / "constant_epochs/table.md").read_text().splitlines()]
    assert all(r in section for r in main if r.startswith("| sgd | 4096"))
    assert "Regimes" not in section  # the main table only
    assert f"| Momentum the same as SGD at small B, better at large B | **{HOLDS}** |" in section
    assert "](results/REPORT.md)" in section
    # It leads with the two-regime figure, then the claims, then theory vs measurement.
    lead = section.index("](docs/figures/two_regimes.png)")
    assert lead < section.index("The paper's claims") < section.index("Theory beside")
    assert section.index("Theory beside") < section.index("| sgd | 4096")
    assert (tmp_path / "docs/figures/two_regimes.png").read_bytes()[:4] == b"\x89PNG"
    assert "](two_regimes.png)" in report and (results / "two_regimes.csv").is_file()
    for name in (
        "constant_steps_best_metric_vs_batch",
        "constant_steps_train_loss_vs_batch",
        "epoch_budgets_lr_vs_budget",
    ):
        assert f"](docs/figures/{name}.png)" in section
        assert (tmp_path / "docs/figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    # A second run on identical data rewrites identical bytes, README included.
    before = snapshot(tmp_path)
    write_report(results, studies, readme=readme, setting="synthetic runs")
    assert snapshot(tmp_path) == before


def test_readme_without_markers_gets_a_section_and_bad_markers_raise(paper, tmp_path):
    results = shutil.copytree(paper, tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n\nNo markers here.")
    figures = tmp_path / "figs"
    write_report(results, ["constant_epochs"], readme=readme, figures_dir=figures)
    text = readme.read_text()
    assert text.startswith("# Project\n\nNo markers here.\n\n## Current results\n\n" + BEGIN)
    assert text.endswith(END + "\n")
    assert "](figs/two_regimes.png)" in text
    # Studies not in the list: their figures are not shown, their claims cannot be told.
    assert sorted(p.name for p in figures.iterdir()) == ["two_regimes.png"]
    assert "| growing epoch budget: the train-optimal ε_eff falls faster than the " in text
    assert f"test-optimal one | **{UNKNOWN}** |" in text
    assert "Needs the constant-epoch study and the noise-scale study" in text

    readme.write_text(f"{END}\n{BEGIN}\n")
    with pytest.raises(ValueError, match="expected one"):
        write_report(results, STUDIES, readme=readme)
    assert readme.read_text() == f"{END}\n{BEGIN}\n"
