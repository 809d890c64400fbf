"""The hand-written packed MLP step (sgdnoise.models.packed_mlp) against autograd's.

Same kernels in the same order, so the same bits: losses, gradients (accumulated over
micro-batches too) and parameters after steps with per-member learning rates, momentum,
weight decay and members retiring. Only plain MLPs in fp32 take it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from sgdnoise.config import from_dict
from sgdnoise.models.build import build_model
from sgdnoise.models.packed import pack_model
from sgdnoise.models.packed_mlp import mlp_layers
from sgdnoise.nets import StackedNet

SHAPE = (40,)


def nets(model: dict, K: int, fp32: bool = True) -> tuple[StackedNet, StackedNet]:
    cfg = from_dict({"model": model})
    torch.manual_seed(0)
    states = [build_model(cfg.model, SHAPE, 10).state_dict() for _ in range(K)]
    template = build_model(cfg.model, SHAPE, 10)

    def make() -> StackedNet:
        return StackedNet(template, states, [None] * K, 0.9, 5e-4, "classification", 512,
                          fp32=fp32)  # fmt: skip

    by_hand, autograd = make(), make()
    autograd.by_hand = None
    return by_hand, autograd


@pytest.mark.parametrize("model", [{}, {"depth": 1, "width": 32}, {"depth": 3, "width": 64}])
def test_same_bits_as_autograd(model: dict) -> None:
    a, b = nets(model, K=5)
    assert a.by_hand is not None
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(600, *SHAPE, generator=g), torch.randint(0, 10, (600,), generator=g)
    for step in range(24):
        micro = 3 if step % 4 == 0 else 1  # gradient accumulation over micro-batches
        lrs = [0.1 * (k + 1) for k in range(a.size)]
        for _ in range(micro):
            idx = torch.randint(0, 600, (a.size * 4,), generator=g)
            la = a.losses(X[idx], Y[idx], contextlib.nullcontext)
            a.backward(la, micro)
            lb = b.losses(X[idx], Y[idx], contextlib.nullcontext)
            b.backward(lb, micro)
            assert torch.equal(la, lb.detach())
        for pa, pb in zip(a.params, b.params, strict=True):
            assert torch.equal(pa.grad, pb.grad)
        a.step(lrs)
        b.step(lrs)
        if step == 11:  # members 1 and 4 retire; the rest go on
            a.select([0, 2, 3])
            b.select([0, 2, 3])
    assert a.size == 3
    for pa, pb in zip(a.params, b.params, strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.params[0], nets(model, K=5)[0].params[0][[0, 2, 3]])  # it trained


def test_only_plain_mlps_in_fp32() -> None:
    cfg = from_dict({})
    mlp = build_model(cfg.model, SHAPE, 10)
    assert len(mlp_layers(pack_model(mlp, [mlp.state_dict()] * 2)) or []) == 3
    for model in ({"norm": "batch"}, {"norm": "ghost"}, {"name": "cnn1d"}):
        m = build_model(from_dict({"model": model}).model, SHAPE, 10)
        assert mlp_layers(pack_model(m, [m.state_dict()] * 2)) is None, model
    assert nets({}, K=2, fp32=False)[0].by_hand is None  # bf16: autocast needs autograd
