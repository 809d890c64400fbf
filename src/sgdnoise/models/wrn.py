"""Pre-activation Wide-ResNet (Zagoruyko & Komodakis 2016), with batch norm, ghost batch norm
or SkipInit (De & Smith 2020: no normalization; each residual branch scaled by a learnable
scalar initialised to 0, so every block starts as the identity)."""

from __future__ import annotations

import torch
from torch import nn

from sgdnoise.models.norm import make_norm


class SkipGain(nn.Module):
    """SkipInit's learnable scalar on a residual branch, initialised to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _conv3x3(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class WideBlock(nn.Module):
    """Pre-activation basic block: [norm, ReLU, conv3x3] x 2, plus a shortcut (1x1 conv on the
    pre-activated input when the shape changes, as in the reference implementation)."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, norm: str, ghost_batch_size: int
    ) -> None:
        super().__init__()
        skipinit = norm == "skipinit"
        layer_norm = "none" if skipinit else norm
        # Without a norm layer after it a conv needs its own bias.
        self.norm1 = make_norm(layer_norm, c_in, 2, ghost_batch_size)
        self.conv1 = _conv3x3(c_in, c_out, stride, bias=skipinit)
        self.norm2 = make_norm(layer_norm, c_out, 2, ghost_batch_size)
        self.conv2 = _conv3x3(c_out, c_out, 1, bias=skipinit)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=skipinit)
        self.alpha = SkipGain() if skipinit else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.norm1(x))
        branch = self.conv2(self.relu(self.norm2(self.conv1(pre))))
        if self.alpha is not None:
            branch = self.alpha(branch)
        skip = x if self.shortcut is None else self.shortcut(pre)
        return skip + branch


class WideResNet(nn.Module):
    """WRN-`depth`-`width`: stem conv to 16 channels, three groups of (depth - 4) / 6 blocks
    of 16k, 32k, 64k channels (strides 1, 2, 2), final norm + ReLU, global average pool and
    a linear classifier. Any image size >= 8 works thanks to the global pool."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: int = 16,
        width: int = 4,
        norm: str = "batch",
        ghost_batch_size: int = 64,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"wrn takes (C, H, W) images, got input shape {input_shape}")
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wrn depth must be 6n + 4 with n >= 1, got {depth}")
        if norm not in ("batch", "ghost", "skipinit"):
            raise ValueError(f"wrn norm must be batch | ghost | skipinit, got {norm!r}")
        n = (depth - 4) // 6
        skipinit = norm == "skipinit"
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = _conv3x3(input_shape[0], widths[0], 1, bias=skipinit)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for c_out, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for i in range(n):
                blocks.append(
                    WideBlock(c_in, c_out, stride if i == 0 else 1, norm, ghost_batch_size)
                )
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.norm = make_norm("none" if skipinit else norm, c_in, 2, ghost_batch_size)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init (fan_out) for convs, unit/zero norm affine, zero biases: the reference WRN code.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.blocks(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))
