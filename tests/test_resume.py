"""Long runs survive preemption: checkpoints, exact resume, clean faults."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sgdnoise.checkpoint import Checkpointer, CheckpointError
from sgdnoise.config import from_dict, with_values

from helpers import SMALL, cli, tracking_uri, write_project

ARGS = [
    # Long enough that three kills, each at most one checkpoint interval plus 0.2 s after a
    # new checkpoint, land before the end on a fast machine too (~0.3 ms per step).
    "-P", "train.batch_size=16", "-P", "train.budget.value=6000", "-P", "train.eval_points=6",
    "-P", "train.checkpoint_every.unit=steps", "-P", "train.checkpoint_every.value=500",
    "-P", "train.micro_batch_size=8",
]  # fmt: skip


def _start(root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sgdnoise.cli", "train", "--json", *ARGS],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _ckpt_steps(root: Path) -> list[int]:
    found = list((root / "checkpoints").glob("*/step-*.pt"))
    return sorted(int(p.stem.split("-")[1]) for p in found)


def _wait_for_new_checkpoint(root: Path, proc: subprocess.Popen, after: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        steps = _ckpt_steps(root)
        if steps and steps[-1] > after:
            return
        time.sleep(0.05)
    raise AssertionError("no new checkpoint appeared")


def _history(mlf: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = ("train_loss", "test_loss", "test_accuracy", "lr", "grad_noise_scale")
    return {k: sorted((m.step, m.value) for m in mlf.get_metric_history(run_id, k)) for k in keys}


def test_kill_9_three_times_then_resume_equals_uninterrupted(project: Path) -> None:
    res = cli(project, "train", "--json", *ARGS)
    assert res.returncode == 0, res.stderr
    whole = json.loads(res.stdout.strip().splitlines()[-1])
    assert _ckpt_steps(project) == []  # a finished run clears its checkpoints

    rng = random.Random(7)
    last = 0
    for _ in range(3):
        proc = _start(project)
        _wait_for_new_checkpoint(project, proc, last)
        time.sleep(rng.uniform(0.0, 0.2))  # somewhere between two checkpoints
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last = _ckpt_steps(project)[-1]
    res = cli(project, "train", "--json", *ARGS)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    resumed = json.loads(res.stdout.strip().splitlines()[-1])

    assert resumed["state_sha256"] == whole["state_sha256"]
    assert resumed["run_key"] == whole["run_key"] and resumed["run_id"] != whole["run_id"]
    mlf = MlflowClient(tracking_uri(project))
    assert _history(mlf, resumed["run_id"]) == _history(mlf, whole["run_id"])
    run = mlf.get_run(resumed["run_id"])
    assert run.info.status == "FINISHED"
    # One MLflow run for the interrupted one, resumed three times: params logged once.
    runs = mlf.search_runs([run.info.experiment_id])
    assert len(runs) == 2


def test_sigterm_checkpoints_and_exits_75_then_resumes_the_same_run(project: Path) -> None:
    proc = _start(project)
    _wait_for_new_checkpoint(project, proc, 0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "preempted" in err
    steps = _ckpt_steps(project)
    assert steps, "SIGTERM left no checkpoint"
    state = Checkpointer(
        from_dict(with_values(SMALL, {"train.checkpoint_every.unit": "steps"})), project
    )
    state.dir = next((project / "checkpoints").iterdir())
    loaded = state.load_latest()
    assert loaded is not None and loaded["step"] == steps[-1]
    mlf = MlflowClient(tracking_uri(project))
    run_id = loaded["run_id"]
    assert mlf.get_run(run_id).info.status == "KILLED"

    res = cli(project, "train", "--json", *ARGS)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["run_id"] == run_id
    assert mlf.get_run(run_id).info.status == "FINISHED"


def _checkpointer(tmp_path: Path) -> Checkpointer:
    cfg = from_dict(with_values(SMALL, {"train.checkpoint_every.unit": "steps"}))
    return Checkpointer(cfg, tmp_path)


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, capsys) -> None:
    ck = _checkpointer(tmp_path)
    for step in (10, 20, 30):
        ck.save(step, {"step": step, "w": torch.full((100,), float(step))})
    assert sorted(p.name for p in ck.dir.iterdir()) == ["step-20.pt", "step-30.pt"]  # pruned
    latest = ck.dir / "step-30.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    state = ck.load_latest()
    assert state is not None and state["step"] == 20 and state["w"][0] == 20.0
    assert "step-30.pt is damaged" in capsys.readouterr().err


def test_disk_full_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    ck = _checkpointer(tmp_path)
    ck.save(10, {"step": 10})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="No space left"):
        ck.save(20, {"step": 20})
    assert sorted(p.name for p in ck.dir.iterdir()) == ["step-10.pt"]  # no temporary left
    assert ck.load_latest()["step"] == 10


def test_unreachable_tracking_store_fails_before_training(tmp_path: Path) -> None:
    root = write_project(tmp_path / "proj", SMALL)
    # Nothing listens on port 9 of the loopback: the connection is refused at once.
    res = cli(root, "train", "-P", "tracking.uri=http://user:secret@127.0.0.1:9", timeout=120)
    assert res.returncode == 3, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: tracking.uri: cannot use http://***@127.0.0.1:9")
    assert "secret" not in res.stderr
    assert not (root / "checkpoints").exists()
