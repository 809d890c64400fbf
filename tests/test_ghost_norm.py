"""GhostBatchNorm equals plain batch norm applied to each ghost batch, and its running
statistics do not depend on how a batch is split into calls (gradient accumulation)."""

import copy

import pytest
import torch
from torch import nn

from sgdnoise.models.norm import GhostBatchNorm, make_norm

G = 4
C = 3
# (input shape without the batch dim, the plain batch norm that matches it)
CASES = [((C,), nn.BatchNorm1d), ((C, 5), nn.BatchNorm1d), ((C, 3, 2), nn.BatchNorm2d)]


def _pair(bn_cls: type[nn.Module]) -> tuple[GhostBatchNorm, nn.Module]:
    """A ghost norm and a plain norm with the same (non-trivial) affine parameters."""
    ghost = GhostBatchNorm(C, G).double()
    plain = bn_cls(C).double()
    with torch.no_grad():
        ghost.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        ghost.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
        plain.load_state_dict(ghost.state_dict())
    return ghost, plain


def _batch(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # A different offset and scale per ghost batch, so per-group statistics really differ.
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    group = (torch.arange(n) // G).to(torch.float64).view(n, *([1] * len(shape)))
    return x * (1 + group) + 2 * group


@pytest.mark.parametrize("shape,bn_cls", CASES)
def test_matches_plain_bn_per_ghost_batch(shape, bn_cls):
    ghost, plain = _pair(bn_cls)
    x = _batch(3 * G, shape).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(3 * G, *shape, dtype=torch.float64)

    y = ghost(x)
    (y * upstream).sum().backward()
    y_ref = torch.cat([plain(chunk) for chunk in x_ref.split(G)])
    (y_ref * upstream).sum().backward()

    assert y.shape == x.shape
    assert torch.allclose(y, y_ref)
    assert torch.allclose(x.grad, x_ref.grad)
    assert torch.allclose(ghost.weight.grad, plain.weight.grad)
    assert torch.allclose(ghost.bias.grad, plain.bias.grad)
    # Running stats after sequential plain-BN updates on each ghost batch, in order.
    assert torch.allclose(ghost.running_mean, plain.running_mean)
    assert torch.allclose(ghost.running_var, plain.running_var)
    assert ghost.num_batches_tracked.item() == plain.num_batches_tracked.item() == 3
    # And those statistics are not trivially the initial ones.
    assert not torch.allclose(ghost.running_mean, torch.zeros(C, dtype=torch.float64))


def test_normalizes_each_group_not_the_whole_batch():
    ghost = GhostBatchNorm(C, G).double()
    y = ghost(_batch(2 * G, (C, 5)))
    for chunk in y.split(G):
        assert torch.allclose(chunk.mean(dim=(0, 2)), torch.zeros(C, dtype=torch.float64))
        assert torch.allclose(
            chunk.var(dim=(0, 2), unbiased=False), torch.ones(C, dtype=torch.float64), atol=1e-4
        )


@pytest.mark.parametrize("shape,bn_cls", CASES)
def test_running_stats_independent_of_micro_batching(shape, bn_cls):
    whole, _ = _pair(bn_cls)
    split = copy.deepcopy(whole)
    for step in range(2):  # two steps, so the old running values enter the update too
        x = _batch(4 * G, shape, seed=step)
        whole(x)
        for part in x.split(2 * G):
            split(part)
    assert torch.allclose(whole.running_mean, split.running_mean)
    assert torch.allclose(whole.running_var, split.running_var)
    assert whole.num_batches_tracked.item() == split.num_batches_tracked.item() == 8


@pytest.mark.parametrize("shape,bn_cls", CASES)
def test_eval_uses_running_stats(shape, bn_cls):
    ghost, plain = _pair(bn_cls)
    x = _batch(2 * G, shape)
    ghost(x)
    for chunk in x.split(G):
        plain(chunk)
    ghost.eval()
    plain.eval()
    before = ghost.running_mean.clone()
    probe = _batch(3, shape, seed=1)  # not a multiple of G: eval has no ghost batches
    assert torch.allclose(ghost(probe), plain(probe))
    assert torch.equal(ghost.running_mean, before)
    assert ghost.num_batches_tracked.item() == 2


def test_batch_smaller_than_ghost_size_is_one_group():
    ghost, plain = _pair(nn.BatchNorm2d)
    x = _batch(G - 1, (C, 2, 2))
    assert torch.allclose(ghost(x), plain(x))
    assert torch.allclose(ghost.running_var, plain.running_var)
    assert ghost.num_batches_tracked.item() == 1


def test_batch_not_a_multiple_of_ghost_size_raises():
    ghost = GhostBatchNorm(C, G)
    with pytest.raises(ValueError, match="multiple of"):
        ghost(torch.randn(3 * G // 2, C))


def test_float32_close_to_plain_bn():
    ghost, plain = GhostBatchNorm(C, G), nn.BatchNorm2d(C)
    x = torch.randn(2 * G, C, 4, 4)
    y_ref = torch.cat([plain(chunk) for chunk in x.split(G)])
    assert torch.allclose(ghost(x), y_ref, atol=1e-5)
    assert torch.allclose(ghost.running_var, plain.running_var, atol=1e-6)


def test_make_norm():
    assert isinstance(make_norm("none", 8, 1, G), nn.Identity)
    assert isinstance(make_norm("batch", 8, 1, G), nn.BatchNorm1d)
    assert isinstance(make_norm("batch", 8, 2, G), nn.BatchNorm2d)
    ghost = make_norm("ghost", 8, 2, G)
    assert isinstance(ghost, GhostBatchNorm) and ghost.ghost_batch_size == G
    assert (ghost.momentum, ghost.eps) == (0.1, 1e-5)
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("layer", 8, 1, G)
