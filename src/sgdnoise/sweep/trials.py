"""Optuna behind one small adapter: the only module that touches its private API.

Exactly once needs what Optuna's public API does not offer: an atomic WAITING -> RUNNING
transition of one given trial (the storage's `set_trial_state_values`, which returns False
to all but one claimer) and writes to a trial another process owns. Those go through the
study's storage and a trial's storage id, `study._storage` and `trial._trial_id`; `Trials`
wraps them, and everything else in sgdnoise.sweep talks to it.
"""

from __future__ import annotations

import json
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from sgdnoise.sweep.spec import LR_KEY, Point, StudySpec
from sgdnoise.sweep.storage import SweepStorage


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


def enqueue(
    study: Any, spec: StudySpec, point: Point, origin: str, superseded: list[str] | None = None
) -> None:
    """Add one WAITING trial for `point`. Callers hold the study lock and know the point
    has no live trial. `superseded`: the MLflow runs of the point's previous attempt, moved
    aside (kept on this trial: a finished trial's attributes cannot change)."""
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
                **({"superseded_runs": superseded} if superseded else {}),
            },
        )
    )


def trial_id(t: FrozenTrial) -> int:
    """A trial's id in its storage (what liveness records name)."""
    return t._trial_id


class Trials:
    """Writes to one study's trials through its storage, by trial."""

    def __init__(self, study: Any):
        self.study = study
        self._storage = study._storage

    @staticmethod
    def id(t: FrozenTrial) -> int:
        return trial_id(t)

    def get(self, t: FrozenTrial) -> FrozenTrial:
        """The trial as the storage holds it now."""
        return self._storage.get_trial(t._trial_id)

    def set_attr(self, t: FrozenTrial, key: str, value: Any) -> None:
        self._storage.set_trial_user_attr(t._trial_id, key, value)

    def claim(self, t: FrozenTrial) -> bool:
        """WAITING -> RUNNING, atomically: True for exactly one claimer."""
        try:
            return bool(self._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING))
        except UpdateFinishedTrialError:
            return False

    def complete(self, t: FrozenTrial, value: float) -> bool:
        """RUNNING -> COMPLETE with `value`; False when the trial was failed behind our back
        (a heartbeat that went stale while its worker still lived)."""
        try:
            self._storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [value])
        except UpdateFinishedTrialError:
            return False
        return self.get(t).state == TrialState.COMPLETE

    def fail(self, t: FrozenTrial) -> None:
        self._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)

    def prune(self, t: FrozenTrial) -> None:
        self._storage.set_trial_state_values(t._trial_id, TrialState.PRUNED)
