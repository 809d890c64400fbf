"""Learning-rate schedules and the optimizer.

A schedule is a function of training progress, so it rescales to any epoch or step budget:
the multiplier at optimizer step `t` of `total` depends only on t / total. Boundaries are
computed in integer arithmetic so that "the first half" and "every N/20" are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sgdnoise.config import Config


def smith2020(t: int, total: int) -> float:
    """ε for t < N/2, then ε / 2^k with k = 1 + floor((t − N/2) / (N/20)): ten halvings.

    (recalled from the paper; see PAPER.md) With integers: t < N/2 ⇔ 2t < N, and
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


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.SGD:
    """Heavy-ball momentum (v ← m v + g; θ ← θ − ε v) with ε = ε_eff (1 − m), L2 in g.

    torch's SGD with dampening 0 and no Nesterov is exactly heavy ball; plain SGD is m = 0.
    """
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.train.weight_decay,
        foreach=True,
    )
