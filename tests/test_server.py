"""The MLflow side as users meet it, through a real tracking server's REST API.

Each study is its own experiment (`<tracking.experiment>/<study>`): its runs table is its
grid. The study's parent run carries the results as metrics with step = B, so that its
charts are the paper's figures. `sgdnoise ui` serves the store with a light server and
prints both links in the model-training view; Ctrl-C leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

STUDY: dict[str, Any] = {
    "fixed": {"train": {"budget": {"unit": "steps", "value": 12}}},
    "grid": {"train": {"batch_size": [8, 16], "lr_eff": [0.05, 0.1, 0.2], "seed": [0]}},
    "metric": {"name": "final_test_accuracy", "direction": "maximize"},
    "edges": {"extend": False},
}
BASE: dict[str, Any] = {
    "data": {"name": "synthetic", "num_samples": 200},
    "model": {"name": "mlp", "width": 8},
    "train": {"batch_size": 16, "eval_points": 1, "threads": 1},
    "studies": {"tiny": STUDY},
}


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SGDNOISE_"))}
    out.pop("OMP_NUM_THREADS", None)
    out["PYTHONUNBUFFERED"] = "1"
    return out


def sgdnoise(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "sgdnoise.cli", *args], cwd=root, env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def rest(base: str, endpoint: str, **query: Any) -> dict[str, Any]:
    url = f"{base}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def rest_post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def processes_mentioning(needle: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmd:
                out.append(int(d.name))
    return out


def test_ui_serves_one_experiment_per_study_with_its_figures_on_the_parent_run(
    tmp_path: Path,
) -> None:
    from sgdnoise.server import free_port

    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
    sgdnoise(root, "sweep", "tiny")
    sgdnoise(root, "analyze", "tiny")
    summary = json.loads((root / "results" / "tiny" / "summary.json").read_text())

    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "sgdnoise.cli", "ui", "--port", str(port)], cwd=root, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = ui.stdout.readline()
            assert line, "".join(lines)  # it exited
            lines.append(line)
            if line.startswith("store: "):  # the last line
                break
        text = "".join(lines)
        base = f"http://127.0.0.1:{port}"
        assert f"serving {base}" in text, text

        # One experiment per study: its runs table (active runs) is the study's grid.
        exp = rest(base, "experiments/get-by-name", experiment_name="sgdnoise/tiny")
        exp_id = exp["experiment"]["experiment_id"]
        runs = rest_post(base, "runs/search", {"experiment_ids": [exp_id], "max_results": 100})
        runs = runs["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
        assert sorted(t["sgdnoise.kind"] for t in tags) == ["run"] * 6 + ["study"]
        parent_id = next(r["info"]["run_id"] for r, t in zip(runs, tags, strict=True)
                         if t["sgdnoise.kind"] == "study")  # fmt: skip
        assert summary["parent_run_id"] == parent_id

        # The links: the study's runs table and its parent run, in the model-training view.
        runs_link = (
            f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
            "&viewStateShareKey=grid"
        )
        # That link opens the view the sweep shared on the experiment: the grid points
        # (not the parent), grouped by B, the grid's axes and the metric as columns.
        shared = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
        view = json.loads(shared["mlflow.sharedViewState.grid"])
        assert view["searchFilter"] == "tags.`sgdnoise.kind` = 'run'"
        assert view["groupBy"]["groupByKeys"] == [
            {"mode": "param", "groupByData": "train.batch_size"}
        ]
        assert view["selectedColumns"][:3] == [
            "params.`train.batch_size`", "params.`train.lr_eff`", "params.`train.seed`"
        ]  # fmt: skip
        assert "metrics.`final_test_accuracy`" in view["selectedColumns"]
        parent_link = (
            f"{base}/#/experiments/{exp_id}/runs/{parent_id}?workflowType=machine_learning"
        )
        assert re.search(rf"^tiny:\n  runs: +{re.escape(runs_link)}\n  parent: +"
                         rf"{re.escape(parent_link)}$", text, re.M), text  # fmt: skip

        # The parent run's charts are the paper's figures: one point per batch size.
        series = sorted(summary["regimes"])
        assert series
        for s in series:
            want = {
                int(k.rpartition("=")[2]): g["lr_opt"]
                for k, g in summary["groups"].items()
                if k.startswith(f"{s}/B=") and g.get("lr_opt") is not None
            }
            assert set(want) == {8, 16}
            hist = rest(base, "metrics/get-history", run_id=parent_id,
                        metric_key=f"optimal_lr_eff/{s}")["metrics"]  # fmt: skip
            assert {m["step"]: m["value"] for m in hist} == want
            best = rest(base, "metrics/get-history", run_id=parent_id,
                        metric_key=f"best_test_accuracy/{s}")["metrics"]  # fmt: skip
            assert sorted(m["step"] for m in best) == [8, 16]
        # The table as MLflow renders it, beside the analysis files.
        arts = rest(base, "artifacts/list", run_id=parent_id, path="analysis")["files"]
        names = {Path(a["path"]).name for a in arts}
        assert {"table.json", "table.md", "optimal_lr_vs_batch.png"} <= names
    finally:
        ui.send_signal(signal.SIGINT)  # Ctrl-C
        ui.communicate(timeout=60)
    assert ui.returncode == 0
    # Nothing left behind: no server process, nobody listening on the port.
    assert processes_mentioning(f"--port {port}") == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
