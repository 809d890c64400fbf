"""A packed MLP's training step written out: forward, loss and backward without autograd.

At the small batch sizes of the noise-dominated regime a packed step of the default MLP is
a handful of small batched matrix products, and what it costs beyond them is fixed: autograd
records a graph, runs a Python function per packed layer in each direction, and hands every
gradient back in a freshly allocated tensor that the optimizer then reads from memory. For
a plain stack of packed Linear layers with ReLU between them (what `models.mlp` builds with
`model.norm: none`) this module computes the same quantities with the same kernels, in the
same order, into gradient buffers that stay in place from step to step:

- forward: the `baddbmm` of `_PackedLinearFn`, ReLU in place; the loss as
  `F.cross_entropy`'s log-softmax and negative log-likelihood, each member's mean;
- backward: autograd's own `_log_softmax_backward_data` on the gradient that the mean and
  the negative log-likelihood hand it, then per layer the `bmm`s and the bias sum of
  `_PackedLinearFn.backward` and ReLU's `threshold_backward`.

So a member's parameters follow the autograd path's to the bit (tests/test_packed_mlp.py).
A packed step by hand takes 0.67–0.92 of the autograd one at B = 4 … 16 on this CPU,
0.83–0.97 at B = 64, depending on the pack size (`benchmarks/member_step.py --compare`).
Any other model, or autocast, takes the autograd path.
"""

from __future__ import annotations

import torch
from torch import nn

from sgdnoise.models.packed import PackedLinear


def mlp_layers(module: nn.Module) -> list[PackedLinear] | None:
    """The Linear layers of a packed plain MLP: a Sequential of an optional Flatten, then
    Linear layers with one ReLU (and Identity placeholders) between consecutive ones and
    nothing after the last. None for anything else (norms, dropout, other layers)."""
    if not isinstance(module, nn.Sequential):
        return None
    layers: list[PackedLinear] = []
    relu_since_last = True
    for i, child in enumerate(module):
        if (
            isinstance(child, nn.Flatten)
            and i == 0
            and child.start_dim == 1
            and child.end_dim == -1
        ):
            continue
        if isinstance(child, nn.Identity):
            continue
        if isinstance(child, PackedLinear):
            if layers and not relu_since_last:
                return None  # two Linear layers in a row: not this path's structure
            layers.append(child)
            relu_since_last = False
        elif isinstance(child, nn.ReLU) and layers and not relu_since_last:
            relu_since_last = True
        else:
            return None
    return layers if layers and not relu_since_last else None


class PackedMLPStep:
    """`losses` (forward, keeping the activations) and `backward` (into the parameters'
    `.grad`) for the pack of MLPs whose Linear layers are `layers`."""

    def __init__(self, layers: list[PackedLinear]):
        self.layers = layers
        self._acts: list[torch.Tensor] = []  # each layer's input, (K, n, fan_in)
        self._logp = torch.empty(0)
        self._y = torch.empty(0, dtype=torch.long)
        # Gradient buffers reused every step (the optimizer sets .grad to None after it).
        self._buffers: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def losses(self, x: torch.Tensor, y: torch.Tensor, K: int) -> torch.Tensor:
        """(K,): each member's mean cross-entropy; x (K·n, ...) and y (K·n,) member-major."""
        h = x.reshape(K, -1, self.layers[0].weight.shape[1])
        self._acts = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            self._acts.append(h)
            w, b = layer.weight, layer.bias
            h = torch.baddbmm(b.unsqueeze(1), h, w) if b is not None else torch.bmm(h, w)
            if i < last:
                h.relu_()
        logits = h.reshape(-1, h.shape[-1])
        self._logp = torch.log_softmax(logits, 1)
        self._y = y
        ce = -self._logp.gather(1, y.unsqueeze(1)).squeeze(1)
        return ce.view(K, -1).mean(1)

    @torch.no_grad()
    def backward(self, micro_batches: int) -> None:
        """The gradient of Σ_k losses_k / micro_batches, added to each parameter's .grad
        (set when it is None) as autograd's AccumulateGrad does."""
        logp, y = self._logp, self._y
        K, n = self._acts[0].shape[:2]
        # What MeanBackward (and the division by the micro-batches) hands the NLL loss.
        one = torch.ones((), dtype=logp.dtype, device=logp.device)
        scale = (one / micro_batches if micro_batches > 1 else one) / n
        grad_nll = torch.zeros_like(logp)
        grad_nll.scatter_(1, y.unsqueeze(1), (-scale).expand(len(y), 1))
        g = torch.ops.aten._log_softmax_backward_data(grad_nll, logp, 1, logp.dtype)
        g = g.view(K, n, -1)
        for i in range(len(self.layers) - 1, -1, -1):
            layer, h = self.layers[i], self._acts[i]
            self._accumulate(
                layer.weight, lambda out, h=h, g=g: torch.bmm(h.transpose(1, 2), g, out=out)
            )
            if layer.bias is not None:
                self._accumulate(layer.bias, lambda out, g=g: torch.sum(g, 1, out=out))
            if i > 0:
                # ReLU's backward on its output, as autograd runs it (one pass, not a mask).
                g = torch.ops.aten.threshold_backward(
                    torch.bmm(g, layer.weight.transpose(1, 2)), h, 0
                )
        self._acts = []

    def _accumulate(self, p: torch.Tensor, compute) -> None:
        if p.grad is None:
            buf = self._buffers.get(id(p))
            if buf is None or buf.shape != p.shape:
                buf = self._buffers[id(p)] = torch.empty_like(p)
            compute(buf)
            p.grad = buf
        else:
            p.grad.add_(compute(torch.empty_like(p)))

    def forget(self) -> None:
        """Drop the buffers (the pack's parameters were replaced: members retired)."""
        self._buffers.clear()
