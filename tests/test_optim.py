"""HeavyBall is torch.optim.SGD (heavy ball, L2 in the gradient) written out: same bits,
same checkpoint format."""

from __future__ import annotations

import copy

import pytest
import torch

from sgdnoise.optim import HeavyBall


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _steps(models, optimizers, lrs, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for lr in lrs:
        x = torch.randn(4, 7, generator=gen)
        for model, opt in zip(models, optimizers, strict=True):
            opt.param_groups[0]["lr"] = lr
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_heavy_ball_is_torch_sgd_bit_for_bit(momentum: float, weight_decay: float) -> None:
    ours, theirs = _model(), _model()
    opt = HeavyBall(ours.parameters(), 0.1, momentum, weight_decay)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=momentum,
                          weight_decay=weight_decay, foreach=True)  # fmt: skip
    _steps([ours, theirs], [opt, ref], [0.1, 0.05, 0.2, 0.2, 0.01], seed=1)
    assert _same(ours, theirs)
    assert not _same(ours, _model())  # it moved

    # Checkpoints cross over both ways and the runs stay identical.
    ours2, theirs2 = copy.deepcopy(theirs), copy.deepcopy(ours)
    opt2 = HeavyBall(ours2.parameters(), 0.0, momentum, weight_decay)
    opt2.load_state_dict(copy.deepcopy(ref.state_dict()))  # as through a checkpoint file
    ref2 = torch.optim.SGD(theirs2.parameters(), lr=0.0, momentum=momentum,
                           weight_decay=weight_decay, foreach=True)  # fmt: skip
    ref2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _steps([ours, theirs, ours2, theirs2], [opt, ref, opt2, ref2], [0.3, 0.1], seed=2)
    assert _same(ours, theirs) and _same(ours, ours2) and _same(ours, theirs2)
