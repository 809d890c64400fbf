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


class _PackedLinearFn(torch.autograd.Function):
    """(K·n, in) -> (K·n, out), member k's rows times member k's (in, out) matrix.

    Written out so that its output is a tensor of its own, not a view of bmm's result: the
    models' in-place ReLU on such a view makes autograd hand bmm's backward gradients with
    odd strides, and CPU bmm then copies every member's matrix (about 10x slower)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # what autocast does to (b)addbmm: cast all
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        K, fan_in, fan_out = weight.shape
        h = x.reshape(K, -1, fan_in)
        out = x.new_empty(x.shape[0], fan_out)
        with torch.autocast(device, enabled=False):
            if bias is not None:
                torch.baddbmm(bias.unsqueeze(1), h, weight, out=out.view(K, -1, fan_out))
            else:
                torch.bmm(h, weight, out=out.view(K, -1, fan_out))
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        K, fan_in, fan_out = weight.shape
        g = grad.to(h.dtype).contiguous().view(K, -1, fan_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(g, weight.transpose(1, 2)).view(-1, fan_in).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(h.transpose(1, 2), g).to(w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(1).to(b_dtype)
        return grad_x, grad_w, grad_b


class PackedLinear(nn.Module):
    # Stored transposed, (K, in, out): bmm then reads each member's matrix contiguously.
    transposed = ("weight",)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.transpose(1, 2).contiguous())
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _PackedLinearFn.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        # A view only where needed (inputs of more than two dims): see _PackedLinearFn.
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


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


class StackedModel:
    """K copies of one architecture as one packed module (sgdnoise.models.packed)."""

    def __init__(self, template: nn.Module, states: Sequence[dict[str, torch.Tensor]]):
        self.template = template  # holds the structure; loaded with a member to evaluate it
        self.module = pack_model(template, states)
        self.param_names = [n for n, _ in template.named_parameters()]
        self.state_names = list(template.state_dict().keys())
        self.transposed = transposed_names(self.module)
        self.size = len(states)
        self.params = self._params()

    def _params(self) -> list[torch.Tensor]:
        """The stacked parameters, in the template's parameter order."""
        return [self.module.get_parameter(n) for n in self.param_names]

    def to_leaf(self, name: str, stacked: torch.Tensor) -> torch.Tensor:
        """A stacked tensor in the template's layout -> the packed module's layout."""
        return stacked.transpose(-1, -2).contiguous() if name in self.transposed else stacked

    def view(self, name: str, leaf: torch.Tensor) -> torch.Tensor:
        """A packed tensor as the template lays it out (transposed back where stored so)."""
        return leaf.transpose(-1, -2) if name in self.transposed else leaf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (K, N, ...) -> (K, N, ...), member k on its own inputs x[k]."""
        out = self.module(x.reshape(-1, *x.shape[2:]))
        return out.view(self.size, -1, *out.shape[1:])

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, ...) -> (K, N, ...), every member on the same inputs."""
        return self(x.unsqueeze(0).expand(self.size, *x.shape))

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @property
    def training(self) -> bool:
        return self.module.training

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's state dict, with the keys and layouts of the unpacked model."""
        state = self.module.state_dict()
        return {n: self.view(n, state[n])[k].detach().clone(memory_format=torch.contiguous_format)
                for n in self.state_names}  # fmt: skip

    def load_member(self, k: int) -> nn.Module:
        """The template module holding member k's state (for a single-member evaluation)."""
        self.template.load_state_dict(self.member_state(k))
        return self.template

    @torch.no_grad()
    def select(self, keep: list[int]) -> None:
        """Keep only the members at `keep` (in that order)."""
        index = torch.tensor(keep, device=self.params[0].device)
        for module in self.module.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(p.index_select(0, index)))
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, b.index_select(0, index))
        self.size = len(keep)
        self.params = self._params()
