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
from pathlib import Path
from typing import Any

from sgdnoise import tracking
from sgdnoise.sweep.liveness import Liveness
from sgdnoise.sweep.spec import LR_KEY, Point, StudySpec
from sgdnoise.sweep.state import GridState
from sgdnoise.sweep.storage import SweepStorage

T = tracking.TAG
SUMMARY_ATTR = "summary"


def sampler(spec: StudySpec) -> Any:
    """GridSampler over the grid: the study's sampler in every process. Workers only pop
    enqueued trials, so it never picks a point itself (that is where duplicates come from)."""
    import optuna

    return optuna.samplers.GridSampler(spec.axes, seed=0)


def load_study(spec: StudySpec, store: SweepStorage) -> Any:
    import optuna

    return optuna.load_study(
        study_name=spec.optuna_name, storage=store.optuna(), sampler=sampler(spec)
    )


def distributions(spec: StudySpec, values: dict[str, Any]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out: dict[str, Any] = {}
    for k, v in values.items():
        if k == LR_KEY:
            out[k] = FloatDistribution(float(v), float(v), log=True)
        else:
            out[k] = CategoricalDistribution(spec.axes[k])
    return out


def enqueue(study: Any, spec: StudySpec, point: Point, origin: str) -> None:
    """Add one WAITING trial for `point`. Callers hold the study lock and know the point
    has no live trial."""
    from optuna.trial import TrialState, create_trial

    params = dict(point.values)
    study.add_trial(
        create_trial(
            state=TrialState.WAITING,
            params=params,
            distributions=distributions(spec, params),
            system_attrs={"fixed_params": params},
            user_attrs={
                "run_key": point.run_key,
                "point": json.dumps(params, sort_keys=True),
                "origin": origin,
                "run_name": point.run_name,
            },
        )
    )


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

    from sgdnoise.sweep.worker import SweepContext, extend, recover

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
