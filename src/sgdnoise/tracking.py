"""Everything MLflow: where the store is, run creation, batched logging, provenance.

Only this module talks to MLflow on the training side. Logging is buffered and sent in
few log_batch calls (one per flush), never once per step.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sgdnoise import __version__
from sgdnoise.config import Config
from sgdnoise.paths import default_tracking_uri, project_root

# A tracking server that does not answer must fail a run in seconds, not after MLflow's
# default minutes of retries with back-off.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

TAG = "sgdnoise."
FLUSH_SECONDS = 60.0


def resolve_uri(cfg: Config, root: Path | None = None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite at the project root (absolute)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative sqlite path would create one database per working directory.
        rel = uri[len("sqlite:///") :]
        uri = f"sqlite:///{(root or project_root()) / rel}"
    return uri


def redact(uri: str) -> str:
    """The URI without user name or password (never logged, tagged or printed)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable uri>"
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


@cache
def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@cache
def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "sgdnoise": __version__}
    for pkg in ("torch", "torchvision", "accelerate", "mlflow", "numpy", "optuna", "dvc"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(mlf, name: str, root: Path | None = None) -> str:
    """Get or create an experiment; local stores keep artifacts under <root>/mlruns."""
    from mlflow.exceptions import MlflowException

    exp = mlf.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlf.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in mlf.tracking_uri:
        location = ((root or project_root()) / "mlruns").as_uri()
    try:
        return mlf.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another worker
        exp = mlf.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _param_value(v: Any) -> str:
    return "null" if v is None else str(v)


class RunTracker:
    """One MLflow run: created (or attached to, under `mlflow run`), buffered, finished."""

    def __init__(self, cfg: Config, root: Path | None = None):
        self.cfg, self.root = cfg, root or project_root()
        self.uri = resolve_uri(cfg, self.root)
        self.mlf = client(self.uri)
        self.run_id: str | None = None
        self._metrics: list[Any] = []
        self._last_flush = time.monotonic()

    def start(
        self,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        run_name: str,
        parent_run_id: str | None = None,
    ) -> str:
        from mlflow.entities import Param, RunTag

        all_tags = {**tags, "mlflow.runName": run_name}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        existing: dict[str, str] = {}
        attached = os.environ.get("MLFLOW_RUN_ID")
        if attached and parent_run_id is None:
            # Started by `mlflow run`: log into the run it created. Params it already
            # logged are immutable, so only the missing ones are added.
            self.run_id = attached
            existing = self.mlf.get_run(attached).data.params
            self.mlf.update_run(attached, status="RUNNING", name=run_name)
        else:
            exp = experiment_id(self.mlf, self.cfg.tracking.experiment, self.root)
            self.run_id = self.mlf.create_run(exp, run_name=run_name, tags=all_tags).info.run_id
            all_tags = {}
        self.mlf.log_batch(
            self.run_id,
            params=[Param(k, _param_value(v)) for k, v in params.items() if k not in existing],
            tags=[RunTag(k, str(v)) for k, v in all_tags.items()],
        )
        self.mlf.log_dict(self.run_id, self.cfg.to_dict(), "config.json")
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._metrics and self.run_id:
            self.mlf.log_batch(self.run_id, metrics=self._metrics)
            self._metrics = []
        self._last_flush = time.monotonic()

    def finish(self, final: Mapping[str, float], tags: Mapping[str, str], status: str) -> None:
        from mlflow.entities import RunTag

        self.log_metrics(final, step=int(final.get("steps", 0)))
        self._flush_with_tags([RunTag(k, str(v)) for k, v in tags.items()])
        self.mlf.set_terminated(self.run_id, status)

    def _flush_with_tags(self, tags: list[Any]) -> None:
        self.mlf.log_batch(self.run_id, metrics=self._metrics, tags=tags)
        self._metrics = []

    def fail(self) -> None:
        """Mark the run FAILED so a crash never leaves it RUNNING."""
        if self.run_id is None:
            return
        try:
            self.flush()
            self.mlf.set_terminated(self.run_id, "FAILED")
        except Exception:  # the original error matters more than this one
            pass


def provenance_tags(
    cfg: Config, root: Path, *, data_checksum: str, device: str, processes: int
) -> dict[str, str]:
    commit = git_commit(root)
    return {
        TAG + "kind": "run",
        TAG + "run_key": cfg.run_key,
        TAG + "data_checksum": data_checksum,
        TAG + "git_commit": commit,
        "mlflow.source.git.commit": commit,
        TAG + "versions": json.dumps(package_versions(), sort_keys=True),
        TAG + "device": device,
        TAG + "processes": str(processes),
    }


def run_name(cfg: Config) -> str:
    """Readable names for the runs table: what differs across a grid."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    lr = cfg.train.lr_eff
    exp = math.log2(lr)
    lr_txt = f"2^{int(exp)}" if exp == int(exp) else f"{lr:g}"
    budget = cfg.train.budget
    unit = "ep" if budget.unit == "epochs" else "st"
    return (
        f"{cfg.train.optimizer} B={cfg.train.batch_size} lr={lr_txt} "
        f"{budget.value:g}{unit} s{cfg.train.seed}"
    )
