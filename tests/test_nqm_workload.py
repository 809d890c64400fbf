"""The NQM as a workload: `sgdnoise nqm` and `train` with data/model nqm, like any run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from sgdnoise.optim import lr_table
from sgdnoise.theory import nqm

from helpers import cli, tracking_uri


def test_nqm_shortcut_prints_exact_final_loss_and_steps_to_target(project: Path) -> None:
    args = ["-P", "train.lr_eff=0.5", "-P", "train.batch_size=64", "-P", "nqm.dim=500"]
    args += [
        "-P",
        "nqm.target=1.0",
        "-P",
        "train.budget.value=400",
        "-P",
        "train.schedule=constant",
    ]
    res = cli(project, "nqm", "--json", *args)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    expect = nqm.run(
        nqm.NQMConfig(dim=500),
        batch_size=64,
        momentum=0.9,
        lrs_eff=np.asarray(lr_table("constant", 0.5, 400)),
        target=1.0,
    )
    assert abs(out["final_loss"] - expect["final_loss"]) <= 1e-12 * expect["final_loss"]
    assert out["steps_to_target"] == expect["steps_to_target"] is not None
    assert not (project / "data").exists()  # nothing to prepare
    # A target never reached is null.
    res = cli(project, "nqm", "--json", *args, "-P", "nqm.target=1e-9")
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps_to_target"] is None


def test_nqm_through_train_is_tracked_and_rejects_epochs(project: Path) -> None:
    base = ["-P", "data.name=nqm", "-P", "model.name=nqm", "-P", "nqm.dim=200"]
    res = cli(project, "train", "--json", *base, "-P", "train.lr_eff=2^6")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == "diverged"  # far beyond the stability limit: data, not a crash
    run = MlflowClient(tracking_uri(project)).get_run(out["run_id"])
    assert run.data.params["nqm.dim"] == "200" and run.data.tags["sgdnoise.status"] == "diverged"
    bad = cli(project, "train", *base, "-P", "train.budget.unit=epochs")
    assert bad.returncode == 2 and bad.stderr.startswith("error: train.budget.unit:")
