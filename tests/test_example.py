"""The example a user copies (examples/own_model: a small CNN of their own and an .npz of
their own) end to end at toy size, with the real CLI, Optuna, MLflow and DVC: prepare ->
sweep -> analyze, every grid point exactly once, tables produced, read back from Python."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import cli, tracking_uri

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_model"
STUDY = "own_cnn"
# Toy size: 6 grid points of one epoch each.
TOY = {
    "train.batch_size": [16, 64],
    "train.lr_eff": {"base": 2, "min_exp": -1, "max_exp": 1},
    "train.seed": [0],
}


def _copy(dest: Path) -> Path:
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _toy(params: dict) -> dict:
    study = params["studies"][STUDY]
    study["grid"] = dict(TOY)
    study["fixed"] = {**study["fixed"], "train.budget.value": 1}
    study["edges"] = {**study.get("edges", {}), "extend": False}
    return params


def _run(root: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # `python` and `sgdnoise` in the example's commands are this interpreter's.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _children(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    mlf = MlflowClient(tracking_uri=tracking_uri(root))
    exp = mlf.get_experiment_by_name(f"own_model/{STUDY}")  # an experiment per study
    runs = mlf.search_runs([exp.experiment_id], "tags.`sgdnoise.kind` = 'run'", max_results=1000)
    return list(runs)


def test_the_example_end_to_end_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(tmp_path / "own_model")
    _run(root, sys.executable, "make_data.py")
    toy = [f"-P studies.{STUDY}.grid.{k}={json.dumps(v)}" for k, v in TOY.items()]
    toy = [a for t in toy for a in t.split(" ", 1)]
    toy += ["-P", f"studies.{STUDY}.fixed.train.budget.value=1",
            "-P", f"studies.{STUDY}.edges.extend=false"]  # fmt: skip

    res = cli(root, "prepare")
    assert res.returncode == 0, res.stderr
    meta = json.loads((root / "data/prepared/tensors/meta.json").read_text())
    assert meta["input_shape"] == [1, 16, 16] and meta["num_classes"] == 4
    assert meta["augment"] == "crop_flip" and meta["normalization"]["at"] == "prepare"

    res = cli(root, "sweep", STUDY, "--workers", "2", *toy)
    assert res.returncode == 0, res.stderr
    assert "cannot be packed" not in res.stderr  # Conv2d, BatchNorm2d, Linear all pack
    assert "pack of" in res.stderr, res.stderr
    runs = _children(root)
    points = 2 * 3
    assert len(runs) == points and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["sgdnoise.run_key"] for r in runs}) == points  # each once
    source = hashlib.sha256((root / "nets.py").read_bytes()).hexdigest()
    for r in runs:
        assert r.data.tags["sgdnoise.model_source_sha256"] == source
        assert r.data.tags["sgdnoise.data_checksum"] == meta["checksum"]
        assert r.data.params["model.name"] == "nets.py:make_net"
        assert r.data.params["model.kwargs.width"] == "8"
        assert r.data.params["derived.bn_batch"] == "16"  # ghost batches of 16

    # Again: nothing to train, no run added.
    again = cli(root, "sweep", STUDY, "--workers", "2", *toy)
    assert again.returncode == 0 and "nothing to run" in again.stderr, again.stderr
    assert len(_children(root)) == points

    res = cli(root, "analyze", STUDY, *toy)
    assert res.returncode == 0, res.stderr
    out = root / "results" / STUDY
    table = (out / "table.md").read_text()
    assert "| momentum | 16 |" in table and "| momentum | 64 |" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_runs"] == points and set(summary["groups"]) == {
        "momentum/B=16", "momentum/B=64"}  # fmt: skip
    assert list(out.glob("*.png"))

    # From Python, in the project folder as a notebook would be: the same table.
    import pandas as pd

    import sgdnoise

    monkeypatch.chdir(root)
    runs_df = sgdnoise.load_runs(STUDY)
    assert len(runs_df) == points and set(runs_df["batch_size"]) == {16, 64}
    table_df = sgdnoise.load_table(STUDY)
    written = pd.read_csv(out / "table.csv")
    assert list(table_df["batch_size"]) == list(written["batch_size"]) == [16, 64]
    assert table_df["metric_mean"].to_list() == pytest.approx(written["metric_mean"].to_list())
    with pytest.raises(LookupError):
        sgdnoise.load_table("no_such_study")


def test_the_example_pipeline_with_dvc_tracks_the_data_file(tmp_path: Path) -> None:
    root = _copy(tmp_path / "own_model")
    params = _toy(yaml.safe_load((root / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(root, "git", "init", "-q")
    _run(root, "dvc", "init", "-q")
    _run(root, "git", "add", "-A")
    _run(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")

    def ran(res: subprocess.CompletedProcess) -> set[str]:
        text = res.stdout + res.stderr
        return {ln.split("'")[1] for ln in text.splitlines() if ln.startswith("Running stage")}

    all_stages = {"data", "prepare", f"sweep@{STUDY}", f"analyze@{STUDY}"}
    assert ran(_run(root, "dvc", "repro")) == all_stages
    assert (root / "results" / STUDY / "table.md").is_file()
    first = json.loads((root / "results/sweeps" / f"{STUDY}.json").read_text())
    assert first["done"] and first["finished"] == first["points"] == 6
    assert ran(_run(root, "dvc", "repro")) == set()
    # Other data (another seed for make_data.py): prepared again, and since the data is part
    # of every run's identity, a new grid of runs is trained and analyzed.
    script = root / "make_data.py"
    script.write_text(script.read_text().replace('"--seed", type=int, default=0',
                                                 '"--seed", type=int, default=1'))  # fmt: skip
    assert ran(_run(root, "dvc", "repro")) == all_stages
    second = json.loads((root / "results/sweeps" / f"{STUDY}.json").read_text())
    assert second["grid_hash"] != first["grid_hash"] and second["finished"] == 6
    assert len(_children(root)) == 12
