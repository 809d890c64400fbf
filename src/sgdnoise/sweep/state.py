"""The sweep's state as read from Optuna trials: points, their attempts, groups.

Every trial the sweep creates carries user attributes:
  run_key, point (JSON of the grid values), origin (grid | edge), run_name,
  worker (who claimed it), mlflow_run_id, status (finished | diverged | skipped),
  metrics (final_* values; null for non-finite), adopted (took over a finished run),
  skip_reason, error (a failed attempt's message), pack (the first trial number of the
  pack it trained in, when packed).
A point is *live* while one of its trials is WAITING, RUNNING, COMPLETE or PRUNED (a
skipped point); the sweep keeps at most one live trial per point at any time.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from sgdnoise.sweep import edges
from sgdnoise.sweep.spec import LR_KEY, SEED_KEY, Point, StudySpec

LIVE = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class PointState:
    run_key: str
    values: dict[str, Any]
    origin: str
    trials: list[FrozenTrial]  # every attempt, by trial number

    @property
    def live(self) -> FrozenTrial | None:
        live = [t for t in self.trials if t.state in LIVE]
        return live[-1] if live else None

    @property
    def state(self) -> str:
        """waiting | running | finished | diverged | skipped | failed."""
        t = self.live
        if t is None:
            return "failed"
        if t.state == TrialState.WAITING:
            return "waiting"
        if t.state == TrialState.RUNNING:
            return "running"
        if t.state == TrialState.PRUNED:
            return "skipped"
        return "diverged" if t.user_attrs.get("status") == "diverged" else "finished"

    @property
    def lr(self) -> float | None:
        v = self.values.get(LR_KEY)
        return float(v) if v is not None else None

    @property
    def group(self) -> str:
        return Point(self.values, self.run_key, "").group

    def outcome(self) -> edges.Outcome:
        s = self.state
        seed = self.values.get(SEED_KEY)
        if s in ("waiting", "running"):
            return edges.Outcome(edges.PENDING, seed=seed)
        if s == "failed":
            return edges.Outcome(edges.FAILED, seed=seed)
        if s == "skipped":
            return edges.Outcome(edges.SKIPPED, seed=seed)
        t = self.live
        assert t is not None
        metrics = dict(t.user_attrs.get("metrics") or {})
        return edges.Outcome(edges.DONE, s == "diverged", metrics, seed)


class GridState:
    """All points of a study (the grid's and those the edge rules added) and their trials."""

    def __init__(self, spec: StudySpec, trials: Iterable[FrozenTrial]):
        self.spec = spec
        self.trials = sorted(trials, key=lambda t: t.number)
        self.points: dict[str, PointState] = {}
        for t in self.trials:
            key = t.user_attrs.get("run_key")
            if key is None:
                continue  # not ours (a stray ask()); never counted as a grid point
            if key not in self.points:
                values = json.loads(t.user_attrs.get("point", "{}"))
                origin = t.user_attrs.get("origin", "grid")
                self.points[key] = PointState(key, values, origin, [])
            self.points[key].trials.append(t)
        self._groups: dict[str, dict[float, list[edges.Outcome]]] | None = None

    # ---- what is where ----
    def by_state(self, state: str) -> list[PointState]:
        return [p for p in self.points.values() if p.state == state]

    def missing(self) -> list[Point]:
        """Grid points without any trial (a crash while enqueueing, or a fresh study)."""
        return [p for p in self.spec.points if p.run_key not in self.points]

    def needs_trial(self) -> list[PointState]:
        """Points whose last attempt failed: a new trial is due on the next start."""
        return self.by_state("failed")

    def waiting(self) -> list[FrozenTrial]:
        out = [p.live for p in self.points.values() if p.state == "waiting"]
        return sorted((t for t in out if t is not None), key=lambda t: t.number)

    def running(self) -> list[FrozenTrial]:
        out = [p.live for p in self.points.values() if p.state == "running"]
        return sorted((t for t in out if t is not None), key=lambda t: t.number)

    def groups(self) -> dict[str, dict[float, list[edges.Outcome]]]:
        if self._groups is not None:
            return self._groups
        out: dict[str, dict[float, list[edges.Outcome]]] = defaultdict(lambda: defaultdict(list))
        for p in self.points.values():
            if p.lr is not None:
                out[p.group][p.lr].append(p.outcome())
        self._groups = out
        return out

    def group_points(self, group: str) -> list[PointState]:
        return [p for p in self.points.values() if p.group == group]

    # ---- edge rules ----
    def skip_decision(self, trial: FrozenTrial) -> str:
        p = self.points[trial.user_attrs["run_key"]]
        if p.lr is None:
            return edges.RUN
        return edges.skip_decision(p.lr, self.groups()[p.group], self.spec.edges)

    def extensions(self, group: str | None = None) -> list[dict[str, Any]]:
        """New points (grid values) the edge rules ask for, in one group or all."""
        rng = self.spec.lr_range
        if rng is None or not self.spec.edges.extend:
            return []
        out = []
        for g, by_lr in self.groups().items():
            if group is not None and g != group:
                continue
            new = edges.extensions(
                by_lr, initial=rng, ratio=self.spec.lr_ratio, rules=self.spec.edges
            )
            if not new:
                continue
            # Every seed (and any other non-group axis) the group ran, at each new lr.
            templates = {
                json.dumps({k: v for k, v in p.values.items() if k != LR_KEY}, sort_keys=True)
                for p in self.group_points(g)
            }
            for lr in new:
                for tmpl in sorted(templates):
                    out.append({**json.loads(tmpl), LR_KEY: lr})
        return out

    # ---- counts ----
    def counts(self) -> dict[str, int]:
        states = [p.state for p in self.points.values()]
        c = {s: states.count(s) for s in ("waiting", "running", "finished", "diverged")}
        c["skipped"] = states.count("skipped")
        c["failed"] = states.count("failed")
        c["missing"] = len(self.missing())
        c["points"] = len(self.points) + c["missing"]
        c["grid_points"] = len(self.spec.points)
        c["added_by_edges"] = sum(1 for p in self.points.values() if p.origin == "edge")
        c["failed_attempts"] = sum(1 for t in self.trials if t.state == TrialState.FAIL)
        c["trials"] = len(self.trials)
        return c

    @property
    def complete(self) -> bool:
        """Every point finished, diverged or skipped, and the edge rules want nothing more."""
        c = self.counts()
        busy = c["waiting"] + c["running"] + c["failed"] + c["missing"]
        return busy == 0 and not self.extensions()


def duration_s(t: FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def age_s(t: FrozenTrial, now: datetime | None = None) -> float:
    if t.datetime_start is None:
        return 0.0
    return max(0.0, ((now or datetime.now()) - t.datetime_start).total_seconds())
