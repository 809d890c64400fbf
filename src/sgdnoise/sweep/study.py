"""The Optuna study of a sweep and its MLflow parent run: create or find, fill, summarise.

Study name `<study>-<grid hash>`; its user attributes hold the study definition and the
MLflow parent run id, and the parent run carries `sgdnoise.optuna_study` back. Each grid
point is enqueued once as a WAITING trial whose params are the point's values (the lr as a
one-point log-float distribution, since the edge rules may add learning rates; every other
key as a categorical over its axis) and whose `fixed_params` system attribute makes any
`ask()` on it evaluate exactly that point, as GridSampler does for enqueued trials.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgdnoise import tracking
from sgdnoise.config import ConfigError
from sgdnoise.sweep.liveness import Liveness
from sgdnoise.sweep.spec import StudySpec
from sgdnoise.sweep.state import GridState
from sgdnoise.sweep.storage import SweepStorage
from sgdnoise.sweep.trials import Trials, enqueue, load_study, sampler

T = tracking.TAG
SUMMARY_ATTR = "summary"
STORE_ATTR = "tracking_store"  # the (redacted) tracking URI the study's runs are recorded in


@dataclass
class SweepContext:
    spec: StudySpec
    store: SweepStorage
    root: Path
    tracking_uri: str
    parent_run_id: str
    threads: int | None = None
    workers: int = 1  # local worker processes sharing this sweep (packs leave them a share)


def setup(
    spec: StudySpec,
    store: SweepStorage,
    root: Path,
    tracking_uri: str,
    log: Callable[[str], None],
    threads: int | None = None,
) -> Any:
    """Create or find the study and its parent run, recover dead workers' trials, enqueue
    every point that has no live trial. Returns the SweepContext workers share."""
    import optuna

    name = spec.optuna_name
    with store.lock(name):
        known = load_study(spec, store).user_attrs if store.exists(name) else {}
        # MLflow first: a tracking store that cannot be reached fails the sweep before
        # anything is written to Optuna.
        parent = _tracking(
            tracking_uri,
            lambda: tracking.study_run(
                tracking_uri, spec.experiment, root,
                study=spec.name, grid_hash=spec.grid_hash,
                known_run_id=known.get("mlflow_parent_run_id"),
                tags={
                    T + "optuna_study": name,
                    T + "optuna_storage": store.display,
                    T + "metric": spec.metric.name,
                    T + "direction": spec.metric.direction,
                },
                definition=spec.describe(),
            ),
        )  # fmt: skip
        tracking.share_grid_view(
            tracking_uri, spec.experiment, list(spec.axes), spec.metric.name, spec.metric.direction
        )
        study = optuna.create_study(
            study_name=name,
            storage=store.optuna(),
            sampler=sampler(spec),
            direction=spec.metric.direction,
            load_if_exists=True,
        )
        attrs = study.user_attrs
        if attrs.get("definition") != spec.describe():  # edge rules may change on resume
            study.set_user_attr("definition", spec.describe())
        if attrs.get("mlflow_parent_run_id") != parent:
            study.set_user_attr("mlflow_parent_run_id", parent)
        if attrs.get(STORE_ATTR) != tracking.redact(tracking_uri):
            study.set_user_attr(STORE_ATTR, tracking.redact(tracking_uri))
        ctx = SweepContext(spec, store, root, tracking_uri, parent, threads)
        state = GridState(spec, study.get_trials(deepcopy=False))
        # Not a worker: reaping needs no registration of its own.
        live: Liveness = store.liveness(name, f"setup-{os.getpid()}")
        if recover(ctx, study, live, state, log):
            state = GridState(spec, study.get_trials(deepcopy=False))
        for p in state.missing():
            enqueue(study, spec, p, "grid")
        for ps in state.needs_trial():
            enqueue(study, spec, spec.point(ps.values), ps.origin)
            log(f"{spec.point(ps.values).run_name}: its last attempt failed; trying again")
        state = GridState(spec, study.get_trials(deepcopy=False))
        extend(spec, study, state, None, log)  # a crash may have cut a group's extension
        state = GridState(spec, study.get_trials(deepcopy=False))
    if not state.complete:
        tracking.set_run_status(tracking_uri, parent, "RUNNING")
    return ctx


def _tracking(uri: str, call: Callable[[], Any]) -> Any:
    """Run an MLflow call; an unreachable store becomes one line without credentials."""
    try:
        return call()
    except Exception as e:
        text = tracking.redact_text(str(e)).strip()
        first = text.splitlines()[0][:200] if text else type(e).__name__
        raise tracking.TrackingUnavailable(f"cannot use {tracking.redact(uri)} ({first})") from None


def counts(state: GridState) -> dict[str, int]:
    c = state.counts()
    return {
        "grid_points": c["grid_points"],
        "points": c["points"],
        "finished": c["finished"],
        "diverged": c["diverged"],
        "skipped": c["skipped"],
        "added_by_edges": c["added_by_edges"],
        "failed": c["failed"],
        "failed_attempts": c["failed_attempts"],
        "remaining": c["waiting"] + c["running"] + c["failed"] + c["missing"],
    }


def summary_line(spec: StudySpec, c: dict[str, int]) -> str:
    ran = c["finished"] + c["diverged"]
    return (
        f"study {spec.name}: {ran} runs ({c['diverged']} diverged) over {c['points']} points; "
        f"grid edges added {c['added_by_edges']} runs and saved {c['skipped']} "
        f"(skipped above an all-diverged learning rate)"
    )


def finalize(ctx: Any, study: Any, state: GridState) -> dict[str, int]:
    """Log the sweep's summary on the parent run and mark it FINISHED (idempotent)."""
    c = counts(state)

    def log() -> None:
        tracking.log_study_summary(
            ctx.tracking_uri,
            ctx.parent_run_id,
            {f"sweep.{k}": v for k, v in c.items()},
            {T + "sweep_summary": summary_line(ctx.spec, c)},
        )
        tracking.set_run_status(ctx.tracking_uri, ctx.parent_run_id, "FINISHED")

    _tracking(ctx.tracking_uri, log)
    study.set_user_attr(SUMMARY_ATTR, c)  # only once MLflow has it: else re-run finalizes
    return c


def verify_store(spec: StudySpec, store: SweepStorage, uri: str) -> None:
    """A point is done only if its FINISHED run is in the tracking store this sweep uses
    now. When the study recorded its runs under another URI (a fresh store, another
    server, a moved project), every finished trial's run is looked up here; any missing
    stops the sweep with ConfigError saying where they are and what to do. Reads Optuna
    only while the store is the one recorded (the fast path of a finished re-run)."""
    if not store.exists(spec.optuna_name):
        return
    study = load_study(spec, store)
    here = tracking.redact(uri)
    recorded = study.user_attrs.get(STORE_ATTR)
    if recorded == here:
        return
    from optuna.trial import TrialState

    done = [
        t.user_attrs["mlflow_run_id"]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("mlflow_run_id")
    ]
    missing = len(done) - len(tracking.finished_runs(uri, done))
    if missing:
        where = f"recorded in {recorded}" if recorded else "recorded in another store"
        raise ConfigError(
            "tracking.uri",
            f"study {spec.name!r}: {missing} of its {len(done)} finished runs are not in "
            f"{here} ({where})",
            f"that store ($MLFLOW_TRACKING_URI or tracking.uri), or `sgdnoise sweep "
            f"{spec.name} --restart` to run the study again into {here}",
        )
    study.set_user_attr(STORE_ATTR, here)  # the same runs, reached through another URI


def finished_already(spec: StudySpec, store: SweepStorage) -> dict[str, int] | None:
    """The summary of a study that is complete and summarised: nothing to do. Reads Optuna
    only, so a finished re-run neither imports torch nor opens MLflow."""
    if not store.exists(spec.optuna_name):
        return None
    study = load_study(spec, store)
    state = GridState(spec, study.get_trials(deepcopy=False))
    if not state.complete:
        return None
    c = counts(state)
    return c if study.user_attrs.get(SUMMARY_ATTR) == c else None


def extend(spec: StudySpec, study: Any, state: GridState, group: str | None, log) -> int:
    """Enqueue the points the edge rules ask for (under the study lock)."""
    added = 0
    seen = set(state.points)
    for values in state.extensions(group):
        try:
            point = spec.point(values)
        except ConfigError as e:
            log(f"grid edge: cannot add {values}: {e}")
            continue
        if point.run_key in seen:
            continue
        enqueue(study, spec, point, "edge")
        seen.add(point.run_key)
        added += 1
        log(f"grid edge: added {point.run_name}")
    return added


def recover(ctx: SweepContext, study: Any, live: Any, state: GridState, log) -> int:
    """Fail dead workers' trials, mark their MLflow runs KILLED, enqueue their points again.
    Under the study lock."""
    dead = live.reap(Trials(study), state.running())
    for t in dead:
        try:
            killed = tracking.kill_children(ctx.tracking_uri, ctx.parent_run_id, t.number)
        except Exception as e:  # the tracking store may be down; Optuna's state comes first
            killed = []
            log(f"trial {t.number}: could not mark its MLflow run KILLED ({type(e).__name__})")
        point = ctx.spec.point(json.loads(t.user_attrs["point"]))
        enqueue(study, ctx.spec, point, t.user_attrs.get("origin", "grid"), killed)
        who = t.user_attrs.get("worker", "an unknown worker")
        log(
            f"trial {t.number} {point.run_name}: worker {who} is dead; point queued again"
            + (f", run {killed[0]} KILLED" if killed else "")
        )
    return len(dead)
