"""End to end: `dvc repro` of the whole study, on a shrunken copy of the default params,
in a temporary git repository, with the real CLI, DVC, Optuna and MLflow."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("constant_epochs", "constant_steps", "epoch_budgets", "noise_scale", "nqm")


def dotted(d: dict, prefix: str = "") -> dict:
    """A study's nested `fixed`/`grid` keys as dotted ones (the study reader takes both);
    a learning-rate power spec {base, min_exp, max_exp} is a value, not a section."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not {"base", "min_exp", "max_exp"} & set(v):
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def shrunken_params() -> dict:
    """The default params with a tiny dataset, model and grids (seconds per study)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for study in params["studies"].values():
        study["grid"], study["fixed"] = dotted(study["grid"]), dotted(study.get("fixed", {}))
    params["data"].update(num_samples=600)
    params["model"].update(width=32)
    params["train"].update(eval_points=2, threads=1)
    small = {"train.lr_eff": {"base": 2, "min_exp": -2, "max_exp": 0}, "train.seed": [0, 1]}
    studies = params["studies"]
    for name in STUDIES:
        study = studies[name]
        grid = {**study["grid"], **{k: v for k, v in small.items() if k not in study["fixed"]}}
        if "train.batch_size" in grid:
            grid["train.batch_size"] = [32, 128]
        if "train.optimizer" in grid:
            grid["train.optimizer"] = ["momentum"]
        if "train.budget.value" in grid:
            grid["train.budget.value"] = [1, 2]
        if name == "nqm":  # exact, no seeds: one seed, a short budget
            grid["train.seed"] = [0]
        study["grid"] = grid
        study["edges"] = {**study.get("edges", {}), "extend": False}
        fixed = study.get("fixed", {})
        if name == "noise_scale":  # accumulation over micro-batches of a B the data holds
            fixed.update({"train.batch_size": 64, "train.micro_batch_size": 16})
        if fixed.get("train.budget.unit") == "steps":
            fixed["train.budget.value"] = 200 if name == "nqm" else 20
        elif "train.budget.value" in fixed:
            fixed["train.budget.value"] = 1
    params["nqm"].update(dim=300)
    params["studies"] = {k: v for k, v in studies.items() if k in STUDIES}
    return params


def _run(root: Path, *cmd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _ran(res: subprocess.CompletedProcess) -> set[str]:
    text = res.stdout + res.stderr
    return {line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    # What a clone holds: data/raw/README.md keeps the folder prepare depends on.
    for name in ("dvc.yaml", "README.md", "MLproject", ".gitignore", "data/raw/README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    for name in ("src/sgdnoise", "analysis"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(shrunken_params(), sort_keys=False))
    _run(root, "git", "init", "-q")
    _run(root, "dvc", "init", "-q")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # the plot templates
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


def test_repro_runs_every_stage_and_writes_well_formed_outputs(pipeline: Path) -> None:
    res = _run(pipeline, "dvc", "repro")
    expected = {"prepare"} | {f"{s}@{n}" for s in ("sweep", "analyze") for n in STUDIES}
    assert _ran(res) == expected | {"report"}
    for name in STUDIES:
        sweep = json.loads((pipeline / "results/sweeps" / f"{name}.json").read_text())
        assert sweep["done"] and sweep["finished"] == sweep["points"] > 0
        summary = json.loads((pipeline / "results" / name / "summary.json").read_text())
        assert summary["study"] == name and summary["groups"]
        table = (pipeline / "results" / name / "table.md").read_text()
        assert "|" in table and ("2^" in table or name == "noise_scale")
        assert list((pipeline / "results" / name).glob("*.png"))
    assert (pipeline / "docs/figures/nqm_optimal_lr_vs_batch.png").is_file()
    noise = json.loads((pipeline / "results/noise_scale/summary.json").read_text())
    assert noise["kind"] == "noise_scale" and set(noise["groups"]) == {"momentum"}
    assert noise["groups"]["momentum"]["b_simple"] > 0
    assert noise["groups"]["momentum"]["micro_batch_size"] == 16
    report = (pipeline / "results/REPORT.md").read_text()
    assert all(name in report for name in STUDIES)
    # The report leads with the two-regime figure, then the claims, then theory vs runs.
    lead = report.index("](two_regimes.png)")
    assert lead < report.index("## The paper's claims") < report.index("## Theory beside")
    assert (pipeline / "results/two_regimes.png").is_file()
    assert (pipeline / "docs/figures/two_regimes.png").is_file()
    theory = report[report.index("## Theory beside") :].split("\n## ")[0]
    assert "| momentum |" in theory and "B_crit / B_simple" in theory
    readme = (pipeline / "README.md").read_text()
    assert "(not generated yet" not in readme and "<!-- study:end -->" in readme
    # dvc metrics: a few headline numbers per study, readable on a screen.
    shown = json.loads(_run(pipeline, "dvc", "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    epochs = files["results/constant_epochs/metrics.json"]["data"]
    # (Two batch sizes here: B_crit cannot be fitted, so it is null.)
    assert set(epochs) == {"runs", "momentum"} and epochs["momentum"]["best"] > 0
    assert files["results/noise_scale/metrics.json"]["data"]["momentum"]["B_simple"] > 0
    claims = files["results/claims_summary.json"]["data"]["claims"]
    assert sum(claims.values()) == 6
    for name in STUDIES:
        table = _run(pipeline, "dvc", "metrics", "show", f"results/{name}/metrics.json").stdout
        assert max(len(line) for line in table.splitlines()) <= 120, table
    # dvc plots: every figure of the study, B and ε_eff on log2 axes.
    plots = _run(pipeline, "dvc", "plots", "show", "-o", str(pipeline / "plots_html"))
    html = (pipeline / "plots_html" / "index.html").read_text()
    assert html.count('"base": 2') >= 9 and "constant_epochs: optimal" in html, plots.stdout


def test_second_repro_runs_nothing(pipeline: Path) -> None:
    res = _run(pipeline, "dvc", "repro")
    assert _ran(res) == set()


def test_changing_one_grid_reruns_only_that_study(pipeline: Path) -> None:
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    changed = copy.deepcopy(params)
    changed["studies"]["constant_steps"]["grid"]["train.seed"] = [0, 1, 2]
    (pipeline / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    res = _run(pipeline, "dvc", "repro")
    assert _ran(res) == {"sweep@constant_steps", "analyze@constant_steps", "report"}
