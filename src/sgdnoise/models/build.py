"""`build_model`: a model by name from a ModelConfig, for a given input shape and class count
(a name that is an import path builds the user's own model, models/user.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from sgdnoise.config import ModelConfig
from sgdnoise.models import MODEL_DEFAULTS, MODEL_NORMS
from sgdnoise.models.autoencoder import Autoencoder
from sgdnoise.models.cnn1d import CNN1d
from sgdnoise.models.mlp import mlp
from sgdnoise.models.resnet50 import resnet50
from sgdnoise.models.user import build_user_model
from sgdnoise.models.wrn import WideResNet
from sgdnoise.usercode import is_import_path

# (config, input shape without the batch dim, num_classes) -> module; depth and width are
# already resolved by config (build_model falls back to the defaults for raw configs).
Builder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]

MODELS: dict[str, Builder] = {
    "mlp": lambda c, s, k: mlp(s, k, c.depth, c.width, c.norm, c.ghost_batch_size),
    "cnn1d": lambda c, s, k: CNN1d(s, k, c.depth, c.width, c.norm, c.ghost_batch_size),
    "wrn": lambda c, s, k: WideResNet(s, k, c.depth, c.width, c.norm, c.ghost_batch_size),
    "autoencoder": lambda c, s, k: Autoencoder(s, c.norm, c.ghost_batch_size),
    "resnet50": lambda c, s, k: resnet50(s, k, c.norm, c.ghost_batch_size),
}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build `cfg.name`. Deterministic given the torch seed (the caller seeds). Classifiers
    return logits (N, num_classes); the autoencoder returns a reconstruction (N, *input_shape).
    An import path builds the user's model (models/user.py)."""
    if is_import_path(cfg.name):
        return build_user_model(cfg, tuple(input_shape), num_classes)
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; allowed: {' | '.join(MODELS)}")
    if cfg.norm not in MODEL_NORMS[cfg.name]:
        allowed = " | ".join(MODEL_NORMS[cfg.name])
        raise ValueError(f"{cfg.name} has no {cfg.norm!r} norm; allowed: {allowed}")
    defaults = MODEL_DEFAULTS[cfg.name]
    if cfg.depth is None or cfg.width is None:
        cfg = replace(
            cfg,
            depth=cfg.depth if cfg.depth is not None else defaults["depth"],
            width=cfg.width if cfg.width is not None else defaults["width"],
        )
    return MODELS[cfg.name](cfg, tuple(input_shape), num_classes)
