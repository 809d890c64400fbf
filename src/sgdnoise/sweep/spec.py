"""A study definition (`studies.<name>` in params.yaml): validated, expanded, hashed.

    studies:
      constant_epochs:
        fixed: {train.budget.unit: epochs, train.budget.value: 4}   # dotted public keys
        grid:                                                       # key -> list of values
          train.batch_size: [16, 64, 256]
          train.lr_eff: {base: 2, min_exp: -4, max_exp: 2}          # powers of `base`
          train.seed: [0]
        metric: {name: final_test_accuracy, direction: maximize}
        edges: {extend: true, max_extensions: 3, skip_diverged: true}
        heartbeat: {interval: 10, grace_period: 60}                 # database storages only

Everything is checked before any work: the study's own keys, then every grid point through
`config.from_dict`, so a bad value anywhere fails with one line naming its key
(`studies.<name>.grid.<key>`) and nothing is created in MLflow or Optuna.

The grid is the product of the axes in sorted key order, the order Optuna's GridSampler
enumerates (`GridSampler(search_space)`), and each point is identified by the run key of
its resolved config (DESIGN: run identity). The grid hash is a hash of those run keys, so
the same runs find the same Optuna study and MLflow parent run again, while any change to
what is trained (a grid value, a fixed key, a base key in params.yaml) starts a new study.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sgdnoise.config import (
    Config,
    ConfigError,
    from_dict,
    mapping_keys,
    public_keys,
    with_values,
)
from sgdnoise.contract import study_experiment

LR_KEY = "train.lr_eff"
SEED_KEY = "train.seed"
# Metrics every run reports (train.py); accuracies only for classification models.
METRICS = (
    "final_test_accuracy", "final_train_accuracy", "final_test_loss", "final_train_loss",
    "steps_to_target",  # the NQM with nqm.target set
)  # fmt: skip
ACCURACY_METRICS = ("final_test_accuracy", "final_train_accuracy")
DIRECTIONS = ("maximize", "minimize")
STUDY_KEYS = ("fixed", "grid", "metric", "edges", "heartbeat", "description")
_POW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*\^\s*(-?\d+)\s*$")
MAX_POWER_VALUES = 64


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "direction": self.direction}


@dataclass(frozen=True)
class EdgeRules:
    """Grid-edge rules (see edges.py); on by default."""

    extend: bool = True
    max_extensions: int = 3  # per group and direction
    skip_diverged: bool = True
    metrics: tuple[Metric, ...] = ()  # what "best lr" means; default: the study's metric


@dataclass(frozen=True)
class Heartbeat:
    """Liveness on database storages: a worker silent for `grace_period` s is dead."""

    interval: int = 10
    grace_period: int = 60


@dataclass(frozen=True)
class Point:
    """One grid point: the grid keys' values (Optuna params) and the run it stands for."""

    values: dict[str, Any]
    run_key: str
    run_name: str

    @property
    def lr(self) -> float | None:
        v = self.values.get(LR_KEY)
        return float(v) if v is not None else None

    @property
    def seed(self) -> Any:
        return self.values.get(SEED_KEY)

    @property
    def group(self) -> str:
        """What the grid-edge rules compare learning rates within: all but lr and seed."""
        rest = {k: v for k, v in self.values.items() if k not in (LR_KEY, SEED_KEY)}
        return json.dumps(rest, sort_keys=True)


@dataclass(frozen=True)
class StudySpec:
    name: str
    raw: dict[str, Any]  # the params (file + overrides) the study builds on
    fixed: dict[str, Any]
    axes: dict[str, list[Any]]  # sorted by key, canonical values
    metric: Metric
    edges: EdgeRules
    heartbeat: Heartbeat
    lr_ratio: float  # one extension step: the power base, or 2 for a plain list
    points: list[Point] = field(repr=False)
    grid_hash: str = ""
    experiment: str = "sgdnoise"  # the study's MLflow experiment (contract.study_experiment)

    @property
    def optuna_name(self) -> str:
        return f"{self.name}-{self.grid_hash}"

    @property
    def key(self) -> str:
        return f"studies.{self.name}"

    @property
    def lr_range(self) -> tuple[float, float] | None:
        lrs = self.axes.get(LR_KEY)
        return (min(lrs), max(lrs)) if lrs else None

    def config(self, values: Mapping[str, Any], threads: int | None = None) -> Config:
        """The resolved config of a grid point (threads: this worker's share of the cores),
        recorded in the study's own MLflow experiment."""
        extra: dict[str, Any] = {"tracking.experiment": self.experiment}
        if threads is not None:
            extra["train.threads"] = threads
        return from_dict(with_values(self.raw, {**self.fixed, **values, **extra}))

    def point(self, values: Mapping[str, Any]) -> Point:
        """A validated point (grid or added by the edge rules)."""
        values = {k: values[k] for k in sorted(values)}
        cfg = _point_config(self, values)
        return Point(values, cfg.run_key, _run_name(cfg))

    def describe(self) -> dict[str, Any]:
        """JSON-able definition, stored on the Optuna study and the MLflow parent run."""
        return {
            "name": self.name,
            "fixed": self.fixed,
            "grid": self.axes,
            "metric": self.metric.as_dict(),
            "edges": {
                "extend": self.edges.extend,
                "max_extensions": self.edges.max_extensions,
                "skip_diverged": self.edges.skip_diverged,
                "metrics": [m.as_dict() for m in self.edges.metrics],
            },
            "grid_hash": self.grid_hash,
            "grid_points": len(self.points),
        }


def _run_name(cfg: Config) -> str:
    from sgdnoise.tracking import run_name  # light: MLflow is imported lazily there

    return run_name(cfg)


def load_spec(raw: Mapping[str, Any], name: str) -> StudySpec:
    """Validate `studies.<name>` and every grid point; raise ConfigError naming the key."""
    raw = dict(raw)
    studies = raw.get("studies") or {}
    if not isinstance(studies, Mapping):
        raise ConfigError("studies", "is not a mapping", "a mapping of study names to studies")
    if name not in studies:
        names = ", ".join(sorted(studies)) or "none defined; add one under `studies:`"
        raise ConfigError(f"studies.{name}", "no such study", names)
    key = f"studies.{name}"
    body = studies[name]
    if not isinstance(body, Mapping):
        raise ConfigError(key, f"{body!r} is not a mapping", "fixed, grid, metric, edges")
    for k in body:
        if k not in STUDY_KEYS:
            raise ConfigError(f"{key}.{k}", "unknown key", ", ".join(STUDY_KEYS))
    # The base config must be valid on its own (the study's keys aside).
    base = from_dict(raw)
    known = set(public_keys())

    fixed = _flat_keys(_mapping(body.get("fixed") or {}, f"{key}.fixed"), known)
    for k in fixed:
        _check_key(k, f"{key}.fixed.{k}", known)
    grid_raw = _flat_keys(_mapping(body.get("grid"), f"{key}.grid"), known)
    if not grid_raw:
        raise ConfigError(f"{key}.grid", "is empty", "a mapping of public keys to value lists")
    axes: dict[str, list[Any]] = {}
    lr_ratio = 2.0
    for k in sorted(grid_raw):
        where = f"{key}.grid.{k}"
        _check_key(k, where, known)
        if k in fixed:
            raise ConfigError(where, "is both fixed and a grid axis", "one of the two")
        values, ratio = _axis(k, grid_raw[k], where)
        if ratio is not None:
            lr_ratio = ratio
        axes[k] = values

    # The metric must exist for the study's own workload (its fixed keys may change the
    # dataset or model); fixed values that only make sense with a grid value fall back to
    # the base config, and every grid point is validated below anyway.
    try:
        workload = from_dict(with_values(raw, fixed))
    except ConfigError:
        workload = base
    metric = _metric(body.get("metric"), f"{key}.metric", workload)
    edges = _edges(body.get("edges"), f"{key}.edges", metric, workload)
    heartbeat = _heartbeat(body.get("heartbeat"), f"{key}.heartbeat")
    spec = StudySpec(
        name=name, raw=raw, fixed=fixed, axes=axes, metric=metric, edges=edges,
        heartbeat=heartbeat, lr_ratio=lr_ratio, points=[],
        experiment=study_experiment(workload.tracking.experiment, name),
    )  # fmt: skip
    return _with_points(spec)


def _with_points(spec: StudySpec) -> StudySpec:
    names = list(spec.axes)
    points: list[Point] = []
    seen: dict[str, dict[str, Any]] = {}
    experiment = spec.experiment
    # Optuna's GridSampler enumerates itertools.product over its sorted param names; the
    # same product here, then ordered for the edge rules (see _order).
    for combo in itertools.product(*(spec.axes[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        cfg = _point_config(spec, values)
        if cfg.run_key in seen:
            raise ConfigError(
                f"{spec.key}.grid",
                f"points {seen[cfg.run_key]} and {values} are the same run (run key {cfg.run_key})",
                "grid values that change what is trained",
            )
        seen[cfg.run_key] = values
        experiment = cfg.tracking.experiment
        points.append(Point(values, cfg.run_key, _run_name(cfg)))
    points.sort(key=lambda p: _order(spec, p))
    digest = hashlib.sha256(json.dumps(sorted(seen)).encode()).hexdigest()[:12]
    return replace(spec, points=points, grid_hash=digest, experiment=experiment)


def _order(spec: StudySpec, p: Point) -> tuple:
    """Groups together, learning rates ascending, seeds adjacent: a group finishes early
    (its edge extension can start while other groups run) and the runs that decide whether
    larger learning rates are skipped come first."""
    idx = tuple(spec.axes[k].index(v) for k, v in p.values.items() if k not in (LR_KEY, SEED_KEY))
    lr = p.lr if p.lr is not None else 0.0
    seed = spec.axes[SEED_KEY].index(p.seed) if SEED_KEY in spec.axes else 0
    return (idx, lr, seed)


def _point_config(spec: StudySpec, values: Mapping[str, Any]) -> Config:
    try:
        return spec.config(values)
    except ConfigError as e:
        if e.key in values:
            raise ConfigError(
                f"{spec.key}.grid.{e.key}", f"{_problem(e, values)}", e.allowed
            ) from None
        at = f" at grid point {values}" if values else ""
        if e.key in spec.fixed:
            raise ConfigError(f"{spec.key}.fixed.{e.key}", e.problem + at, e.allowed) from None
        raise ConfigError(e.key, f"{e.problem}{at} of {spec.key}", e.allowed) from None


def _problem(e: ConfigError, values: Mapping[str, Any]) -> str:
    others = {k: v for k, v in values.items() if k != e.key}
    return f"{e.problem} (with {others})" if others else e.problem


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"{value!r} is not a mapping", "a mapping of dotted keys")
    return {str(k): v for k, v in value.items()}


def _flat_keys(d: Mapping[str, Any], known: set[str], prefix: str = "") -> dict[str, Any]:
    """Dotted keys as written in params.yaml (`train.lr_eff: [...]`), plus the nested form
    that `-P studies.s.grid.train.lr_eff=[...]` produces; the nested (override) wins. A
    mapping key's entries are keys of their own (`model.kwargs.width`)."""
    flat: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    mappings = set(mapping_keys())
    for k, v in d.items():
        key = f"{prefix}{k}"
        if (key not in known or key in mappings) and isinstance(v, Mapping) and v:
            nested.update(_flat_keys(v, known, f"{key}."))
        else:
            flat[key] = v
    return {**flat, **nested}


def _check_key(k: str, where: str, known: set[str]) -> None:
    if k not in known and not any(k.startswith(f"{m}.") for m in mapping_keys()):
        raise ConfigError(
            where, "unknown key", "a dotted key of params.yaml, e.g. train.batch_size"
        )


def _axis(k: str, value: Any, where: str) -> tuple[list[Any], float | None]:
    """Canonical, Optuna-friendly scalar values of one axis (and the power base, if any)."""
    ratio = None
    if isinstance(value, Mapping):
        if k != LR_KEY:
            raise ConfigError(where, "only learning rates take {base, min_exp, max_exp}", "a list")
        value, ratio = _powers(value, where)
    if not isinstance(value, list) or not value:
        raise ConfigError(where, f"{value!r} is not a non-empty list", "a list of values")
    out: list[Any] = []
    for v in value:
        if isinstance(v, str) and (m := _POW.match(v)):
            v = float(m.group(1)) ** int(m.group(2))  # "2^-3", as config.py accepts
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(where, f"{v!r} is not finite", "finite values")
        if not (v is None or isinstance(v, str | int | float | bool)):
            raise ConfigError(where, f"{v!r} is not a scalar", "numbers, strings, booleans")
        if k == LR_KEY and isinstance(v, int | float) and not isinstance(v, bool):
            v = float(v)
        if v in out:
            raise ConfigError(where, f"{v!r} appears twice", "distinct values")
        out.append(v)
    return out, ratio


def _powers(spec: Mapping[str, Any], where: str) -> tuple[list[float], float]:
    allowed = "{base: 2, min_exp: <int>, max_exp: <int>} with min_exp <= max_exp"
    unknown = set(spec) - {"base", "min_exp", "max_exp"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key", allowed)
    base = spec.get("base", 2)
    lo, hi = spec.get("min_exp"), spec.get("max_exp")
    if isinstance(base, bool) or not isinstance(base, int | float) or not base > 1:
        raise ConfigError(f"{where}.base", f"{base!r} is not a number > 1", allowed)
    for name, v in (("min_exp", lo), ("max_exp", hi)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}.{name}", f"{v!r} is not an integer", allowed)
    if lo > hi:
        raise ConfigError(where, f"min_exp {lo} > max_exp {hi}", allowed)
    if hi - lo + 1 > MAX_POWER_VALUES:
        raise ConfigError(where, f"{hi - lo + 1} values", f"at most {MAX_POWER_VALUES} powers")
    return [float(base) ** e for e in range(lo, hi + 1)], float(base)


def _metric(value: Any, where: str, base: Config) -> Metric:
    default_name = "final_test_loss" if base.model.name == "autoencoder" else "final_test_accuracy"
    if value is None:
        value = {"name": default_name}
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"{value!r} is not a mapping", "{name: ..., direction: ...}")
    for k in value:
        if k not in ("name", "direction"):
            raise ConfigError(f"{where}.{k}", "unknown key", "name, direction")
    name = value.get("name", default_name)
    if name not in METRICS:
        raise ConfigError(f"{where}.name", f"unknown metric {name!r}", " | ".join(METRICS))
    if name in ACCURACY_METRICS and base.model.name in ("autoencoder", "nqm"):
        raise ConfigError(f"{where}.name", f"{base.model.name} reports no accuracy", "a loss")
    if name == "steps_to_target" and (base.data.name != "nqm" or base.nqm.target is None):
        raise ConfigError(
            f"{where}.name", "steps_to_target needs the NQM with nqm.target set",
            "final_test_loss | final_train_loss",
        )  # fmt: skip
    direction = value.get("direction", "maximize" if "accuracy" in name else "minimize")
    if direction not in DIRECTIONS:
        raise ConfigError(
            f"{where}.direction", f"unknown value {direction!r}", "maximize | minimize"
        )
    return Metric(name, direction)


def _edges(value: Any, where: str, metric: Metric, base: Config) -> EdgeRules:
    value = _mapping(value, where)
    allowed = "extend, max_extensions, skip_diverged, metrics"
    for k in value:
        if k not in allowed.split(", "):
            raise ConfigError(f"{where}.{k}", "unknown key", allowed)
    for k in ("extend", "skip_diverged"):
        if k in value and not isinstance(value[k], bool):
            raise ConfigError(f"{where}.{k}", f"{value[k]!r} is not true | false", "true | false")
    n = value.get("max_extensions", 3)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"{where}.max_extensions", f"{n!r} is not an integer >= 0", ">= 0")
    metrics_raw = value.get("metrics") or [metric.as_dict()]
    if not isinstance(metrics_raw, Sequence) or isinstance(metrics_raw, str):
        raise ConfigError(f"{where}.metrics", "is not a list", "a list of {name, direction}")
    metrics = tuple(_metric(m, f"{where}.metrics", base) for m in metrics_raw)
    return EdgeRules(
        extend=value.get("extend", True),
        max_extensions=n,
        skip_diverged=value.get("skip_diverged", True),
        metrics=metrics,
    )


def _heartbeat(value: Any, where: str) -> Heartbeat:
    value = _mapping(value, where)
    out = {}
    for k in value:
        if k not in ("interval", "grace_period"):
            raise ConfigError(f"{where}.{k}", "unknown key", "interval, grace_period")
        v = value[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}.{k}", f"{v!r} is not an integer >= 1", "seconds >= 1")
        out[k] = v
    hb = Heartbeat(**out)
    if hb.grace_period <= hb.interval:
        raise ConfigError(
            f"{where}.grace_period", f"{hb.grace_period} <= interval {hb.interval}",
            "a grace period longer than the heartbeat interval",
        )  # fmt: skip
    return hb


def canonical_json(values: Mapping[str, Any]) -> str:
    return json.dumps(dict(values), sort_keys=True)
