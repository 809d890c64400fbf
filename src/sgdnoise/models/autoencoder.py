"""Fully connected autoencoder (Hinton & Salakhutdinov 2006 shape): D-1000-500-250-30 and the
mirror 30-250-500-1000-D, the deep-autoencoder benchmark of Shallue et al. and Smith et al."""

from __future__ import annotations

import math

import torch
from torch import nn

from sgdnoise.models.norm import make_norm

HIDDEN = (1000, 500, 250)
CODE = 30


class Autoencoder(nn.Module):
    """Reconstructs its input: output has the input's shape (N, *input_shape). ReLU (after an
    optional norm) follows every hidden layer; the code layer and the output are linear."""

    def __init__(
        self, input_shape: tuple[int, ...], norm: str = "none", ghost_batch_size: int = 64
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        d = math.prod(input_shape)
        layers: list[nn.Module] = [nn.Flatten()]

        def hidden(fan_in: int, fan_out: int) -> list[nn.Module]:
            return [
                nn.Linear(fan_in, fan_out, bias=norm == "none"),
                make_norm(norm, fan_out, 1, ghost_batch_size),
                nn.ReLU(inplace=True),
            ]

        sizes = (d, *HIDDEN)
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += hidden(fan_in, fan_out)
        layers.append(nn.Linear(HIDDEN[-1], CODE))
        sizes = (CODE, *reversed(HIDDEN))
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += hidden(fan_in, fan_out)
        layers.append(nn.Linear(HIDDEN[0], d))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], *self.input_shape)
