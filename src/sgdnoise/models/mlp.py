"""Multi-layer perceptron: flatten -> depth x [Linear, norm, ReLU] -> Linear."""

from __future__ import annotations

import math

from torch import nn

from sgdnoise.models.norm import make_norm


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    depth: int,
    width: int,
    norm: str = "none",
    ghost_batch_size: int = 64,
) -> nn.Sequential:
    """An MLP with `depth` hidden layers of `width` units, logits of size `num_classes`."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        # A bias before a norm layer is cancelled by its mean subtraction, so drop it there.
        layers += [
            nn.Linear(fan_in, width, bias=norm == "none"),
            make_norm(norm, width, 1, ghost_batch_size),
            nn.ReLU(inplace=True),
        ]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)
