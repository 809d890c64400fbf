"""Every model builds from a ModelConfig with each allowed norm, has the right output shape,
is deterministic under the torch seed, and uses the normalization it was asked for."""

import pytest
import torch
from torch import nn

from sgdnoise.config import ModelConfig
from sgdnoise.models import MODEL_DEFAULTS, MODEL_NORMS
from sgdnoise.models.build import MODELS, build_model
from sgdnoise.models.norm import GhostBatchNorm
from sgdnoise.models.wrn import WideBlock

GHOST = 2
NUM_CLASSES = 5
# Small but real inputs per model: (input shape, batch size, depth, width).
SMALL = {
    "mlp": ((1, 6, 6), 4, 2, 16),
    "cnn1d": ((40,), 4, 3, 8),
    "wrn": ((3, 32, 32), 4, 10, 1),
    "autoencoder": ((1, 12, 12), 4, None, None),
    "resnet50": ((3, 32, 32), 2, None, None),
}
CASES = [(name, norm) for name, norms in MODEL_NORMS.items() if name in SMALL for norm in norms]


def _cfg(name: str, norm: str) -> ModelConfig:
    _, _, depth, width = SMALL[name]
    return ModelConfig(name=name, norm=norm, ghost_batch_size=GHOST, depth=depth, width=width)


def _build(name: str, norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(_cfg(name, norm), SMALL[name][0], NUM_CLASSES)


def _norm_types(model: nn.Module) -> set[type]:
    return {
        type(m)
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, GhostBatchNorm))
    }


def test_every_model_is_covered():
    # "nqm" is the noisy quadratic model: an exact expectation (theory/nqm.py), no module.
    networks = set(MODEL_DEFAULTS) - {"nqm"}
    assert set(SMALL) == set(MODEL_NORMS) - {"nqm"} == set(MODELS) == networks


@pytest.mark.parametrize("name,norm", CASES)
def test_builds_with_right_output_shape_and_trains(name, norm):
    shape, batch, _, _ = SMALL[name]
    model = _build(name, norm).train()
    x = torch.randn(batch, *shape)
    y = model(x)
    expected = (batch, *shape) if name == "autoencoder" else (batch, NUM_CLASSES)
    assert y.shape == expected
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if norm != "skipinit":  # SkipInit's zero scalars cut the branches' gradients at init
        assert sum(g.abs().sum() for g in grads) > 0
    want = {"none": set(), "skipinit": set(), "ghost": {GhostBatchNorm}}
    expected_norms = want.get(
        norm, {nn.BatchNorm1d if name in ("mlp", "cnn1d", "autoencoder") else nn.BatchNorm2d}
    )
    assert _norm_types(model) == expected_norms


@pytest.mark.parametrize("name,norm", [c for c in CASES if c[0] != "resnet50"])
def test_deterministic_under_seed(name, norm):
    shape, batch, _, _ = SMALL[name]
    a, b, c = _build(name, norm, seed=3), _build(name, norm, seed=3), _build(name, norm, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    x = torch.randn(batch, *shape)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_resnet50_deterministic_and_ghost_keeps_init():
    batch_model = _build("resnet50", "batch", seed=1)
    ghost_model = _build("resnet50", "ghost", seed=1)
    sb, sg = batch_model.state_dict(), ghost_model.state_dict()
    # Same keys and the same values: ghost norm swaps the layers, not the initialisation.
    assert sb.keys() == sg.keys()
    assert all(torch.equal(sb[k], sg[k]) for k in sb)
    ghosts = [m for m in ghost_model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 53 and all(m.ghost_batch_size == GHOST for m in ghosts)


def test_wrn_skipinit_has_zero_scalars_and_no_norms():
    model = _build("wrn", "skipinit")
    blocks = [m for m in model.modules() if isinstance(m, WideBlock)]
    assert len(blocks) == 3  # depth 10 = 6 * 1 + 4: one block per group
    assert all(b.alpha is not None and b.alpha.weight.item() == 0.0 for b in blocks)
    assert _norm_types(model) == set()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    # At init every residual branch is off, so the branches' weights do not matter.
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    with torch.no_grad():
        for b in blocks:
            b.conv2.weight.add_(1.0)
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("norm", ["batch", "ghost"])
def test_wrn_normalized_has_no_scalars_and_bias_free_convs(norm):
    model = _build("wrn", norm)
    assert all(b.alpha is None for b in model.modules() if isinstance(b, WideBlock))
    assert all(c.bias is None for c in model.modules() if isinstance(c, nn.Conv2d))
    expected = GhostBatchNorm if norm == "ghost" else nn.BatchNorm2d
    # 2 per block (3 blocks) + the final one.
    assert sum(isinstance(m, expected) for m in model.modules()) == 7


def test_wrn_width_and_other_image_sizes():
    torch.manual_seed(0)
    cfg = ModelConfig(name="wrn", norm="batch", depth=16, width=2)
    model = build_model(cfg, (1, 8, 8), 3)
    assert model.fc.in_features == 64 * 2
    assert sum(isinstance(m, WideBlock) for m in model.modules()) == 6
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_resnet50_adapts_input_channels():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet50", norm="batch"), (1, 32, 32), 4)
    assert model.conv1.in_channels == 1
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 4)


def test_defaults_used_for_unresolved_config():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp"), (40,), 10)
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    assert [m.out_features for m in hidden] == [MODEL_DEFAULTS["mlp"]["width"]] * MODEL_DEFAULTS[
        "mlp"
    ]["depth"]


def test_autoencoder_layout():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="autoencoder", norm="none"), (1, 28, 28), 10)
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    dims = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert sizes == list(zip(dims[:-1], dims[1:], strict=True))
    # No ReLU right after the code layer and none at the output.
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 6


def test_ghost_model_rejects_bad_batch_and_unknown_norm():
    model = _build("mlp", "ghost").train()
    with pytest.raises(ValueError, match="multiple of"):
        model(torch.randn(3, 1, 6, 6))
    with pytest.raises(ValueError, match="no 'skipinit' norm"):
        build_model(_cfg("mlp", "skipinit"), (40,), 3)


def test_no_dropout_anywhere():
    for name, norm in CASES:
        if name != "resnet50":
            assert not any(isinstance(m, nn.Dropout) for m in _build(name, norm).modules())
