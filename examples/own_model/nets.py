"""A small CNN for sgdnoise: `model.name: nets.py:make_net` in params.yaml.

sgdnoise calls make_net(input_shape, num_classes, **model.kwargs) and trains what it
returns. Its BatchNorm2d layers make it a batch-norm network: `model.norm: ghost` puts ghost
batch norm in their place (statistics per ghost batch of model.ghost_batch_size examples),
`batch` trains it as written. Conv2d, BatchNorm2d and Linear all have packed forms, so a
sweep trains several of its runs at once as one packed model.
"""

from __future__ import annotations

from torch import nn


def make_net(input_shape: tuple[int, ...], num_classes: int, width: int = 8) -> nn.Module:
    channels = input_shape[0]

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        # No bias before a batch norm: its mean subtraction would cancel it.
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]  # fmt: skip

    return nn.Sequential(
        *block(channels, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )
