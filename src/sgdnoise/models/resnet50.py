"""torchvision's ResNet-50, optionally with ghost batch norm in place of every BatchNorm2d."""

from __future__ import annotations

from torch import nn

from sgdnoise.models.norm import GhostBatchNorm


def resnet50(
    input_shape: tuple[int, ...], num_classes: int, norm: str = "batch", ghost_batch_size: int = 256
) -> nn.Module:
    """ResNet-50 (random init) for (C, H, W) images; `norm` is batch | ghost."""
    if len(input_shape) != 3:
        raise ValueError(f"resnet50 takes (C, H, W) images, got input shape {input_shape}")
    if norm not in ("batch", "ghost"):
        raise ValueError(f"resnet50 norm must be batch | ghost, got {norm!r}")
    # Imported here: torchvision takes about a second to import, which every other model's
    # run (and `sgdnoise train`'s start-up) would otherwise pay.
    import torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    channels = input_shape[0]
    if channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(
            channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
        # The same init torchvision gives its convs.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if norm == "ghost":
        _to_ghost(model, ghost_batch_size)
    return model


def _to_ghost(module: nn.Module, ghost_batch_size: int) -> None:
    """Replace every BatchNorm2d below `module` by a GhostBatchNorm carrying over its state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            ghost = GhostBatchNorm(
                child.num_features, ghost_batch_size, eps=child.eps, momentum=child.momentum
            )
            # Same keys as BatchNorm2d, so the affine init (and buffers) carry over exactly.
            ghost.load_state_dict(child.state_dict())
            setattr(module, name, ghost)
        else:
            _to_ghost(child, ghost_batch_size)
