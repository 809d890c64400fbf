"""The user's own model, by import path: `factory(input_shape, num_classes, **model.kwargs)`
returning an nn.Module, with `model.norm` applied to its batch norm layers.

- `batch`: the model as written (its BatchNorm layers normalize each micro-batch).
- `none`: the model as written; a model with batch norm layers is an error naming them.
- `ghost`: every BatchNorm1d/2d becomes a GhostBatchNorm of the same num_features, eps,
  momentum and affine, holding the same parameters and buffers, so the run has the built-in
  models' exactness guarantees (accumulation, processes, running statistics; norm.py).
  Other batch norm kinds (3-D, synchronized, lazy, without running statistics or with
  cumulative averaging) have no ghost form: an error naming them.

Every failure is a ConfigError; `models.check` builds the model once before any work, so a
bad factory never gets as far as a run.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sgdnoise.config import ConfigError, ModelConfig
from sgdnoise.models.norm import GhostBatchNorm
from sgdnoise.usercode import UserCodeError, first_line, load

GHOST_FORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def build_user_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Call the factory (deterministic given the torch seed, which the caller sets)."""
    try:
        factory = load(cfg.name)
    except UserCodeError as e:
        raise ConfigError("model.name", e.problem, e.allowed) from None
    call = f"{cfg.name}({tuple(input_shape)}, {num_classes}{_kwargs_text(cfg.kwargs)})"
    try:
        model = factory(tuple(input_shape), num_classes, **cfg.kwargs)
    except Exception as e:
        raise ConfigError(
            "model.name", f"{call} raised {first_line(e)}",
            "a factory(input_shape, num_classes, **model.kwargs) that returns an nn.Module",
        ) from None  # fmt: skip
    if not isinstance(model, nn.Module):
        kind = type(model).__name__
        raise ConfigError(
            "model.name", f"{call} returned a value of type {kind}, not an nn.Module",
            "a factory that returns a torch.nn.Module",
        )  # fmt: skip
    return apply_norm(model, cfg.norm, cfg.ghost_batch_size, cfg.name)


def batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every batch norm layer of `model` (any kind), by name."""
    norms, instance = nn.modules.batchnorm._NormBase, nn.modules.instancenorm._InstanceNorm
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, norms) and not isinstance(m, instance)]  # fmt: skip


def apply_norm(
    model: nn.Module, norm: str, ghost_batch_size: int, name: str = "the model"
) -> nn.Module:
    """`model` with `norm` (none | batch | ghost) applied, in place; see the module doc."""
    found = batch_norms(model)
    if norm == "none" and found:
        raise ConfigError(
            "model.norm", f"none, but {name} has batch norm layers {_names(found)}",
            "batch (as written) | ghost (ghost batch norm in their place)",
        )  # fmt: skip
    if norm != "ghost":
        return model
    if not found:
        raise ConfigError(
            "model.norm", f"ghost, but {name} has no BatchNorm1d/BatchNorm2d layers",
            "none | batch (a model without batch norm is trained as written)",
        )  # fmt: skip
    unfit = [(n, m) for n, m in found if not _ghostable(m)]
    if unfit:
        raise ConfigError(
            "model.norm", f"ghost, but {_names(unfit)} have no ghost form",
            "BatchNorm1d/BatchNorm2d with running statistics and a momentum (or model.norm "
            "batch)",
        )  # fmt: skip
    for layer, bn in found:
        ghost = to_ghost(bn, ghost_batch_size)
        if layer:
            model.set_submodule(layer, ghost)
        else:
            return ghost  # the model is one batch norm layer
    return model


def to_ghost(bn: nn.Module, ghost_batch_size: int) -> GhostBatchNorm:
    """A GhostBatchNorm of `bn`'s shape and settings, holding its parameters and buffers."""
    ghost = GhostBatchNorm(bn.num_features, ghost_batch_size, bn.eps, bn.momentum, bn.affine)
    ghost = ghost.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    ghost.load_state_dict(bn.state_dict())
    ghost.train(bn.training)
    return ghost


def _ghostable(m: nn.Module) -> bool:
    return (
        type(m) in GHOST_FORMS
        and m.track_running_stats
        and m.momentum is not None
        and m.running_mean is not None
    )


def _names(found: Sequence[tuple[str, nn.Module]]) -> str:
    shown = [f"{n or '<root>'} ({type(m).__name__})" for n, m in found[:5]]
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    return ", ".join(shown) + more


def _kwargs_text(kwargs: dict) -> str:
    return "".join(f", {k}={v!r}" for k, v in kwargs.items())
