"""A model against its data, before any work: built once and run on two examples, so that a
factory that raises, returns no module, or does not fit the data's shapes fails with one
line naming `model.name` (exit 2) instead of a traceback in the middle of a sweep."""

from __future__ import annotations

import torch

from sgdnoise.config import ConfigError, ModelConfig
from sgdnoise.models.build import build_model
from sgdnoise.usercode import first_line


def check_model(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, task: str
) -> None:
    """Raise ConfigError unless cfg's model builds for these inputs and maps a batch of them
    to logits (N, num_classes), or for reconstruction to inputs of the same shape."""
    shape = tuple(input_shape)
    try:
        model = build_model(cfg, shape, num_classes)
    except ConfigError:
        raise
    except Exception as e:  # a built-in model that does not take these inputs
        raise ConfigError(
            "model.name", f"{cfg.name} cannot be built for inputs {shape} ({first_line(e)})",
            "a model that takes these inputs",
        ) from None  # fmt: skip
    x = torch.zeros(2, *shape)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:
        raise ConfigError(
            "model.name", f"{cfg.name} on a batch of inputs {tuple(x.shape)} raised "
            f"{first_line(e)}", f"a model that takes inputs (N, {', '.join(map(str, shape))})",
        ) from None  # fmt: skip
    want = (2, num_classes) if task == "classification" else x.shape
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != tuple(want):
        what = (
            f"logits {tuple(want)} for {num_classes} classes"
            if task == "classification"
            else f"a reconstruction of the inputs, {tuple(want)} (the data has no labels)"
        )
        raise ConfigError(
            "model.name", f"{cfg.name} maps a batch of inputs {tuple(x.shape)} to {got}", what
        )  # fmt: skip
