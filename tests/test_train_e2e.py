"""One tracked run through the real CLI and a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sgdnoise import tracking
from sgdnoise.config import from_dict, load_config, with_values

from fakes import write_fake_cifar10, write_fake_mnist
from helpers import SMALL, cli, tracking_uri

REPO = Path(__file__).resolve().parents[1]


def _result(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_divergence_is_data_not_a_crash(project: Path) -> None:
    out = _result(
        cli(project, "train", "-P", "train.lr_eff=2^10", "-P", "train.budget.value=60", "--json")
    )
    assert out["status"] == "diverged" and out["diverged"] == 1.0
    assert out["steps"] < 60  # stopped early, at the step it was detected
    run = MlflowClient(tracking_uri(project)).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["sgdnoise.status"] == "diverged"
    assert run.data.metrics["diverged"] == 1.0


def test_run_record_holds_config_metrics_and_provenance(project: Path) -> None:
    sub = project / "sub"
    sub.mkdir()
    # Run from a subdirectory: the store is still the one at the project root.
    out = _result(cli(sub, "train", "-P", "train.lr_eff=0.25", "--json"))
    assert out["status"] == "finished" and len(out["state_sha256"]) == 64
    assert not (sub / "mlflow.db").exists()
    mlf = MlflowClient(tracking_uri(project))
    run = mlf.get_run(out["run_id"])
    cfg = load_config(project / "params.yaml", ["train.lr_eff=0.25"])

    assert run.info.status == "FINISHED"
    assert run.info.run_name == "momentum B=32 lr=2^-2 20st s0"
    for key, value in cfg.flat().items():
        assert run.data.params[key] == ("null" if value is None else str(value)), key
    assert run.data.params["derived.accumulation"] == "1"
    for key in ("final_train_loss", "final_test_loss", "final_test_accuracy", "diverged", "steps"):
        assert run.data.metrics[key] == out[key], key
    assert run.data.metrics["epochs"] == 20 * 32 / 480
    assert run.data.metrics["examples_per_second"] > 0
    for key in ("train_loss", "test_loss", "test_accuracy", "lr"):
        steps = [m.step for m in mlf.get_metric_history(out["run_id"], key)]
        assert steps == [0, 10, 20], key  # eval_points=2 plus the final one

    tags = run.data.tags
    meta = json.loads((project / "data/prepared/mnist1d/meta.json").read_text())
    assert tags["sgdnoise.run_key"] == cfg.run_key == out["run_key"]
    assert tags["sgdnoise.status"] == "finished"
    assert tags["sgdnoise.data_checksum"] == meta["checksum"]
    assert tags["sgdnoise.git_commit"]
    versions = json.loads(tags["sgdnoise.versions"])
    assert {"python", "torch", "mlflow", "accelerate", "sgdnoise"} <= versions.keys()
    assert tags["sgdnoise.device"] == "cpu" and tags["sgdnoise.processes"] == "1"

    art = Path(mlf.download_artifacts(out["run_id"], "config.json", str(project / "dl")))
    assert json.loads(art.read_text()) == cfg.to_dict()
    assert str(project / "mlruns") in run.info.artifact_uri  # artifacts beside the store


def test_same_config_same_run(project: Path) -> None:
    a = _result(cli(project, "train", "--no-track", "--json"))
    b = _result(cli(project, "train", "--no-track", "--json"))
    assert a["state_sha256"] == b["state_sha256"]
    c = _result(cli(project, "train", "--no-track", "--json", "-P", "train.seed=1"))
    assert c["state_sha256"] != a["state_sha256"]


def test_mlflow_run_entry_point_offline(project: Path) -> None:
    for name in ("MLproject", "python_env.yaml"):
        shutil.copy(REPO / name, project / name)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(project)}
    cmd = [
        sys.executable, "-m", "mlflow", "run", str(project), "-e", "train",
        "-P", "train.lr_eff=0.5", "-P", "train.budget.value=10", "--env-manager", "local",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    out = _result(res)
    run = MlflowClient(tracking_uri(project)).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert run.data.params["train.lr_eff"] == "0.5"
    assert run.data.metrics["steps"] == 10.0
    assert run.data.tags["sgdnoise.status"] == "finished"


def test_torchvision_formats_train_a_few_steps(project: Path) -> None:
    raw = project / "data" / "raw"
    write_fake_cifar10(raw, 64, 32)
    write_fake_mnist(raw, 64, 32)
    write_fake_mnist(raw, 64, 32, cls_name="FashionMNIST")
    runs = [
        ("cifar10", "wrn", "ghost", ["-P", "model.depth=10", "-P", "model.width=1"]),
        ("mnist", "mlp", "none", []),
        ("fashion_mnist", "autoencoder", "none", []),
    ]
    for data, model, norm, extra in runs:
        args = ["-P", f"data.name={data}", "-P", f"model.name={model}", "-P", f"model.norm={norm}"]
        args += [
            "-P",
            "train.batch_size=16",
            "-P",
            "train.budget.value=3",
            "-P",
            "model.ghost_batch_size=8",
        ]
        out = _result(cli(project, "train", "--json", *args, *extra))
        assert out["status"] == "finished" and out["steps"] == 3.0, data
        assert ("final_test_accuracy" in out) == (model != "autoencoder")
        meta = json.loads((project / "data/prepared" / data / "meta.json").read_text())
        assert meta["n_train"] == 64 and meta["n_test"] == 32


def test_full_batch_gradient_descent_says_so_in_its_params(project: Path) -> None:
    out = _result(cli(project, "train", "-P", "train.batch_size=480", "--json"))
    assert out["status"] == "finished" and out["steps"] == 20.0
    assert out["epochs"] == 20.0  # every step sees the whole training set
    params = MlflowClient(tracking_uri(project)).get_run(out["run_id"]).data.params
    assert params["derived.full_batch"] == "True" and params["derived.n_train"] == "480"
    small = _result(cli(project, "train", "-P", "train.batch_size=479", "--json"))
    params = MlflowClient(tracking_uri(project)).get_run(small["run_id"]).data.params
    assert params["derived.full_batch"] == "False"


def test_curves_on_a_subset_leave_the_run_and_its_final_metrics_unchanged(project: Path) -> None:
    """train.eval_subset: evaluations before the last use a fixed subset of each split; the
    training itself and the final (full-set) metrics are those of a full-set run."""
    args = ["train", "--json", "-P", "train.eval_points=4"]
    full = _result(cli(project, *args))
    sub = _result(cli(project, *args, "-P", "train.eval_subset=50"))
    assert sub["state_sha256"] == full["state_sha256"]
    for key in ("final_train_loss", "final_test_loss", "final_test_accuracy"):
        assert sub[key] == full[key], key
    mlf = MlflowClient(tracking_uri(project))
    curve = {m.step: m.value for m in mlf.get_metric_history(sub["run_id"], "test_accuracy")}
    full_curve = {m.step: m.value for m in mlf.get_metric_history(full["run_id"], "test_accuracy")}
    assert sorted(curve) == sorted(full_curve) == [0, 5, 10, 15, 20]
    assert curve[20] == full_curve[20]  # the final evaluation: full sets
    # 50 of 120 test examples: accuracies in steps of 1/50, unlike the full set's 1/120.
    assert all(abs(curve[s] * 50 - round(curve[s] * 50)) < 1e-6 for s in (0, 5, 10, 15))
    assert any(abs(full_curve[s] * 50 - round(full_curve[s] * 50)) > 1e-6 for s in (0, 5, 10, 15))


def test_train_shows_progress_a_line_per_evaluation_or_a_bar_on_a_terminal(
    project: Path,
) -> None:
    args = ["train", "--no-track", "-P", "train.eval_points=4"]
    res = cli(project, *args)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("step ")]
    assert [x.split(":")[0] for x in lines] == [
        "step 0/20 (0%)", "step 5/20 (25%)", "step 10/20 (50%)", "step 15/20 (75%)",
        "step 20/20 (100%)",
    ]  # fmt: skip
    assert "test acc" in lines[-1] and "ex/s" in lines[-1] and "left" in lines[-1]
    assert not [x for x in cli(project, *args, "--quiet").stderr.splitlines() if "step " in x]

    # On a terminal: a tqdm bar (steps, rate, time left) instead of the lines.
    import pty

    main, replica = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgdnoise.cli", *args, "-P", "train.budget.value=64"],
        cwd=project, stdout=subprocess.DEVNULL, stderr=replica, close_fds=True,
    )  # fmt: skip
    os.close(replica)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=120) == 0
    text = out.decode(errors="replace")
    assert "64/64" in text and "ex/s" in text and "step 0/" not in text, text[-2000:]


def test_a_process_looks_its_experiment_up_once_and_again_when_it_is_gone(
    tmp_path: Path,
) -> None:
    """A sweep worker creates hundreds of runs in one experiment: it asks the store for the
    experiment's id once, not once per run. When the experiment is deleted meanwhile, the
    next run looks it up again and fails with one line, as it would have without the cache."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = from_dict(with_values(SMALL, {"tracking.uri": uri, "tracking.experiment": "once"}))
    lookups: list[str] = []
    real = MlflowClient.get_experiment_by_name

    def counted(self: MlflowClient, name: str):
        lookups.append(name)
        return real(self, name)

    MlflowClient.get_experiment_by_name = counted  # type: ignore[method-assign]
    try:
        ids = []
        for i in range(3):
            t = tracking.RunTracker(cfg, tmp_path)
            ids.append(t.start(params={"i": i}, tags={}, run_name=f"r{i}"))
            t.finish({"steps": 1.0}, {}, "FINISHED")
        assert lookups == ["once"]
        mlf = MlflowClient(uri)
        assert {mlf.get_run(r).info.experiment_id for r in ids} == {
            mlf.get_experiment_by_name("once").experiment_id
        }
        mlf.delete_experiment(mlf.get_run(ids[0]).info.experiment_id)
        lookups.clear()
        with pytest.raises(tracking.TrackingUnavailable, match="cannot use"):
            tracking.RunTracker(cfg, tmp_path).start(params={}, tags={}, run_name="late")
        assert lookups == ["once"]  # the cached id failed; it was looked up again
    finally:
        MlflowClient.get_experiment_by_name = real  # type: ignore[method-assign]
