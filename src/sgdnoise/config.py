"""The one configuration: params.yaml + `-P key=value` overrides, validated before any work.

Each section is a frozen dataclass whose fields carry their own validation rules, so a key,
its default, its type and what is allowed live in one place. Errors are ConfigError, which
the CLI prints as one line `error: <key>: <what is wrong>; allowed: <...>` with exit status 2.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from sgdnoise.data import DATASETS, USER_DATA
from sgdnoise.data.files import data_path_sha256, prepared_source_sha256
from sgdnoise.models import INPUT_KINDS, MODEL_DEFAULTS, MODEL_NORMS, USER_NORMS
from sgdnoise.paths import how_to_get_prepared, prepared_dir, resolve_under_root
from sgdnoise.usercode import UserCodeError, is_import_path, source_sha256

SCHEDULES = ("smith2020", "constant", "cosine", "step")


class ConfigError(ValueError):
    """Bad input: names the key, what is wrong and what is allowed."""

    def __init__(self, key: str, problem: str, allowed: str):
        self.key, self.problem, self.allowed = key, problem, allowed
        super().__init__(f"{key}: {problem}; allowed: {allowed}")


def spec(
    default: Any,
    kind: type,
    *,
    choices: Iterable[str] | None = None,
    check: Callable[[Any], bool] | None = None,
    allowed: str | None = None,
    nullable: bool = False,
    identity: bool | str = True,
    derived: bool = False,
) -> Any:
    """A config field. `identity=False` keys do not change what is trained (paths, devices,
    micro-batching, tracking), so they stay out of the run key; `identity="when_set"` keys
    count only when not null and not an empty mapping (keys added later that must not change
    existing run keys). `derived` keys are filled in by resolution, never set by the user."""
    choices = tuple(choices) if choices is not None else None
    if allowed is None:
        allowed = " | ".join(choices) if choices else _KIND_NAMES[kind]
        if nullable:
            allowed += " or null"
    meta = dict(
        kind=kind,
        choices=choices,
        check=check,
        allowed=allowed,
        nullable=nullable,
        identity=identity,
        derived=derived,
    )
    if isinstance(default, dict):  # a mapping key (model.kwargs): a fresh dict per config
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


_KIND_NAMES = {
    int: "an integer", float: "a number", str: "a string", bool: "true | false", dict: "a mapping",
}  # fmt: skip


def _positive(v: float) -> bool:
    return v > 0


def _dataset_name(v: str) -> bool:
    return v in DATASETS or v == USER_DATA or is_import_path(v)


def _model_name(v: str) -> bool:
    return v in MODEL_DEFAULTS or is_import_path(v)


@dataclass(frozen=True)
class DataConfig:
    # A built-in dataset, `tensors` (arrays in the file at data.path) or an import path of
    # a callable returning them (`mypkg.data:load`, `loaders.py:load`): see data/tensors.py.
    name: str = spec(
        "mnist1d", str, check=_dataset_name,
        allowed=" | ".join([*DATASETS, USER_DATA, "module:callable", "file.py:callable"]),
    )  # fmt: skip
    # Where the official on-disk files of torchvision datasets are (relative to the project root).
    root: str = spec("data/raw", str, identity=False)
    download: bool = spec(False, bool, identity=False)
    # Size and split of generated datasets (mnist1d, synthetic).
    num_samples: int = spec(10000, int, check=lambda v: v >= 20, allowed="an integer >= 20")
    train_split: float = spec(0.8, float, check=lambda v: 0 < v < 1, allowed="a number in (0, 1)")
    seed: int = spec(42, int, check=lambda v: v >= 0, allowed="an integer >= 0")
    # Side of the square images stored for ImageFolder datasets (imagenet): the shorter side
    # is resized to image_size / 0.875, then the centre image_size x image_size is kept.
    # null: 224 there; other datasets ignore it. Part of a run's identity only when set, so
    # adding the key left every other dataset's run keys as they were.
    image_size: int | None = spec(
        None, int, nullable=True, check=lambda v: v >= 8, allowed="an integer >= 8 or null",
        identity="when_set",
    )  # fmt: skip
    # User data only (`tensors` or an import path). The file (relative to the project root)
    # is not part of a run's identity: its content is, through source_sha256.
    path: str | None = spec(None, str, nullable=True, identity=False)
    # `crop_flip`: pad-4 random crop and horizontal flip of (N, C, H, W) images, as CIFAR-10.
    augment: str | None = spec(
        None, str, nullable=True, choices=("crop_flip",), identity="when_set"
    )
    # `channel`: standardize each channel (dim 1 of the inputs) with the training set's mean
    # and std, once, when the data is prepared.
    normalize: str | None = spec(
        None, str, nullable=True, choices=("channel",), identity="when_set"
    )
    # Labels must lie in 0 .. num_classes - 1; null: 1 + the largest label.
    num_classes: int | None = spec(
        None, int, nullable=True, check=_positive, allowed="an integer >= 1 or null",
        identity="when_set",
    )  # fmt: skip
    # SHA-256 of the user's data (the file or .npy folder at data.path) or of the loader's
    # source: editing either makes new runs. Filled in by resolution.
    source_sha256: str | None = spec(None, str, nullable=True, identity="when_set", derived=True)


@dataclass(frozen=True)
class ModelConfig:
    # A built-in model, or an import path of a factory called as
    # factory(input_shape, num_classes, **model.kwargs) -> nn.Module (models/user.py).
    name: str = spec(
        "mlp", str, check=_model_name,
        allowed=" | ".join([*MODEL_DEFAULTS, "module:callable", "file.py:callable"]),
    )  # fmt: skip
    norm: str = spec("none", str, choices=("none", "batch", "ghost", "skipinit"))
    ghost_batch_size: int = spec(64, int, check=_positive, allowed="an integer >= 1")
    depth: int | None = spec(
        None, int, nullable=True, check=_positive, allowed="an integer >= 1 or null"
    )
    width: int | None = spec(
        None, int, nullable=True, check=_positive, allowed="an integer >= 1 or null"
    )
    # Keyword arguments of a user model's factory (recorded as params model.kwargs.<name>).
    kwargs: dict[str, Any] = spec({}, dict, identity="when_set")
    # SHA-256 of the user model's module source: editing the model makes new runs. Filled in
    # by resolution; also the run tag sgdnoise.model_source_sha256.
    source_sha256: str | None = spec(None, str, nullable=True, identity="when_set", derived=True)


@dataclass(frozen=True)
class Budget:
    unit: str = spec("epochs", str, choices=("epochs", "steps"))
    value: float = spec(20, float, check=_positive, allowed="a number > 0")


@dataclass(frozen=True)
class CheckpointEvery:
    unit: str = spec("off", str, choices=("off", "steps", "minutes"), identity=False)
    value: float = spec(1000, float, check=_positive, allowed="a number > 0", identity=False)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = spec("momentum", str, choices=("sgd", "momentum"))
    momentum: float = spec(0.9, float, check=lambda v: 0 <= v < 1, allowed="a number in [0, 1)")
    lr_eff: float = spec(0.5, float, check=_positive, allowed="a number > 0 (or 2^k)")
    batch_size: int = spec(64, int, check=_positive, allowed="an integer >= 1")
    micro_batch_size: int | None = spec(
        None, int, nullable=True, check=_positive, allowed="an integer >= 1 or null (= B)",
        identity=False,
    )  # fmt: skip
    weight_decay: float = spec(5e-4, float, check=lambda v: v >= 0, allowed="a number >= 0")
    budget: Budget = field(default_factory=Budget)
    schedule: str = spec("smith2020", str, choices=SCHEDULES)
    # Linear warm-up over this fraction of the budget, on top of any schedule.
    warmup: float = spec(0.0, float, check=lambda v: 0 <= v < 1, allowed="a number in [0, 1)")
    seed: int = spec(0, int, check=lambda v: v >= 0, allowed="an integer >= 0")
    # Evaluation points spread evenly over the run (step 0 included), plus the final one.
    eval_points: int = spec(10, int, check=_positive, allowed="an integer >= 1")
    # Evaluations before the final one use this many examples of each split (a fixed random
    # subset, the same for every run), which keeps curves cheap at small B; the final
    # evaluation always uses the full sets. null: full sets throughout. Part of a run's
    # identity only when set (divergence at an evaluation is judged on what it measured).
    eval_subset: int | None = spec(
        None, int, nullable=True, check=_positive, allowed="an integer >= 1 or null (full sets)",
        identity="when_set",
    )  # fmt: skip
    eval_batch_size: int = spec(
        2048, int, check=_positive, allowed="an integer >= 1", identity=False
    )
    # A run diverges when its loss is non-finite or above this multiple of its initial loss.
    divergence_factor: float = spec(20.0, float, check=lambda v: v > 1, allowed="a number > 1")
    # Measure the gradient noise scale B_simple from the micro-batch gradients that
    # accumulation already computes (needs accumulation >= 2; no extra passes).
    noise_scale: bool = spec(True, bool, identity=False)
    # Checkpoints for long runs (resume after preemption); off by default for short runs.
    checkpoint_every: CheckpointEvery = field(default_factory=CheckpointEvery)
    precision: str = spec("fp32", str, choices=("fp32", "bf16"))
    device: str = spec("auto", str, choices=("auto", "cpu", "cuda"), identity=False)
    # A sweep trains up to this many grid points of one group (same model, B and budget;
    # other lr_eff or seed) as one packed model; null: a default for the device and B
    # (sgdnoise.pack.default_pack_size); 1: no packing.
    pack: int | None = spec(
        None, int, nullable=True, check=_positive,
        allowed="an integer >= 1 or null (= by device and B)", identity=False,
    )  # fmt: skip
    # Intra-op threads per process; null divides the machine's cores among local processes.
    threads: int | None = spec(
        None, int, nullable=True, check=_positive, allowed="an integer >= 1 or null",
        identity=False,
    )  # fmt: skip


@dataclass(frozen=True)
class TrackingConfig:
    # null: $MLFLOW_TRACKING_URI, else sqlite at the project root (see paths).
    uri: str | None = spec(None, str, nullable=True, identity=False)
    experiment: str = spec(
        "sgdnoise", str, check=lambda v: bool(v.strip()), allowed="a non-empty string",
        identity=False,
    )  # fmt: skip
    run_name: str | None = spec(None, str, nullable=True, identity=False)


@dataclass(frozen=True)
class NQMSection:
    """The noisy quadratic model (data.name = model.name = nqm): spectrum h_i = i^-h_power,
    gradient-noise variances c_i = c_scale h_i, start θ_0,i = theta0 (Zhang et al. 2019)."""

    dim: int = spec(10_000, int, check=_positive, allowed="an integer >= 1")
    h_power: float = spec(1.0, float, check=lambda v: v >= 0, allowed="a number >= 0")
    c_scale: float = spec(1.0, float, check=lambda v: v >= 0, allowed="a number >= 0")
    theta0: float = spec(1.0, float)
    # steps_to_target: the first step at which the expected loss reaches this (null: none).
    target: float | None = spec(
        None, float, nullable=True, check=_positive, allowed="a number > 0 or null"
    )


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    nqm: NQMSection = field(default_factory=NQMSection)
    # Study definitions are validated by the sweep; kept raw here.
    studies: Mapping[str, Any] = field(default_factory=dict)

    # ---- derived quantities, used by every part that needs them ----
    @property
    def momentum(self) -> float:
        """The heavy-ball coefficient actually used (0 for plain SGD)."""
        return self.train.momentum if self.train.optimizer == "momentum" else 0.0

    @property
    def lr(self) -> float:
        """The optimizer's step size ε = ε_eff (1 − m)."""
        return self.train.lr_eff * (1.0 - self.momentum)

    def to_dict(self, *, studies: bool = False) -> dict[str, Any]:
        out = {s: _as_dict(getattr(self, s)) for s in SECTIONS}
        if studies:
            out["studies"] = dict(self.studies)
        return out

    def flat(self) -> dict[str, Any]:
        """Every resolved key as `section.key` (what MLflow records as params)."""
        return dict(_flatten(self.to_dict()))

    def identity(self) -> dict[str, Any]:
        # The nqm section only identifies NQM runs (its defaults may change freely otherwise).
        return {
            s: _identity_dict(getattr(self, s))
            for s in SECTIONS
            if s != "nqm" or self.data.name == "nqm"
        }

    @property
    def run_key(self) -> str:
        """A hash of everything that changes what is trained (see DESIGN: run identity)."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SECTIONS = ("data", "model", "train", "tracking", "nqm")
_SECTION_TYPES = {f.name: f.default_factory for f in fields(Config) if f.name in SECTIONS}


def _as_dict(obj: Any) -> dict[str, Any]:
    return {
        f.name: _as_dict(v) if is_dataclass(v := getattr(obj, f.name)) else v for f in fields(obj)
    }


def _identity_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            out[f.name] = _identity_dict(v)
        elif counts_for_identity(f, v):
            out[f.name] = v
    return out


def counts_for_identity(f: Any, value: Any) -> bool:
    """Whether config field `f` holding `value` changes what is trained (see `spec`)."""
    rule = f.metadata.get("identity", True)
    unset = value is None or (isinstance(value, Mapping) and not value)
    return rule is True or (rule == "when_set" and not unset)


def mapping_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Public keys whose value is a mapping (model.kwargs): `key.name` sets one entry."""
    out = []
    for f in fields(cls):
        typ = f.default_factory if f.default_factory is not MISSING else None
        if f.name == "studies":
            continue
        if typ is not None and is_dataclass(typ):
            out += mapping_keys(typ, f"{prefix}{f.name}.")
        elif f.metadata.get("kind") is dict:
            out.append(f"{prefix}{f.name}")
    return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def public_keys(cls: type = Config, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        if f.name == "studies":
            continue
        typ = f.default_factory if f.default_factory is not MISSING else None
        if typ is not None and is_dataclass(typ):
            out += public_keys(typ, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


# ---------------------------------------------------------------------------------------
# Loading


_POW2 = re.compile(r"^\s*2\s*\^\s*(-?\d+(?:\.\d+)?)\s*$")


def _coerce(key: str, value: Any, meta: Mapping[str, Any]) -> Any:
    kind, allowed = meta["kind"], meta["allowed"]
    if value is None:
        if meta["nullable"]:
            return None
        raise ConfigError(key, "must not be null", allowed)
    bad = ConfigError(key, f"{value!r} is not {_KIND_NAMES[kind]}", allowed)
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind is float:
        if isinstance(value, str):
            m = _POW2.match(value)
            try:
                value = 2.0 ** float(m.group(1)) if m else float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, f"{value!r} is not finite", allowed)
    elif kind is str:
        if not isinstance(value, str):
            raise bad
    elif kind is dict:
        if not isinstance(value, Mapping):
            raise bad
        return _plain(key, value)
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(key, f"unknown value {value!r}", allowed)
    if meta["check"] is not None and not meta["check"](value):
        problem = f"unknown value {value!r}" if kind is str else f"{value!r} is out of range"
        raise ConfigError(key, problem, allowed)
    return value


def _plain(key: str, value: Any) -> Any:
    """A copy of a mapping value made of what YAML and JSON share (it is hashed into run
    keys and recorded as params): strings, numbers, booleans, null, lists, mappings."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(key, f"key {k!r} is not a string", "a mapping with string keys")
            out[k] = _plain(f"{key}.{k}", v)
        return out
    if isinstance(value, list | tuple):
        return [_plain(key, v) for v in value]
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise ConfigError(key, f"{value!r} is not a plain value", "strings, numbers, booleans, null, "
                      "lists and mappings")  # fmt: skip


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix.rstrip("."), f"{raw!r} is not a mapping", "a mapping of keys")
    known = {f.name: f for f in fields(cls)}
    for k in raw:
        if k not in known:
            allowed = ", ".join(prefix + n for n in known)
            raise ConfigError(f"{prefix}{k}", "unknown key", allowed)
    kwargs = {}
    for name, f in known.items():
        if name not in raw:
            continue
        if f.metadata.get("derived"):
            raise ConfigError(f"{prefix}{name}", "is derived when the config is resolved",
                              "leave it out")  # fmt: skip
        typ = f.default_factory if f.default_factory is not MISSING else None
        if typ is not None and is_dataclass(typ):
            kwargs[name] = _build(typ, raw[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, raw[name], f.metadata)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"-P {text}", "expected key=value", "key=value with a dotted key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # an unparsable value is a plain string; type checks come later
    return key, parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section", "a mapping of keys")
        node = nxt
    node[parts[-1]] = value


def read_params(path: Path | str | None) -> dict[str, Any]:
    """Read a params file. None means the project's params.yaml, which may be absent."""
    from sgdnoise.paths import default_params_file

    explicit = path is not None
    p = Path(path) if explicit else default_params_file()
    if not p.is_file():
        if explicit:
            raise ConfigError("--params", f"{str(p)!r} does not exist", "a readable YAML file")
        return {}
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError(
            "--params", f"{p} is not valid YAML ({first})", "a YAML mapping"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("--params", f"{p} does not hold a mapping", "a YAML mapping")
    return raw


def raw_params(params: Path | str | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """params file + `key=value` overrides, not yet validated (a sweep adds grid values)."""
    raw = read_params(params)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return raw


def with_values(raw: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `raw` with dotted keys set (e.g. a study's fixed values and a grid point)."""
    out = copy.deepcopy(dict(raw))
    for key, value in values.items():
        _set_dotted(out, key, value)
    return out


def load_config(
    params: Path | str | None = None,
    overrides: Iterable[str] = (),
    *,
    num_processes: int | None = None,
) -> Config:
    """params file + overrides -> a validated, resolved Config. Raises ConfigError."""
    return from_dict(raw_params(params, overrides), num_processes=num_processes)


def from_dict(raw: Mapping[str, Any], *, num_processes: int | None = None) -> Config:
    allowed = ", ".join((*SECTIONS, "studies"))
    for k in raw:
        if k not in (*SECTIONS, "studies"):
            raise ConfigError(str(k), "unknown key", allowed)
    sections = {s: _build(_SECTION_TYPES[s], raw.get(s) or {}, f"{s}.") for s in SECTIONS}
    studies = raw.get("studies") or {}
    if not isinstance(studies, Mapping):
        raise ConfigError("studies", "is not a mapping", "a mapping of study names to studies")
    cfg = Config(**sections, studies=dict(studies))
    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    return _resolve(cfg, num_processes)


def store_config(raw: Mapping[str, Any]) -> Config:
    """What reading the tracking store needs: `raw`'s tracking section (validated) and its
    studies, the rest left at defaults and unresolved (resolving would read the user's data
    and code, which a reader of finished runs may no longer have)."""
    studies = raw.get("studies") or {}
    if not isinstance(studies, Mapping):
        raise ConfigError("studies", "is not a mapping", "a mapping of study names to studies")
    tracking = _build(TrackingConfig, raw.get("tracking") or {}, "tracking.")
    return Config(tracking=tracking, studies=dict(studies))


def _resolve(cfg: Config, processes: int) -> Config:
    """Fill derived values and reject impossible combinations."""
    d, m, t = _resolve_data(cfg.data), _resolve_model(cfg.model), cfg.train
    if "nqm" in (d.name, m.name) and d.name != m.name:
        raise ConfigError("model.name", f"{m.name} does not take {d.name}", "nqm with data nqm")
    if d.name in DATASETS and m.name in MODEL_DEFAULTS:
        # With user data or a user model, shapes are checked on the data itself, before any
        # work (models.check).
        kind = DATASETS[d.name]
        if kind not in INPUT_KINDS[m.name]:
            ok = [n for n, kinds in INPUT_KINDS.items() if kind in kinds]
            raise ConfigError(
                "model.name", f"{m.name} does not take {d.name} ({kind} input)", " | ".join(ok)
            )
    if m.name == "wrn" and (m.depth - 4) % 6:
        raise ConfigError(
            "model.depth", f"{m.depth} is not 6n + 4 for a Wide-ResNet", "10, 16, 22, 28, 40, ..."
        )

    B = t.batch_size
    if B % processes:
        raise ConfigError(
            "train.batch_size", f"B={B} does not split over {processes} processes",
            f"a multiple of the process count {processes}",
        )  # fmt: skip
    per_process = B // processes
    micro = t.micro_batch_size if t.micro_batch_size is not None else per_process
    if per_process % micro:
        raise ConfigError(
            "train.micro_batch_size",
            f"B={B} is not divisible by micro_batch_size x processes = {micro} x {processes}",
            f"a divisor of B / processes = {per_process}",
        )
    if (
        m.norm == "ghost"
        and micro % m.ghost_batch_size
        and not (micro == B and B < m.ghost_batch_size)
    ):
        raise ConfigError(
            "train.micro_batch_size",
            f"{micro} is not a multiple of model.ghost_batch_size = {m.ghost_batch_size}",
            f"a multiple of {m.ghost_batch_size} (or B < {m.ghost_batch_size} without splitting)",
        )
    if d.name == "nqm" and t.budget.unit != "steps":
        raise ConfigError(
            "train.budget.unit", "the NQM has no epochs", "steps (with data.name nqm)"
        )
    if t.budget.unit == "steps" and t.budget.value != int(t.budget.value):
        raise ConfigError(
            "train.budget.value", f"{t.budget.value} steps is not whole", "a whole number of steps"
        )
    t = replace(t, micro_batch_size=micro)
    if t.optimizer == "sgd":
        t = replace(t, momentum=0.0)  # recorded as used: plain SGD has no momentum
    return replace(cfg, data=d, model=m, train=t)


def _resolve_model(m: ModelConfig) -> ModelConfig:
    """A built-in model's size defaults, or a user model's source hash (models/user.py)."""
    if not is_import_path(m.name):
        if m.kwargs:
            raise ConfigError(
                "model.kwargs", f"{m.name} takes no kwargs",
                "{} (kwargs are for a model given by import path, module:callable)",
            )  # fmt: skip
        if m.norm not in MODEL_NORMS[m.name]:
            raise ConfigError(
                "model.norm", f"{m.name} has no {m.norm!r} norm", " | ".join(MODEL_NORMS[m.name])
            )
        defaults = MODEL_DEFAULTS[m.name]
        return replace(
            m,
            depth=m.depth if m.depth is not None else defaults["depth"],
            width=m.width if m.width is not None else defaults["width"],
        )
    for key in ("depth", "width"):
        if getattr(m, key) is not None:
            raise ConfigError(
                f"model.{key}", f"is not used by {m.name}",
                "null (a model given by import path is sized by model.kwargs)",
            )  # fmt: skip
    if m.norm not in USER_NORMS:
        raise ConfigError(
            "model.norm", f"{m.norm!r} is not for a model given by import path",
            " | ".join(USER_NORMS),
        )  # fmt: skip
    return replace(m, source_sha256=_source_sha256("model.name", m.name))


def _resolve_data(d: DataConfig) -> DataConfig:
    """User data: where it is and the hash of its content (or its loader's source)."""
    user_keys = ("path", "augment", "normalize", "num_classes")
    if d.name in DATASETS:
        for key in user_keys:
            if getattr(d, key) is not None:
                raise ConfigError(
                    f"data.{key}", f"is for user data, not {d.name}",
                    f"null (set with data.name {USER_DATA} or module:callable)",
                )  # fmt: skip
        return d
    if d.name != USER_DATA:
        if d.path is not None:
            raise ConfigError(
                "data.path", f"is read by data.name {USER_DATA}, not by a callable",
                "null (the callable returns the arrays)",
            )  # fmt: skip
        return replace(d, source_sha256=_source_sha256("data.name", d.name))
    allowed = "a .pt or .npz file, or a folder of .npy files, relative to the project root"
    if d.path is None:
        raise ConfigError("data.path", f"must be set with data.name {USER_DATA}", allowed)
    path = resolve_under_root(d.path)
    try:
        sha = data_path_sha256(path)
    except FileNotFoundError:
        # A worker that pulled the prepared data but not the file, which DVC tracks (its
        # .dvc file is here, so this is no typo): the folder says which data it holds;
        # whether that fits the rest of data.* is checked on loading.
        tracked = path.with_name(path.name + ".dvc").is_file()
        sha = prepared_source_sha256(prepared_dir(USER_DATA)) if tracked else None
        if sha is None:
            pulled = f" and no prepared data from it in data/prepared/{USER_DATA}"
            raise ConfigError(
                "data.path", f"{path} does not exist{pulled if tracked else ''}",
                f"{allowed}; or {how_to_get_prepared(USER_DATA)}",
            ) from None  # fmt: skip
    except (OSError, ValueError) as e:
        raise ConfigError("data.path", str(e), allowed) from None
    return replace(d, source_sha256=sha)


def _source_sha256(key: str, path: str) -> str:
    try:
        return source_sha256(path)
    except UserCodeError as e:
        raise ConfigError(key, e.problem, e.allowed) from None


def check_batch_size(cfg: Config, n_train: int) -> None:
    """B against the training set: larger is an error; equal is full-batch gradient descent
    (every step the exact gradient of the training loss: the noise-free reference)."""
    B = cfg.train.batch_size
    if B > n_train:
        raise ConfigError(
            "train.batch_size", f"B={B} is larger than the training set ({n_train} examples)",
            f"an integer from 1 to {n_train} (B = {n_train} is full-batch gradient descent)",
        )  # fmt: skip


def accumulation_steps(cfg: Config, processes: int) -> int:
    return cfg.train.batch_size // (cfg.train.micro_batch_size * processes)
