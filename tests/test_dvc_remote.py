"""Many machines the DVC way: raw files DVC-tracked as a dependency of `prepare`, the
prepared data shared through a DVC remote (a local directory here), and workers that start
from a fresh `git clone` with nothing but the DVC remote, a PostgreSQL Optuna storage and
an MLflow tracking server (both on loopback). Real git, DVC, PostgreSQL and mlflow server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from pg import throwaway_postgres

from fakes import write_fake_cifar10
from helpers import cli

REPO = Path(__file__).resolve().parents[1]
LRS = [0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0]
PARAMS: dict[str, Any] = {
    "data": {"name": "cifar10", "root": "data/raw"},  # the official files there
    "model": {"name": "mlp", "width": 8},
    "train": {"batch_size": 16, "budget": {"unit": "steps", "value": 4}, "eval_points": 1,
              "eval_subset": None, "threads": 1, "pack": 1},
    "nqm": {"dim": 100},  # unused; the sweep stages of dvc.yaml name every section
    "studies": {"tiny": {
        "grid": {"train": {"lr_eff": LRS, "seed": [0]}},
        "metric": {"name": "final_test_accuracy", "direction": "maximize"},
        "edges": {"extend": False},
        "heartbeat": {"interval": 1, "grace_period": 3},
    }},
}  # fmt: skip
CIFAR = "data/raw/cifar-10-batches-py"
PREPARED = "data/prepared/cifar10"


def sh(root: Path, *cmd: str, env: dict[str, str] | None = None) -> str:
    """A command of the venv (dvc, sgdnoise) or git, in `root`; it must succeed."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    full = {**os.environ, "PATH": path, **(env or {})}
    res = subprocess.run(cmd, cwd=root, env=full, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def git_commit(root: Path, message: str) -> None:
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def source_repo(root: Path, remote: Path | None = None) -> Path:
    """Machine A: the project as a git + DVC repository (what `prepare` needs of it), the
    raw CIFAR-10 files DVC-tracked, as the README's Data section says."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore", "data/raw/README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "src/sgdnoise/data", root / "src/sgdnoise/data",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    write_fake_cifar10(root / "data" / "raw", n_train=64, n_test=32, seed=0)
    sh(root, "dvc", "add", "-q", CIFAR)
    if remote is not None:
        sh(root, "dvc", "remote", "add", "-d", "shared", str(remote))
    git_commit(root, "project with raw data under DVC")
    return root


def prepare_status(root: Path) -> list[Any]:
    return json.loads(sh(root, "dvc", "status", "prepare", "--json")).get("prepare", [])


def meta(root: Path) -> dict[str, Any]:
    return json.loads((root / PREPARED / "meta.json").read_text())


@pytest.fixture(scope="module")
def machine_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Machine A has prepared the data and pushed it to the DVC remote; git carries
    dvc.lock, the raw files' .dvc file and the remote's address."""
    base = tmp_path_factory.mktemp("dvc")
    a = source_repo(base / "a", remote=base / "dvc-remote")
    assert "Running stage 'prepare'" in sh(a, "dvc", "repro", "prepare")
    sh(a, "dvc", "push")
    git_commit(a, "prepared data pushed")
    return a


def test_replacing_a_tracked_raw_file_reruns_prepare(machine_a: Path, tmp_path: Path) -> None:
    root = tmp_path / "a"
    shutil.copytree(machine_a, root, symlinks=True)
    assert prepare_status(root) == []
    before = meta(root)["checksum"]

    write_fake_cifar10(root / "data" / "raw", n_train=64, n_test=32, seed=1)  # new pixels
    assert prepare_status(root) == [{"changed deps": {"data/raw": "modified"}}]
    # What follows reruns too (a dry run: the sweep itself is the other tests' business).
    dry = sh(root, "dvc", "repro", "--dry", "sweep@tiny")
    assert "Running stage 'prepare'" in dry and "Running stage 'sweep@tiny'" in dry, dry
    assert meta(root)["checksum"] == before


def test_fresh_clones_pull_the_prepared_data_and_share_one_sweep(
    machine_a: Path, tmp_path: Path, mlflow_template: Path
) -> None:

    from sgdnoise.server import free_port, start, stop, wait_ready

    tracked = sh(machine_a, "git", "ls-files").split()
    assert {f"{CIFAR}.dvc", "dvc.lock", ".dvc/config"} <= set(tracked), tracked
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    shutil.copy(mlflow_template, server_dir / "mlflow.db")
    port = free_port()
    with open(server_dir / "server.log", "w") as log:
        # The server starts (seconds) while the machines clone and pull.
        server = start(f"sqlite:///{server_dir / 'mlflow.db'}", port, server_dir / "artifacts", log)
    try:
        # Machines B and C: a clone and `dvc pull` of the prepared data alone.
        clones = []
        for name in ("b", "c"):
            sh(tmp_path, "git", "clone", "-q", str(machine_a), name)
            sh(tmp_path / name, "dvc", "pull", PREPARED)
            clones.append(tmp_path / name)
        for clone in clones:
            assert not (clone / CIFAR).exists()
            for f in ("tensors.pt", "meta.json"):
                assert (clone / PREPARED / f).read_bytes() == (
                    machine_a / PREPARED / f
                ).read_bytes()
        with throwaway_postgres() as storage:
            tracking = wait_ready(server, port)
            runs = sweep_from(clones, storage, tracking)
    finally:
        stop(server)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    keys = Counter(r.data.tags["sgdnoise.run_key"] for r in finished)
    assert len(keys) == len(LRS) and set(keys.values()) == {1}, keys
    # One worker process per machine: two worker tags, both machines contributed.
    workers = Counter(r.data.tags["sgdnoise.worker"] for r in finished)
    assert len(workers) == 2, workers
    assert {r.data.tags["sgdnoise.data_checksum"] for r in runs} == {meta(machine_a)["checksum"]}
    for clone in clones:  # nothing recorded on the machines themselves
        assert not (clone / "mlflow.db").exists() and not (clone / "optuna").exists()


def sweep_from(clones: list[Path], storage: str, tracking: str) -> list[Any]:
    """One `sgdnoise sweep` worker per clone, concurrently, told only the two URLs; the
    study's runs on the server afterwards."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SGDNOISE_"))}
    env |= {"MLFLOW_TRACKING_URI": tracking, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sgdnoise.cli", "sweep", "tiny", "--workers", "1",
           "--storage", storage]  # fmt: skip
    # Started together: whichever comes first creates the study (under the storage's
    # lock), the other joins it.
    procs = [subprocess.Popen(cmd, cwd=clone, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for clone in clones]  # fmt: skip
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out
    mlf = MlflowClient(tracking_uri=tracking)
    exp = mlf.get_experiment_by_name("sgdnoise/tiny")
    return mlf.search_runs([exp.experiment_id], "tags.`sgdnoise.kind` = 'run'",
                           run_view_type=ViewType.ALL)  # fmt: skip


def test_a_worker_without_the_data_or_its_files_says_how_to_get_it(
    tmp_path: Path, mlflow_template: Path
) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    write_fake_cifar10(tmp_path / "elsewhere", n_train=64, n_test=32)  # not under data.root
    cases = [
        (["sweep", "tiny", "--workers", "1"], "data.root", "cifar10",
         f"{root / CIFAR} does not exist"),
        (["train", "-P", "data.name=tensors", "-P", "data.path=data/raw/mine.npz"],
         "data.path", "tensors", "mine.npz does not exist"),
    ]  # fmt: skip
    for args, key, name, says in cases:
        res = cli(root, *args)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), res.stderr
        assert says in lines[0], lines[0]
        assert f"`dvc pull data/prepared/{name}`" in lines[0], lines[0]
        assert "`sgdnoise prepare` where the files are" in lines[0], lines[0]
        # Before any work: no mlflow.db, no optuna/, no data/prepared.
        assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]

    # Generated from params: prepared on the spot.
    shutil.copy(mlflow_template, root / "mlflow.db")  # (an empty store, migrated already)
    res = cli(root, "train", "-P", "data.name=mnist1d", "-P", "data.num_samples=200")
    assert res.returncode == 0, res.stderr
    assert (root / "data" / "prepared" / "mnist1d" / "meta.json").is_file()


def test_a_pulled_user_data_folder_stands_for_its_dvc_tracked_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data.name: tensors` identifies runs by the hash of the user's file; a worker that
    pulled only the prepared folder takes that hash from it, when DVC tracks the file."""
    import numpy as np

    from sgdnoise.config import ConfigError, load_config
    from sgdnoise.data.prepare import prepare
    from sgdnoise.data.store import describe

    root = tmp_path / "proj"
    (root / "data" / "raw").mkdir(parents=True)
    (root / "params.yaml").write_text("data: {name: tensors, path: data/raw/mine.npz}\n")
    monkeypatch.chdir(root)
    rng = np.random.default_rng(0)
    np.savez(root / "data/raw/mine.npz", train_x=rng.normal(size=(40, 5)),
             train_y=rng.integers(0, 3, 40), test_x=rng.normal(size=(10, 5)),
             test_y=rng.integers(0, 3, 10))  # fmt: skip
    cfg = load_config(root / "params.yaml", [])
    prepare(cfg.data, root)
    (root / "data/raw/mine.npz").unlink()
    with pytest.raises(ConfigError, match="mine.npz does not exist"):  # a typo, not a pull
        load_config(root / "params.yaml", [])

    (root / "data/raw/mine.npz.dvc").write_text("outs:\n- path: mine.npz\n")
    pulled = load_config(root / "params.yaml", [])
    assert pulled.data.source_sha256 == cfg.data.source_sha256
    assert pulled.run_key == cfg.run_key
    assert describe(pulled.data, root).n_train == 40
