"""Learning-rate schedules and the optimizer.

A schedule is a function of training progress, so it rescales to any epoch or step budget:
the multiplier at optimizer step `t` of `total` depends only on t / total. Boundaries are
computed in integer arithmetic so that "the first half" and "every N/20" are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from sgdnoise.config import Config


def smith2020(t: int, total: int) -> float:
    """ε for t < N/2, then ε / 2^k with k = 1 + floor((t − N/2) / (N/20)): ten halvings.

    (recalled from the paper; see docs/protocol.md) With integers: t < N/2 ⇔ 2t < N, and
    floor((t − N/2) / (N/20)) = floor((20t − 10N) / N).
    """
    if 2 * t < total:
        return 1.0
    return 0.5 ** (1 + (20 * t - 10 * total) // total)


def constant(t: int, total: int) -> float:
    return 1.0


def cosine(t: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t / total))


def step(t: int, total: int) -> float:
    """×0.1 at half and again at three quarters of the budget."""
    if 2 * t < total:
        return 1.0
    return 0.1 if 4 * t < 3 * total else 0.01


SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "smith2020": smith2020,
    "constant": constant,
    "cosine": cosine,
    "step": step,
}


def lr_table(name: str, base_lr: float, total: int, warmup: float = 0.0) -> list[float]:
    """The step size at each optimizer step 0..total-1 (precomputed: no work in the loop)."""
    fn = SCHEDULES[name]
    warm = warmup * total
    return [
        base_lr * fn(t, total) * (min(1.0, (t + 1) / warm) if warm > 0 else 1.0)
        for t in range(total)
    ]


class HeavyBall:
    """Heavy-ball momentum, v ← m v + g; θ ← θ − ε v, with L2 added to g; plain SGD is m = 0.

    This is torch.optim.SGD(momentum=m, dampening=0, nesterov=False, weight_decay=wd,
    foreach=True) written out: the same foreach operations in the same order (so the same
    bits), and a state_dict in SGD's format (so checkpoints stay interchangeable). Written
    out because constructing any torch.optim optimizer imports torch._dynamo, about 0.9 s of
    every run's start-up, and its step() adds bookkeeping a small model's step notices.
    The learning rate is `param_groups[0]["lr"]`, set by the loop at every step.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float,
                 weight_decay: float):  # fmt: skip
        self.params = list(params)
        self.param_groups = [{
            "lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": weight_decay,
            "nesterov": False, "maximize": False, "foreach": True, "differentiable": False,
            "fused": None, "params": list(range(len(self.params))),
        }]  # fmt: skip
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def directions(self, slots: list[int]) -> list[torch.Tensor]:
        """g (+ wd θ), through the momentum buffers when m > 0: what θ moves along, for the
        parameters at `slots` (those with a gradient); their buffers are updated in place."""
        group = self.param_groups[0]
        params = [self.params[i] for i in slots]
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            # In place: the gradients are spent after this step (set to None), and a new
            # parameter-sized tensor per step costs page faults on large models.
            torch._foreach_add_(grads, params, alpha=group["weight_decay"])
        m = group["momentum"]
        if not m:
            return grads
        bufs = [self.momentum_buffers[i] for i in slots]
        if all(b is not None for b in bufs):
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, grads, alpha=1)
            return bufs  # type: ignore[return-value]
        out = []
        for i, g, b in zip(slots, grads, bufs, strict=True):
            if b is None:
                b = self.momentum_buffers[i] = torch.clone(g).detach()
            else:
                b.mul_(m).add_(g, alpha=1)
            out.append(b)
        return out

    @torch.no_grad()
    def step(self) -> None:
        slots = [i for i, p in enumerate(self.params) if p.grad is not None]
        if slots:
            params = [self.params[i] for i in slots]
            torch._foreach_add_(params, self.directions(slots), alpha=-self.param_groups[0]["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            i: {"momentum_buffer": b} for i, b in enumerate(self.momentum_buffers) if b is not None
        }
        return {"state": state, "param_groups": [dict(self.param_groups[0])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.param_groups[0]["lr"] = state["param_groups"][0]["lr"]
        for i, p in enumerate(self.params):
            b = state["state"].get(i, {}).get("momentum_buffer")
            # A copy: the loaded tensors may belong to someone else (a live optimizer).
            self.momentum_buffers[i] = (
                b.to(device=p.device, dtype=p.dtype).clone() if b is not None else None
            )


class StackedSGD(HeavyBall):
    """HeavyBall on stacked parameters with a learning rate per member.

    The update is torch's fused SGD kernel (one pass over θ, g and v per step instead of
    four elementwise passes: a small model's packed step is memory-bound on these), called
    once per distinct learning rate on the members' slices. The same math as an unpacked
    run; the fused kernel rounds in another order, so not the same last bits."""

    def __init__(self, params: list[torch.Tensor], momentum: float, weight_decay: float):
        super().__init__(params, 0.0, momentum, weight_decay)
        self._views: tuple[tuple[int, ...], list[list[torch.Tensor]], list[list[torch.Tensor]]]
        self._views = ((), [], [])

    def _member_views(self) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Per member: its slices of the parameters and of the momentum buffers (cached
        while the stacked tensors stay the same objects)."""
        bufs = [b for b in self.momentum_buffers if b is not None]
        key = tuple(id(t) for t in (*self.params, *bufs))
        if self._views[0] != key:
            per_param = [p.unbind(0) for p in self.params]
            per_buf = [b.unbind(0) for b in bufs]
            K = self.params[0].shape[0]
            self._views = (
                key,
                [[v[k] for v in per_param] for k in range(K)],
                [[v[k] for v in per_buf] for k in range(K)],
            )
        return self._views[1], self._views[2]

    def ensure_buffers(self) -> None:
        """Zero momentum buffers before the first step (m > 0): the first update m·0 + g
        equals the unpacked run's clone of g."""
        if self.param_groups[0]["momentum"] and any(b is None for b in self.momentum_buffers):
            self.momentum_buffers = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        m = group["momentum"]
        self.ensure_buffers()
        params, bufs = self._member_views()
        grads = [p.grad.unbind(0) for p in self.params]
        by_lr: dict[float, list[int]] = {}
        for k, lr in enumerate(lrs):
            by_lr.setdefault(float(lr), []).append(k)
        for lr, ks in by_lr.items():
            torch._fused_sgd_(
                [t for k in ks for t in params[k]],
                [g[k] for k in ks for g in grads],
                [t for k in ks for t in bufs[k]] if m else [],
                weight_decay=group["weight_decay"], momentum=m, lr=lr, dampening=0.0,
                nesterov=False, maximize=False, is_first_step=False,
            )  # fmt: skip

    def select(self, keep: list[int], params: list[torch.Tensor]) -> None:
        """Keep the members at `keep`; `params` are the model's stacked parameters now."""
        index = torch.tensor(keep, device=params[0].device)
        self.params = list(params)
        self.momentum_buffers = [
            b.index_select(0, index) if b is not None else None for b in self.momentum_buffers
        ]


def make_optimizer(model: torch.nn.Module, cfg: Config) -> HeavyBall:
    """Heavy ball with ε = ε_eff (1 − m), L2 in the gradient (see HeavyBall)."""
    return HeavyBall(model.parameters(), cfg.lr, cfg.momentum, cfg.train.weight_decay)
