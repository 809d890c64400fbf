"""A local MLflow tracking server over a store: what `sgdnoise ui` serves, what the UI
screenshots and the many-machine tests run against.

Light on purpose: one uvicorn worker and no job runner (MLflow 3 otherwise starts 4
workers and a task queue with 7 consumers, on machines with 2 cores), bound to 127.0.0.1,
and in its own process group, so that `stop` leaves no process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sgdnoise import contract as C
from sgdnoise.tracking import GRID_VIEW, shared_views

HOST = "127.0.0.1"
# MLflow opens a fresh browser in its GenAI view; this query opens the model-training one.
TRAINING_VIEW = "workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def command(uri: str, port: int, artifacts: str | Path | None = None) -> list[str]:
    """`mlflow server` over `uri`; with `artifacts`, the server stores and serves the
    artifacts itself (clients then need no access to that folder: the many-machine path)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", uri]
    if artifacts is not None:
        dest = Path(artifacts).resolve().as_uri() if "://" not in str(artifacts) else artifacts
        cmd += ["--serve-artifacts", "--artifacts-destination", str(dest)]
    return cmd


def start(
    uri: str, port: int, artifacts: str | Path | None = None, log: IO | None = None
) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the server is the store, not a client of one
    return subprocess.Popen(
        command(uri, port, artifacts), env=env, start_new_session=True,
        stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
    )  # fmt: skip


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 120.0) -> str:
    """The server's base URL once /health answers; RuntimeError if it exits or never does."""
    base = f"http://{HOST}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return base
        time.sleep(0.3)
    stop(proc)
    raise RuntimeError(f"mlflow server not ready on {base} after {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the server's whole process group (uvicorn's workers included), SIGKILL
    after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
            # The group may outlive its leader for a moment: make sure it is gone.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def serving(
    uri: str, port: int | None = None, artifacts: str | Path | None = None, log: IO | None = None
) -> Iterator[str]:
    """A server for the duration of a `with` block; yields its base URL."""
    port = port or free_port()
    proc = start(uri, port, artifacts, log)
    try:
        yield wait_ready(proc, port)
    finally:
        stop(proc)


@dataclass(frozen=True)
class StudyLinks:
    study: str
    experiment: str
    runs: str  # the study's runs table (its grid points, grouped), model-training view
    parent: str | None  # the study's parent run: its charts are the paper's figures


def study_links(uri: str, base_url: str, experiment_prefix: str) -> list[StudyLinks]:
    """Per study in the store (experiments named `<prefix>/<study>`), the two links."""
    from mlflow.entities import ViewType

    from sgdnoise.tracking import client

    mlf = client(uri)
    out = []
    for exp in sorted(mlf.search_experiments(ViewType.ACTIVE_ONLY), key=lambda e: e.name):
        if not exp.name.startswith(f"{experiment_prefix}/"):
            continue
        parents = mlf.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{C.KIND}` = '{C.KIND_STUDY}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )  # fmt: skip
        page = f"{base_url}/#/experiments/{exp.experiment_id}"
        parent = f"{page}/runs/{parents[0].info.run_id}?{TRAINING_VIEW}" if parents else None
        study = exp.name[len(experiment_prefix) + 1 :]
        runs = f"{page}/runs?{TRAINING_VIEW}"
        if GRID_VIEW in shared_views(exp):  # the sweep's view of the grid (tracking.py)
            runs += f"&viewStateShareKey={GRID_VIEW}"
        out.append(StudyLinks(study, exp.name, runs, parent))
    return out
