"""Everything MLflow: where the store is, run creation, batched logging, provenance.

Only this module talks to MLflow on the training side. Logging is buffered and sent in
few log_batch calls (one per flush), never once per step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sgdnoise import __version__
from sgdnoise import contract as C
from sgdnoise.config import Config
from sgdnoise.paths import default_tracking_uri, project_root, store_root

# A tracking server that does not answer must fail a run in seconds, not after MLflow's
# default minutes of retries with back-off.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

TAG = C.TAG
FLUSH_SECONDS = 60.0


def resolve_uri(cfg: Config, root: Path | None = None) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else sqlite at the project root (absolute)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative sqlite path would create one database per working directory.
        rel = uri[len("sqlite:///") :]
        uri = f"sqlite:///{store_root(root) / rel}"
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


_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact_text(text: str) -> str:
    """Any URL credentials inside free text (e.g. an exception message) replaced by ***."""
    return _CREDENTIALS.sub("***@", text)


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

    _write_ahead_log(uri)
    return MlflowClient(tracking_uri=uri)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store's URI (None for other stores)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


_WAL: set[str] = set()  # SQLite stores known to be in write-ahead-log mode


def _write_ahead_log(uri: str) -> None:
    """A local SQLite store in write-ahead-log mode, a setting its file keeps: a commit (MLflow
    makes about 14 per run) then syncs the disk once instead of two or three times (the
    calls of a sweep run, in a scratch benchmark here: 64-89 ms -> 47-56 ms), and readers
    (the UI, an analysis) no longer block the workers' writes. Still one sync per commit: a finished run survives a power cut, as
    before. A store that does not exist yet is left to MLflow to create; a later call sets
    the mode."""
    path = None if uri in _WAL else sqlite_file(uri)
    if path is None or not path.is_file():
        return
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()
    except sqlite3.Error:  # busy or read-only: it stays as it is
        return
    if mode and str(mode[0]).lower() == "wal":
        _WAL.add(uri)


def experiment_id(mlf, name: str, root: Path | None = None) -> str:
    """Get or create an experiment; local stores keep artifacts under <root>/mlruns."""
    from mlflow.exceptions import MlflowException

    exp = mlf.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if mlf.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in mlf.tracking_uri:
        location = (store_root(root) / "mlruns").as_uri()
    try:
        return mlf.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another worker
        exp = mlf.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# Experiment ids by (tracking URI, experiment name), looked up once per process: a sweep
# worker creates hundreds of runs in one experiment, and the lookup was one of the seven
# store calls of each.
_EXPERIMENT_IDS: dict[tuple[str, str], str] = {}


def _create_run(mlf, name: str, root: Path, run_name: str, tags: dict[str, str]) -> Any:
    """A new run in experiment `name` (created if missing): its RunInfo."""
    key = (mlf.tracking_uri, name)
    cached = key in _EXPERIMENT_IDS
    exp = _EXPERIMENT_IDS[key] if cached else experiment_id(mlf, name, root)
    try:
        run = mlf.create_run(exp, run_name=run_name, tags=tags)
    except Exception:
        if not cached:
            raise
        # The experiment was deleted (and maybe made again) since: look it up afresh.
        del _EXPERIMENT_IDS[key]
        return _create_run(mlf, name, root, run_name, tags)
    _EXPERIMENT_IDS[key] = exp
    return run.info


@cache
def _experiment_of(uri: str, run_id: str) -> str:
    """A run's experiment (a run never moves to another)."""
    return client(uri).get_run(run_id).info.experiment_id


def _log_json(artifact_uri: str, uri: str, obj: Any, name: str) -> None:
    """What MlflowClient.log_dict writes, into a run whose artifact location is known: its
    lookup of the run (a query, a fifth of a run's start in a sweep) is left out."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        get_artifact_repository(artifact_uri, tracking_uri=uri).log_artifact(str(path))


class TrackingUnavailable(RuntimeError):
    """The MLflow store could not be reached (raised before the first training step)."""


def _param_value(v: Any) -> str:
    return "null" if v is None else str(v)


class RunTracker:
    """One MLflow run: created (or attached to, under `mlflow run`), buffered, finished."""

    def __init__(self, cfg: Config, root: Path | None = None, *, auto_flush: bool = True):
        self.cfg, self.root = cfg, root or project_root()
        self.uri = resolve_uri(cfg, self.root)
        self.mlf = client(self.uri)
        self.run_id: str | None = None
        self._metrics: list[Any] = []
        self._retag: dict[str, str] = {}  # a resumed run's tags of this attempt, at finish
        self._last_flush = time.monotonic()
        # With checkpoints, metrics are flushed exactly when a checkpoint is written, so a
        # resumed run never logs a step twice.
        self.auto_flush = auto_flush

    def resume(self, run_id: str, tags: Mapping[str, str] | None = None) -> str:
        """Continue a run from its checkpoint: same run id, params already logged (restored
        first if the sweep moved it aside as superseded: see kill_children). `tags`: this
        attempt's (a sweep's trial number and worker), set with the final metrics."""
        self.run_id = run_id
        self._retag = dict(tags or {})
        if self.mlf.get_run(run_id).info.lifecycle_stage == "deleted":
            self.mlf.restore_run(run_id)
        self.mlf.update_run(run_id, status="RUNNING")
        return run_id

    def start(
        self,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        run_name: str,
        parent_run_id: str | None = None,
    ) -> str:
        try:
            return self._start(params, tags, run_name, parent_run_id)
        except Exception as e:
            # Connection errors, a missing database folder, a server answering 5xx: say so
            # in one line, without credentials.
            text = redact_text(str(e)).strip()
            first = text.splitlines()[0][:200] if text else type(e).__name__
            raise TrackingUnavailable(f"cannot use {redact(self.uri)} ({first})") from None

    def _start(self, params, tags, run_name, parent_run_id) -> str:
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
            run = self.mlf.get_run(attached)
            existing, artifact_uri = run.data.params, run.info.artifact_uri
            self.mlf.update_run(attached, status="RUNNING", name=run_name)
        else:
            info = _create_run(
                self.mlf, self.cfg.tracking.experiment, self.root, run_name, all_tags
            )
            self.run_id, artifact_uri = info.run_id, info.artifact_uri
            all_tags = {}
        self.mlf.log_batch(
            self.run_id,
            params=[Param(k, _param_value(v)) for k, v in params.items() if k not in existing],
            tags=[RunTag(k, str(v)) for k, v in all_tags.items()],
        )
        _log_json(artifact_uri, self.uri, self.cfg.to_dict(), "config.json")
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if self.auto_flush and time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._metrics and self.run_id:
            self.mlf.log_batch(self.run_id, metrics=self._metrics)
            self._metrics = []
        self._last_flush = time.monotonic()

    def finish(self, final: Mapping[str, float], tags: Mapping[str, str], status: str) -> None:
        """The final metrics, the buffered ones and the tags in one batch, then the status."""
        from mlflow.entities import Metric, RunTag

        ts, step = int(time.time() * 1000), int(final.get("steps", 0))
        metrics = self._metrics + [Metric(k, float(v), ts, step) for k, v in final.items()]
        tag_list = [RunTag(k, str(v)) for k, v in {**self._retag, **tags}.items()]
        self.mlf.log_batch(self.run_id, metrics=metrics, tags=tag_list)
        self._metrics = []
        self.mlf.set_terminated(self.run_id, status)

    def fail(self, status: str = "FAILED") -> None:
        """End the run as FAILED (or KILLED when preempted) so it is never left RUNNING."""
        if self.run_id is None:
            return
        try:
            if self.auto_flush:  # else the last checkpoint's flush is what counts
                self.flush()
            self.mlf.set_terminated(self.run_id, status)
        except Exception:  # the original error matters more than this one
            pass


def provenance_tags(
    cfg: Config, root: Path, *, data_checksum: str, device: str, processes: int
) -> dict[str, str]:
    commit = git_commit(root)
    tags = {}
    if cfg.model.source_sha256:  # a user model: which version of its source trained this run
        tags[C.MODEL_SOURCE] = cfg.model.source_sha256
    return {
        **tags,
        C.KIND: C.KIND_RUN,
        C.RUN_KEY: cfg.run_key,
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


# ---- study (parent) runs, used by the sweep ----
# A study is one MLflow parent run tagged sgdnoise.kind=study, sgdnoise.study=<name> and
# sgdnoise.grid_hash=<hash>; its grid points are child runs (mlflow.parentRunId) created by
# train(). Found again by those tags, so re-running a sweep resumes under the same parent.

STUDY_TAGS = (C.KIND, C.STUDY, C.GRID_HASH)


def study_run(
    uri: str,
    experiment: str,
    root: Path | None,
    *,
    study: str,
    grid_hash: str,
    known_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    definition: Mapping[str, Any] | None = None,
) -> str:
    """The study's parent run: `known_run_id` if it still exists, else the most recent run
    with the study's tags, else a new one (RUNNING until the sweep completes)."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    mlf = client(uri)
    if known_run_id:
        try:
            run = mlf.get_run(known_run_id)
            if run.info.lifecycle_stage == "active":
                return known_run_id
        except MlflowException:
            pass  # another tracking store than the one that created it
    exp = experiment_id(mlf, experiment, root)
    found = mlf.search_runs(
        [exp],
        filter_string=f"tags.`{C.KIND}` = '{C.KIND_STUDY}' and tags.`{C.GRID_HASH}` = '{grid_hash}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    # Study names are matched here rather than in the filter: they may hold quotes.
    found = [r for r in found if r.data.tags.get(C.STUDY) == study]
    if found:
        return found[0].info.run_id
    all_tags = {
        C.KIND: C.KIND_STUDY,
        C.STUDY: study,
        C.GRID_HASH: grid_hash,
        TAG + "git_commit": git_commit(root or project_root()),
        **(tags or {}),
    }
    run = mlf.create_run(exp, run_name=f"study {study}", tags=all_tags)
    if definition is not None:
        mlf.log_dict(run.info.run_id, dict(definition), "study.json")
    return run.info.run_id


# MLflow's shared views: a view state stored as an experiment tag, opened by a link with
# `viewStateShareKey=<key>`. The study's grid view lists its points flat, grouped and with
# the columns that matter (children are otherwise collapsed under their parent run).
GRID_VIEW = "grid"
_SHARED_VIEW_TAG = "mlflow.sharedViewState."


def grid_view_state(axes: list[str], metric: str, direction: str) -> dict[str, Any]:
    """The runs table of a study's grid points: the grid's axes and the metric as columns,
    best first, grouped by B (or the first axis other than ε_eff and seed), the group's
    best value shown on its row."""
    group = next((a for a in axes if a == "train.batch_size"), None)
    group = group or next((a for a in axes if a not in ("train.lr_eff", "train.seed")), None)
    metrics = dict.fromkeys([metric, C.FINAL_TRAIN_LOSS])
    state: dict[str, Any] = {
        "searchFilter": f"tags.`{C.KIND}` = '{C.KIND_RUN}'",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": direction == "minimize",
        "selectedColumns": [
            *(f"params.`{a}`" for a in axes), *(f"metrics.`{m}`" for m in metrics),
            "attributes.`Duration`",
        ],
    }  # fmt: skip
    if group:
        state["groupBy"] = {
            "aggregateFunction": "min" if direction == "minimize" else "max",
            "groupByKeys": [{"mode": "param", "groupByData": group}],
        }
    return state


def share_grid_view(
    uri: str, experiment: str, axes: list[str], metric: str, direction: str
) -> None:
    mlf = client(uri)
    exp = experiment_id(mlf, experiment)
    value = json.dumps(grid_view_state(axes, metric, direction), sort_keys=True)
    mlf.set_experiment_tag(exp, _SHARED_VIEW_TAG + GRID_VIEW, value)


def shared_views(experiment: Any) -> set[str]:
    """The keys of an experiment's shared views."""
    return {k[len(_SHARED_VIEW_TAG) :] for k in experiment.tags if k.startswith(_SHARED_VIEW_TAG)}


def set_run_status(uri: str, run_id: str, status: str) -> None:
    """RUNNING while a sweep works on the study, FINISHED once its grid is complete."""
    mlf = client(uri)
    if mlf.get_run(run_id).info.status == status:
        return
    if status == "RUNNING":
        mlf.update_run(run_id, status="RUNNING")
    else:
        mlf.set_terminated(run_id, status)


def tag_run(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def child_runs(
    uri: str, parent_run_id: str, *, run_key: str | None = None, trial_number: int | None = None
) -> list[Any]:
    """Active child runs of a study run, optionally one grid point's or one trial's."""
    from mlflow.entities import ViewType

    filt = f"tags.`{C.PARENT}` = '{parent_run_id}'"
    if run_key is not None:
        filt += f" and tags.`{C.RUN_KEY}` = '{run_key}'"
    if trial_number is not None:
        filt += f" and tags.`{C.TRIAL_NUMBER}` = '{trial_number}'"
    return list(
        client(uri).search_runs(
            [_experiment_of(uri, parent_run_id)],
            filter_string=filt,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=10000,
        )
    )


def has_children(uri: str, parent_run_id: str) -> bool:
    """Whether a study run has any child run (in any state, deleted ones included)."""
    from mlflow.entities import ViewType

    filt = f"tags.`{C.PARENT}` = '{parent_run_id}'"
    exp = [_experiment_of(uri, parent_run_id)]
    return bool(client(uri).search_runs(exp, filt, run_view_type=ViewType.ALL, max_results=1))


def finished_child(
    uri: str, parent_run_id: str, run_key: str
) -> tuple[str, dict[str, float], str] | None:
    """A FINISHED child run of this grid point, if one exists: (run id, metrics, status tag).

    A worker killed after its run finished but before Optuna heard of it leaves exactly
    this; adopting it instead of training again keeps the point at one finished run."""
    for run in child_runs(uri, parent_run_id, run_key=run_key):
        if run.info.status == "FINISHED":
            status = run.data.tags.get(C.STATUS, C.STATUS_FINISHED)
            return run.info.run_id, dict(run.data.metrics), status
    return None


def kill_children(
    uri: str, parent_run_id: str, trial_number: int, statuses: tuple[str, ...] = ("RUNNING",)
) -> list[str]:
    """Mark a dead or interrupted trial's child runs KILLED (never left RUNNING) and move
    them to MLflow's deleted state: superseded by the point's next attempt, they stay on
    record (the trial keeps their ids; `mlflow gc` never runs here) but out of the runs
    table, which then shows the grid. A checkpointed run resumed later is restored."""
    mlf = client(uri)
    out = []
    for run in child_runs(uri, parent_run_id, trial_number=trial_number):
        if run.info.status in statuses:
            mlf.set_terminated(run.info.run_id, "KILLED")
            mlf.delete_run(run.info.run_id)
            out.append(run.info.run_id)
    return out


def log_study_summary(
    uri: str, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str]
) -> None:
    """The sweep's counts as metrics of the parent run (logged again on each completion:
    metrics keep history, unlike params, which are immutable)."""
    from mlflow.entities import Metric, RunTag

    ts = int(time.time() * 1000)
    client(uri).log_batch(
        run_id,
        metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )


def finished_runs(uri: str, run_ids: list[str]) -> set[str]:
    """The runs among `run_ids` that exist, active and FINISHED, in the store at `uri`."""
    from mlflow.exceptions import MlflowException

    mlf, out = client(uri), set()
    for run_id in run_ids:
        try:
            info = mlf.get_run(run_id).info
        except MlflowException:
            continue
        if info.status == "FINISHED" and info.lifecycle_stage == "active":
            out.add(run_id)
    return out


def log_analysis(uri: str, run_id: str, files: list[Path], artifact_path: str = "analysis") -> None:
    """An analysis' files as artifacts of the study's parent run, file by file: only what
    that analysis wrote, never stale files left in its folder."""
    mlf = client(uri)
    for path in files:
        mlf.log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_study_results(uri: str, run_id: str, summary: Mapping[str, Any], table: Any) -> None:
    """A study's results as native MLflow data on its parent run, so that the UI draws the
    paper's figures: per series, the optimal ε_eff and the best test metric with step = B
    (or = the budget for an epoch-budget study), B_crit and the measured B_simple; and the
    main table (`analysis/table.json`, rendered by the artifact view)."""
    from mlflow.entities import Metric

    ts, metrics = int(time.time() * 1000), []

    def add(key: str, value: Any, step: int = 0) -> None:
        if isinstance(value, int | float) and math.isfinite(value):
            metrics.append(Metric(key, float(value), ts, int(step)))

    name = str(summary.get("metric", "metric")).replace("final_", "")
    for key, g in summary.get("groups", {}).items():
        series, _, rest = key.rpartition("/")
        if summary.get("kind") == "epoch_budget":
            step = int(g.get("budget") or 0)
            add(f"train_optimal_lr_eff/{series}", g.get("train_lr_opt"), step)
            add(f"test_optimal_lr_eff/{series}", g.get("test_lr_opt"), step)
            add(f"best_{name}/{series}", g.get("metric_mean"), step)
        elif summary.get("kind") == "noise_scale":
            add(f"B_simple/{rest or key}", g.get("b_simple"))
        elif rest.startswith("B="):
            step = int(rest[2:])
            add(f"optimal_lr_eff/{series}", g.get("lr_opt"), step)
            add(f"best_{name}/{series}", g.get("metric_mean"), step)
            add(f"train_loss_at_optimum/{series}", g.get("train_loss_at_opt"), step)
    for series, r in summary.get("regimes", {}).items():
        add(f"B_crit/{series}", r.get("b_crit"))
    mlf = client(uri)
    for i in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics
        mlf.log_batch(run_id, metrics=metrics[i : i + 900])
    if table is not None and len(table):
        mlf.log_table(run_id, data=table, artifact_file="analysis/table.json")


def release_connections(uri: str) -> None:
    """Close this process's pooled database connections to the tracking store, so forked
    sweep workers never share one (SQLite and PostgreSQL connections are not fork-safe)."""
    try:
        store = client(uri)._tracking_client.store
        engine = getattr(store, "engine", None)
        if engine is not None:
            engine.dispose()
    except Exception:  # a REST store has no engine; nothing to release
        pass


def run_status(uri: str, run_id: str) -> str:
    return client(uri).get_run(run_id).info.status


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(client(uri).get_run(run_id).data.tags)
