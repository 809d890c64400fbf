"""Batched, per-sample data augmentation on the device.

torchvision's v2 transforms draw one set of random parameters per call, so a whole batch
would share one crop and one flip; here every sample gets its own, in a single gather.

Randomness comes only from the generator passed in, and all of a batch's parameters are
drawn in one go (`crop_flip_params`). A caller that splits a batch over processes or
micro-batches can therefore draw the parameters for the global batch and slice them
(`apply_crop_flip(x[s], *(p[s] for p in params))`), so the augmentation of a sample does
not depend on how the batch is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CropFlipParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def crop_flip_params(n: int, generator: torch.Generator, pad: int = 4) -> CropFlipParams:
    """Per-sample (row offset, column offset, flip) for a batch of `n`.

    Offsets are in 0..2*pad (into the padded image); flip is True with probability 1/2.
    Drawn on the generator's device.
    """
    dev = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=dev)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    return offsets[0], offsets[1], flip


def apply_crop_flip(
    x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, pad: int = 4
) -> torch.Tensor:
    """Crop each (C, H, W) sample of `x` from its zero-padded copy at (top, left), then
    mirror it horizontally where `flip`. Output has the shape of `x`.

    Zero padding is the data mean for normalised inputs, as in the usual CIFAR recipe.
    """
    n, _, h, w = x.shape
    dev = x.device
    top, left, flip = top.to(dev), left.to(dev), flip.to(dev)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = top[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = left[:, None] + torch.arange(w, device=dev)  # (N, W)
    # A flip of the crop is the same window read right to left: fold it into the index.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None]
    # Index (N, H, W) positions of the channels-last view -> (N, H, W, C), back to NCHW.
    out = xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (from the image zero-padded by `pad`) and horizontal flip, per sample.

    `x` is a batch (N, C, H, W) on any device. All N samples' parameters are drawn from
    `generator` in one call, so the same generator state gives the same output.
    """
    return apply_crop_flip(x, *crop_flip_params(x.shape[0], generator, pad), pad=pad)
