"""Normalization layers: ghost batch norm (Hoffer et al. 2017) and `make_norm`.

Running-statistics contract of `GhostBatchNorm`. A training call on a batch of N = k·G
examples (k ghost batches of G, taken consecutively along the batch dimension) leaves
`running_mean`, `running_var` and `num_batches_tracked` exactly as a plain torch batch norm
with the same momentum μ and eps would after k calls, one per ghost batch, in order:
`running_var` tracks the unbiased variance of each ghost batch, and

    r_new = (1 - μ)^k · r_old + Σ_j μ (1 - μ)^(k-1-j) · stat_j      (j = 0 .. k-1)

is evaluated in closed form (one vectorized update, no Python loop), and
`num_batches_tracked` grows by k. Mathematically, then, the running statistics depend only
on the sequence of ghost batches, not on how a global batch is cut into micro-batches
(gradient accumulation) or how often `forward` is called; numerically they agree up to
float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GhostBatchNorm(nn.Module):
    """Batch norm whose training statistics come from each ghost batch of `ghost_batch_size`.

    Accepts (N, C), (N, C, L) or (N, C, H, W) input. In training mode the batch is split into
    consecutive groups of G = `ghost_batch_size` (a batch smaller than G is one group; a
    larger batch must be a multiple of G), each normalized by its own mean and biased
    variance, then the affine weight and bias are applied. Evaluation uses the running
    statistics (see the module docstring for how they are updated). State-dict keys match
    `nn.BatchNorm*d`, so the two are interchangeable in checkpoints.
    """

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_features = num_features
        self.ghost_batch_size = ghost_batch_size
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, ghost_batch_size={self.ghost_batch_size}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}"
        )

    def num_groups(self, batch: int) -> int:
        """How many ghost batches a training batch of `batch` examples is split into."""
        return ghost_groups(batch, self.ghost_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"GhostBatchNorm: expected input (N, {self.num_features}, ...), got {tuple(x.shape)}"
            )
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        n, c, *spatial = x.shape
        k = self.num_groups(n)
        g = n // k
        # Fold the ghost-batch index into the channel axis, (N, C, *S) -> (G, k*C, *S), so one
        # native batch-norm call normalizes every (ghost batch, channel) pair on its own; this
        # is one fused kernel on any device and saves only the statistics for backward.
        xg = x.reshape(k, g, c, *spatial).transpose(0, 1).reshape(g, k * c, *spatial)
        weight = self.weight.repeat(k) if self.weight is not None else None
        bias = self.bias.repeat(k) if self.bias is not None else None
        # With momentum 1 the scratch buffers receive exactly each group's mean and unbiased
        # variance, as the native kernel computes them, at no extra pass over the data.
        stat_dtype = self.running_mean.dtype
        means = torch.zeros(k * c, dtype=stat_dtype, device=x.device)
        variances = torch.ones(k * c, dtype=stat_dtype, device=x.device)
        yg = F.batch_norm(xg, means, variances, weight, bias, True, 1.0, self.eps)
        y = yg.reshape(g, k, c, *spatial).transpose(0, 1).reshape(n, c, *spatial)
        self._update_running_stats(means.view(k, c), variances.view(k, c))
        return y

    @torch.no_grad()
    def _update_running_stats(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        """k sequential EMA updates, one per ghost batch, in closed form."""
        k = means.shape[0]
        mu = self.momentum
        # Group j is followed by k-1-j later updates, each decaying it by (1 - mu).
        powers = torch.arange(k - 1, -1, -1, dtype=means.dtype, device=means.device)
        weights = mu * (1.0 - mu) ** powers
        decay = (1.0 - mu) ** k
        self.running_mean.mul_(decay).add_(weights @ means)
        self.running_var.mul_(decay).add_(weights @ variances)
        self.num_batches_tracked.add_(k)


def ghost_groups(batch: int, ghost_batch_size: int) -> int:
    """How many ghost batches of `ghost_batch_size` a batch of `batch` examples makes: one
    when it is no larger; else it must be a multiple."""
    g = ghost_batch_size
    if batch <= g:
        return 1
    if batch % g:
        raise ValueError(
            f"GhostBatchNorm: batch of {batch} is larger than ghost_batch_size={g} but not "
            f"a multiple of it; use a (micro-)batch size that is a multiple of {g} or <= {g}"
        )
    return batch // g


def make_norm(kind: str, num_features: int, dims: int, ghost_batch_size: int) -> nn.Module:
    """The normalization layer for `kind` (none | batch | ghost) after a layer of
    `num_features` channels; `dims` is 1 for (N, C) / (N, C, L) input and 2 for images."""
    if dims not in (1, 2):
        raise ValueError(f"make_norm: dims must be 1 or 2, got {dims}")
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(num_features) if dims == 1 else nn.BatchNorm2d(num_features)
    if kind == "ghost":
        return GhostBatchNorm(num_features, ghost_batch_size)
    raise ValueError(f"make_norm: unknown norm {kind!r}; allowed: none | batch | ghost")
