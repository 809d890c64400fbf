"""Many machines, end to end: a real `mlflow server` on loopback (SQLite backend, artifacts
stored and served by the server) and a throwaway PostgreSQL for Optuna. Two "machines"
are two working directories sharing nothing but the two URLs; one dies (`kill -9` of its
whole process group) in the middle of a run. Every grid point still ends with exactly
one FINISHED run on the server, and a third directory builds the tables from the server
alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from pg import throwaway_postgres

STUDY: dict[str, Any] = {
    "grid": {"train": {"lr_eff": [0.0625, 0.125, 0.25, 0.5], "seed": [0]}},
    # Seconds per run: time to kill a machine in the middle of one.
    "fixed": {"train": {"budget": {"unit": "steps", "value": 8000}}},
    "metric": {"name": "final_test_accuracy", "direction": "maximize"},
    "edges": {"extend": False},
    "heartbeat": {"interval": 1, "grace_period": 3},
}
PARAMS: dict[str, Any] = {
    "data": {"name": "synthetic", "num_samples": 200},
    "model": {"name": "mlp", "width": 8},
    "train": {"batch_size": 16, "eval_points": 1, "threads": 1, "pack": 1},
    "studies": {"far": STUDY},
}


def machine(root: Path) -> Path:
    """A working directory of its own: params.yaml and nothing else."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    return root


def env(tracking: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SGDNOISE_"))}
    out.pop("OMP_NUM_THREADS", None)
    return {**out, "MLFLOW_TRACKING_URI": tracking, "PYTHONUNBUFFERED": "1"}


def sgdnoise(root: Path, tracking: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "sgdnoise.cli", *args], cwd=root,
                          env=env(tracking), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def worker(root: Path, tracking: str, storage: str) -> subprocess.Popen:
    # Its own process group: killing the group is the machine dying.
    return subprocess.Popen(
        [sys.executable, "-m", "sgdnoise.cli", "sweep", "far", "--workers", "1",
         "--storage", storage],
        cwd=root, env=env(tracking), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip


def test_two_machines_sharing_two_urls_one_killed_every_point_once(tmp_path: Path) -> None:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from sgdnoise.server import serving

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    backend = f"sqlite:///{server_dir / 'mlflow.db'}"
    with (
        throwaway_postgres() as storage,
        open(server_dir / "server.log", "w") as log,
        serving(backend, artifacts=server_dir / "artifacts", log=log) as tracking,
    ):
        a, b = machine(tmp_path / "a"), machine(tmp_path / "b")
        mlf = MlflowClient(tracking_uri=tracking)
        procs = {"a": worker(a, tracking, storage)}
        time.sleep(2)  # a creates the study; b joins it
        procs["b"] = worker(b, tracking, storage)

        def running() -> list[Any]:
            exp = mlf.get_experiment_by_name("sgdnoise/far")
            if exp is None:
                return []
            return mlf.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' "
                                   "and tags.`sgdnoise.kind` = 'run'")  # fmt: skip

        deadline = time.monotonic() + 180
        while not (live := running()):
            assert time.monotonic() < deadline, "no run started"
            assert all(p.poll() is None for p in procs.values())
            time.sleep(0.2)
        victim = live[0]
        pid = int(victim.data.tags["sgdnoise.worker"].rsplit("-", 2)[1])  # <host>-<pid>-<nonce>
        dead = next(k for k, p in procs.items() if os.getpgid(pid) == p.pid)
        os.killpg(procs[dead].pid, signal.SIGKILL)
        procs[dead].wait(30)
        survivor = "b" if dead == "a" else "a"
        out = procs[survivor].communicate(timeout=300)[0]
        assert procs[survivor].returncode == 0, out
        assert "is dead; point queued again" in out, out

        # Exactly one FINISHED run per point, on the server; the killed run superseded.
        exp = mlf.get_experiment_by_name("sgdnoise/far")
        runs = mlf.search_runs([exp.experiment_id], "tags.`sgdnoise.kind` = 'run'",
                               run_view_type=ViewType.ALL)  # fmt: skip
        finished = [r for r in runs if r.info.status == "FINISHED"]
        keys = Counter(r.data.tags["sgdnoise.run_key"] for r in finished)
        assert len(keys) == 4 and set(keys.values()) == {1}, keys
        assert {r.info.lifecycle_stage for r in finished} == {"active"}
        gone = mlf.get_run(victim.info.run_id)
        assert (gone.info.status, gone.info.lifecycle_stage) == ("KILLED", "deleted")
        assert not [r for r in runs if r.info.status == "RUNNING"]
        st = json.loads(
            sgdnoise(a, tracking, "status", "far", "--storage", storage, "--json").splitlines()[-1]
        )
        assert st["done"] and st["remaining"] == 0, st

        # A third directory, with nothing but the server: the tables.
        c = machine(tmp_path / "c")
        sgdnoise(c, tracking, "analyze", "far")
        table = (c / "results" / "far" / "table.csv").read_text()
        summary = json.loads((c / "results" / "far" / "summary.json").read_text())
        assert summary["n_runs"] == 4 and table.count("\n") >= 2
        parent = summary["parent_run_id"]
        arts = [f.path for f in mlf.list_artifacts(parent, "analysis")]
        assert "analysis/table.csv" in arts  # uploaded through the server
    assert list((server_dir / "artifacts").rglob("table.csv"))  # stored by the server
    for root in (a, b, c):  # nothing recorded locally on any machine
        assert not (root / "mlflow.db").exists() and not (root / "mlruns").exists()


def test_a_worker_finding_the_tables_half_made_tries_again(tmp_path: Path) -> None:
    """Workers on two machines that start at once: one has made Optuna's tables and is
    making their version table (its transaction still open) when the other asks whether
    the study exists. The other's version table collides with it (a duplicate key, once
    seen in CI); it tries again a second later, when the table is there, instead of
    failing."""
    import threading

    import sqlalchemy
    from optuna.storages._rdb import models

    from sgdnoise.sweep.spec import Heartbeat
    from sgdnoise.sweep.storage import open_storage

    with throwaway_postgres() as url:
        storage = open_storage(url, tmp_path, "far", Heartbeat())
        engine = sqlalchemy.create_engine(storage.url)
        models.BaseModel.metadata.create_all(engine)  # the first worker's tables, committed
        with engine.connect() as conn:
            tx = conn.begin()
            conn.execute(sqlalchemy.text(
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
            ))  # fmt: skip
            committed = threading.Timer(1.0, tx.commit)
            committed.start()
            try:
                assert storage.exists("far") is False  # waited, collided, tried again
            finally:
                committed.join()
        with engine.connect() as conn:
            versions = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version"))
            assert len(versions.fetchall()) == 1  # stamped once, by the one that retried
        engine.dispose()
        storage.release()
