"""One truth about what ran: a sweep's points are done only where their runs are.

The Optuna journal and the MLflow store are separate files. A sweep whose runs are not in
the tracking store it uses now (a fresh store, another server) must not call itself
complete: it stops with one line naming the store that holds them and the two ways on
(point at that store, or `--restart`). Experiments that DVC runs in a temporary copy of the
repository record their runs in the repository's own store, not in the copy DVC deletes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STUDY: dict[str, Any] = {
    "fixed": {"train": {"budget": {"unit": "steps", "value": 12}}},
    "grid": {"train": {"lr_eff": [0.05, 0.1], "seed": [0]}},
    "metric": {"name": "final_test_accuracy", "direction": "maximize"},
    "edges": {"extend": False},
}
BASE: dict[str, Any] = {
    "data": {"name": "synthetic", "num_samples": 200},
    "model": {"name": "mlp", "width": 8},
    "train": {"batch_size": 16, "eval_points": 1, "threads": 1},
    "studies": {"tiny": STUDY},
}


def run(root: Path, *args: str, uri: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SGDNOISE_"))}
    env.pop("OMP_NUM_THREADS", None)
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, "-m", "sgdnoise.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def finished_runs(db: Path) -> list[str]:
    """FINISHED child runs of the study (its grid points), straight from the sqlite file."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE r.status = 'FINISHED' AND t.key = 'sgdnoise.kind' AND t.value = 'run'"
        ).fetchall()
    return [r[0] for r in rows]


def test_a_fresh_store_is_never_told_the_study_is_complete(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
    first = run(root, "sweep", "tiny")
    assert first.returncode == 0, first.stderr[-2000:]
    # The store is in write-ahead-log mode (one disk sync per commit), and once the sweep has
    # ended its log is folded back: the one file holds every run, and a copy of it is whole.
    assert not (root / "mlflow.db-wal").exists()
    with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(finished_runs(root / "mlflow.db")) == 2

    # The same store through another path (a moved project): the runs are found there.
    moved = tmp_path / "moved.db"
    shutil.copy(root / "mlflow.db", moved)
    again = run(root, "sweep", "tiny", uri=f"sqlite:///{moved}")
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr[-2000:]

    # A fresh store: the sweep stops, saying where the runs are and how to go on.
    fresh = tmp_path / "fresh.db"
    stopped = run(root, "sweep", "tiny", uri=f"sqlite:///{fresh}")
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("error: tracking.uri: study 'tiny': 2 of its 2 finished runs are "
                           f"not in sqlite:///{fresh}"), line  # fmt: skip
    assert f"sqlite:///{moved}" in line and "--restart" in line
    assert not fresh.exists() or finished_runs(fresh) == []
    analyze = run(root, "analyze", "tiny", "--no-log", uri=f"sqlite:///{fresh}")
    assert analyze.returncode == 2  # nothing to analyze there, said in one line

    # --restart runs the study again into the store in use; the tables come from it alone.
    restarted = run(root, "sweep", "tiny", "--restart", uri=f"sqlite:///{fresh}")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert len(finished_runs(fresh)) == 2
    table = run(root, "analyze", "tiny", "--no-log", "--out", "res", uri=f"sqlite:///{fresh}")
    assert table.returncode == 0, table.stderr[-2000:]
    assert json.loads((root / "res/summary.json").read_text())["n_runs"] == 2
    assert len(finished_runs(root / "mlflow.db")) == 2  # the first store is untouched


def test_dvc_temporary_experiments_record_runs_in_the_projects_store(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    params = {**BASE, "studies": {"tiny": STUDY}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sweep": {
        "cmd": "sgdnoise sweep tiny --summary sweep.json",
        "params": ["studies.tiny"],
        "outs": [{"sweep.json": {"cache": False}}],
    }}}))  # fmt: skip
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\n/optuna/\n/data/\ncheckpoints/\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SGDNOISE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"

    def sh(*cmd: str) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        return res

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    # Every params.yaml key, study grids included, is one dotted path for -S.
    sh("dvc", "exp", "run", "--temp", "-S", "studies.tiny.fixed.train.budget.value=8")
    runs = finished_runs(root / "mlflow.db")
    assert len(runs) == 2  # in the repository's store, not the deleted copy's
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))
    with sqlite3.connect(root / "mlflow.db") as con:
        steps = {v for (v,) in con.execute(
            "SELECT value FROM params WHERE key = 'train.budget.value'")}  # fmt: skip
    assert steps == {"8.0"}


def test_the_dashboard_serves_the_studys_trials_on_loopback(tmp_path: Path) -> None:
    import socket
    import time
    import urllib.request

    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
    missing = run(root, "dashboard", "tiny")
    assert missing.returncode == 2 and "sgdnoise sweep tiny" in missing.stderr
    assert run(root, "sweep", "tiny").returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SGDNOISE_"))}
    proc = subprocess.Popen([sys.executable, "-m", "sgdnoise.cli", "dashboard", "tiny",
                             "--port", str(port)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline, studies = time.monotonic() + 60, None
        while studies is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as r:
                    studies = json.loads(r.read())["study_summaries"]
            except OSError:
                time.sleep(0.3)
        assert studies is not None, "the dashboard did not answer"
        (study,) = studies
        assert study["study_name"].startswith("tiny-")
        url = f"http://127.0.0.1:{port}/api/studies/{study['study_id']}?after=0"
        with urllib.request.urlopen(url) as r:
            trials = json.loads(r.read())["trials"]
        assert len(trials) == 2 and {t["state"] for t in trials} == {"Complete"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
