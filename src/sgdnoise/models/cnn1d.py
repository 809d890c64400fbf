"""A small 1-D convolutional net for sequences such as MNIST-1D (input (N, L) or (N, C, L))."""

from __future__ import annotations

import torch
from torch import nn

from sgdnoise.models.norm import make_norm

KERNEL, PADDING = 5, 2


class CNN1d(nn.Module):
    """`depth` conv layers of `width` channels (kernel 5; stride 1 first, then 2 to stay
    cheap), each followed by a norm and ReLU, then flatten + Linear to the logits."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int,
        width: int,
        norm: str = "none",
        ghost_batch_size: int = 64,
    ) -> None:
        super().__init__()
        if len(input_shape) == 1:
            channels, length = 1, input_shape[0]
        elif len(input_shape) == 2:
            channels, length = input_shape
        else:
            raise ValueError(f"cnn1d takes (L,) or (C, L) inputs, got {input_shape}")
        layers: list[nn.Module] = []
        for i in range(depth):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv1d(
                    channels, width, KERNEL, stride=stride, padding=PADDING, bias=norm == "none"
                ),
                make_norm(norm, width, 1, ghost_batch_size),
                nn.ReLU(inplace=True),
            ]
            channels = width
            length = (length + 2 * PADDING - KERNEL) // stride + 1
        self.features = nn.Sequential(*layers)
        # Flatten rather than pool: where a pattern sits in the sequence carries information.
        self.head = nn.Linear(channels * length, num_classes)
        self._unsqueeze = len(input_shape) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._unsqueeze:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))
