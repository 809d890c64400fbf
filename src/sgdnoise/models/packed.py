"""K copies of one model as one module, for packed training (sgdnoise.pack).

`pack_model` replaces every layer that holds parameters or statistics by a packed layer
whose tensors carry a leading member axis of size K. The members' examples travel side by
side along the batch axis, member-major (rows [k n, (k + 1) n) are member k's), so every
layer without parameters, and every model's own forward (flatten, pooling, residual sums),
works unchanged. A packed layer computes all members in one batched kernel: bmm for
Linear, a K-group convolution for Conv, one batch norm over (member, ghost batch, channel)
for the norms. Nothing is traced or re-parametrised per call (torch.func.vmap over a
functional_call costs ~0.3 ms of Python per step, more than a small MLP's whole step).

Statistics stay per member: a packed norm normalizes each member's (ghost) batches alone
and updates each member's running statistics exactly as GhostBatchNorm / BatchNorm would.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sgdnoise.models.norm import GhostBatchNorm, ghost_groups
from sgdnoise.models.wrn import SkipGain


class NotPackable(ValueError):
    """The model holds a layer with parameters that has no packed counterpart."""


class PackedLinear(nn.Module):
    # Stored transposed, (K, in, out): bmm then reads each member's matrix contiguously.
    transposed = ("weight",)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.transpose(1, 2).contiguous())
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, fan_in, fan_out = self.weight.shape
        h = x.reshape(K, -1, fan_in)
        if self.bias is not None:
            out = torch.baddbmm(self.bias.unsqueeze(1), h, self.weight)
        else:
            out = torch.bmm(h, self.weight)
        return out.reshape(*x.shape[:-1], fan_out)


class PackedConv(nn.Module):
    """Conv1d / Conv2d: the members become groups of one grouped convolution."""

    transposed = ()

    def __init__(
        self, conv: nn.Conv1d | nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None
    ):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotPackable(f"{type(conv).__name__} with padding {conv.padding!r}")
        self.weight = nn.Parameter(weight.clone())  # (K, out, in / groups, *kernel)
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups
        self.conv = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, c_out = self.weight.shape[:2]
        kn, c, *spatial = x.shape
        n = kn // K
        xg = x.reshape(K, n, c, *spatial).transpose(0, 1).reshape(n, K * c, *spatial)
        w = self.weight.reshape(K * c_out, *self.weight.shape[2:])
        b = self.bias.reshape(-1) if self.bias is not None else None
        y = self.conv(xg, w, b, self.stride, self.padding, self.dilation, K * self.groups)
        out_spatial = y.shape[2:]
        return y.reshape(n, K, c_out, *out_spatial).transpose(0, 1).reshape(kn, c_out, *out_spatial)


class PackedNorm(nn.Module):
    """BatchNorm1d/2d (one group per member batch) or GhostBatchNorm (ghost batches of G):
    each member's groups normalized on their own, in one batch-norm call; running
    statistics updated per member in the closed form of GhostBatchNorm (see norm.py)."""

    transposed = ()

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm | GhostBatchNorm, states: dict):
        super().__init__()
        if isinstance(norm, GhostBatchNorm):
            self.ghost_batch_size: int | None = norm.ghost_batch_size
        else:
            if norm.momentum is None or not norm.track_running_stats:
                raise NotPackable("batch norm without running statistics or momentum")
            self.ghost_batch_size = None
        self.eps, self.momentum = norm.eps, float(norm.momentum)
        self.weight = nn.Parameter(states["weight"].clone()) if "weight" in states else None
        self.bias = nn.Parameter(states["bias"].clone()) if "bias" in states else None
        self.register_buffer("running_mean", states["running_mean"].clone())
        self.register_buffer("running_var", states["running_var"].clone())
        self.register_buffer("num_batches_tracked", states["num_batches_tracked"].clone())

    def _groups(self, n: int) -> int:
        g = self.ghost_batch_size
        return 1 if g is None else ghost_groups(n, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, c = self.running_mean.shape
        kn, _, *spatial = x.shape
        n = kn // K
        k = self._groups(n) if self.training else 1
        g = n // k
        # (K·n, C, *S) -> (g, K·k·C, *S): every (member, ghost batch, channel) is a channel.
        xg = x.reshape(K, k, g, c, *spatial).movedim(2, 0).reshape(g, K * k * c, *spatial)
        w = self.weight[:, None, :].expand(K, k, c).reshape(-1) if self.weight is not None else None
        b = self.bias[:, None, :].expand(K, k, c).reshape(-1) if self.bias is not None else None
        if self.training:
            dtype = self.running_mean.dtype
            means = torch.zeros(K * k * c, dtype=dtype, device=x.device)
            variances = torch.ones(K * k * c, dtype=dtype, device=x.device)
            y = F.batch_norm(xg, means, variances, w, b, True, 1.0, self.eps)
            self._update(means.view(K, k, c), variances.view(K, k, c))
        else:
            y = F.batch_norm(xg, self.running_mean.reshape(-1), self.running_var.reshape(-1),
                             w, b, False, 0.0, self.eps)  # fmt: skip
        return y.reshape(g, K, k, c, *spatial).movedim(0, 2).reshape(kn, c, *spatial)

    @torch.no_grad()
    def _update(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        k, mu = means.shape[1], self.momentum
        powers = torch.arange(k - 1, -1, -1, dtype=means.dtype, device=means.device)
        weights = mu * (1.0 - mu) ** powers
        decay = (1.0 - mu) ** k
        self.running_mean.mul_(decay).add_(torch.einsum("j,kjc->kc", weights, means))
        self.running_var.mul_(decay).add_(torch.einsum("j,kjc->kc", weights, variances))
        self.num_batches_tracked.add_(k)


class PackedSkipGain(nn.Module):
    transposed = ()

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())  # (K,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.weight.shape[0]
        w = self.weight.view(K, *([1] * x.dim()))
        return (x.reshape(K, -1, *x.shape[1:]) * w).reshape(x.shape)


def _packed(module: nn.Module, stacked: dict[str, torch.Tensor]) -> nn.Module | None:
    """The packed counterpart of one layer, from its stacked (K, ...) tensors."""
    if isinstance(module, nn.Linear):
        return PackedLinear(stacked["weight"], stacked.get("bias"))
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return PackedConv(module, stacked["weight"], stacked.get("bias"))
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, GhostBatchNorm)):
        return PackedNorm(module, stacked)
    if isinstance(module, SkipGain):
        return PackedSkipGain(stacked["weight"])
    return None


def pack_model(template: nn.Module, states: Sequence[dict[str, torch.Tensor]]) -> nn.Module:
    """A copy of `template` holding the K member states `states` (template state dicts)."""
    packed = copy.deepcopy(template)
    for name, module in list(packed.named_modules()):
        own = {n: t for n, t in module.state_dict().items() if "." not in n}
        if not own:
            continue
        prefix = f"{name}." if name else ""
        stacked = {n: torch.stack([s[prefix + n] for s in states]) for n in own}
        replacement = _packed(module, stacked)
        if replacement is None:
            raise NotPackable(f"{name or 'the model'} ({type(module).__name__}) cannot be packed")
        if name:
            packed.set_submodule(name, replacement)
        else:
            return replacement
    return packed


def transposed_names(packed: nn.Module) -> set[str]:
    """Tensors a packed model stores transposed relative to the template's layout."""
    return {
        f"{m}.{t}" if m else t
        for m, mod in packed.named_modules()
        for t in getattr(mod, "transposed", ())
    }
