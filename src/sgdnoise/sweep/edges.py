"""Grid-edge rules, as pure functions of a group's results (no Optuna, no MLflow).

A group is one (optimizer, B, budget, ...): every grid key but the learning rate and the
seed. Within a group:

- **extend**: when the best learning rate (the seed-mean of the selection metric, a
  diverged run counting as the worst value, ties going to the smaller lr as in the
  analysis), or any seed's own best, sits at the top or bottom of the group's learning
  rates, one more power is added beyond it, for every seed, until the optimum is interior or `max_extensions`
  steps were taken in that direction. A top lr at which every seed diverged can never be
  the best, so the grid never grows past an all-diverged learning rate.
- **skip_diverged**: a learning rate above one is skipped when a smaller learning rate
  above one diverged for every seed (divergence is monotone up there; running larger
  rates only burns compute). Skipped points are counted as runs saved.

Decisions are only taken on finished evidence: a group with a pending point is not
extended, and a point whose skip depends on a pending smaller lr waits ("blocked").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sgdnoise.sweep.spec import EdgeRules, Metric

PENDING, DONE, SKIPPED, FAILED = "pending", "done", "skipped", "failed"
RUN, SKIP, BLOCKED = "run", "skip", "blocked"


@dataclass(frozen=True)
class Outcome:
    """One point's state as the rules see it."""

    state: str  # pending | done | skipped | failed
    diverged: bool = False
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    seed: Any = None  # the point's seed (None without a seed axis)


def all_diverged(outcomes: Sequence[Outcome]) -> bool:
    """Every seed ran and diverged (a skipped point counts: it sits above such a rate)."""
    return bool(outcomes) and all(
        (o.state == DONE and o.diverged) or o.state == SKIPPED for o in outcomes
    )


def skip_decision(lr: float, group: Mapping[float, Sequence[Outcome]], rules: EdgeRules) -> str:
    """run | skip | blocked for a point at `lr`, given its group's outcomes by lr."""
    if not rules.skip_diverged or lr <= 1.0:
        return RUN
    lower = [group[x] for x in sorted(group) if 1.0 < x < lr]
    if any(o.state == PENDING for outcomes in lower for o in outcomes):
        return BLOCKED
    return SKIP if any(all_diverged(outcomes) for outcomes in lower) else RUN


def score(outcomes: Sequence[Outcome], metric: Metric) -> float:
    """Seed-mean of the metric, signed so that larger is better; diverged = -inf."""
    sign = 1.0 if metric.direction == "maximize" else -1.0
    vals = []
    for o in outcomes:
        v = o.metrics.get(metric.name)
        if o.diverged or v is None or not math.isfinite(v):
            return -math.inf
        vals.append(sign * v)
    return sum(vals) / len(vals) if vals else -math.inf


def best_lr(group: Mapping[float, Sequence[Outcome]], metric: Metric) -> float | None:
    """The best learning rate among those that ran; ties go to the smaller one."""
    ran = {lr: o for lr, o in group.items() if o and all(x.state == DONE for x in o)}
    if not ran:
        return None
    return max(sorted(ran), key=lambda lr: score(ran[lr], metric))  # max keeps the first


def extensions(
    group: Mapping[float, Sequence[Outcome]],
    *,
    initial: tuple[float, float],
    ratio: float,
    rules: EdgeRules,
) -> list[float]:
    """Learning rates to add to a finished group (empty when its optimum is interior)."""
    if not rules.extend or not group:
        return []
    if any(o.state in (PENDING, FAILED) for outcomes in group.values() for o in outcomes):
        return []  # decide on complete evidence only
    lo, hi = initial
    ran = sorted(lr for lr, o in group.items() if o and all(x.state == DONE for x in o))
    if not ran:
        return []
    up = sum(1 for lr in group if lr > hi * (1 + 1e-9))
    down = sum(1 for lr in group if lr < lo * (1 - 1e-9))
    out: set[float] = set()
    for metric in rules.metrics:
        # The seed-mean's best and each seed's own: the analysis' per_seed rule reports the
        # seeds' optima, so an optimum of any seed at the edge is only a bound too.
        for best in {best_lr(group, metric), *seed_bests(group, metric)}:
            if best is None:
                continue
            if best == ran[-1] and up < rules.max_extensions and not all_diverged(group[best]):
                out.add(_step(best, ratio, +1))
            if best == ran[0] and down < rules.max_extensions:
                out.add(_step(best, ratio, -1))
    return sorted(x for x in out if not _contains(group, x))


def seed_bests(group: Mapping[float, Sequence[Outcome]], metric: Metric) -> list[float | None]:
    """Each seed's best learning rate among those that ran for it (outcomes that name no
    seed count only as part of the seed-mean)."""
    by_seed: dict[Any, dict[float, list[Outcome]]] = {}
    for lr, outcomes in group.items():
        for o in outcomes:
            if o.seed is not None:
                by_seed.setdefault(o.seed, {})[lr] = [o]
    return [best_lr(runs, metric) for _, runs in sorted(by_seed.items(), key=lambda kv: str(kv[0]))]


def _step(lr: float, ratio: float, direction: int) -> float:
    return lr * ratio if direction > 0 else lr / ratio


def _contains(lrs: Iterable[float], x: float) -> bool:
    return any(math.isclose(lr, x, rel_tol=1e-9) for lr in lrs)
