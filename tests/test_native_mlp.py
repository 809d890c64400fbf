"""The C kernel's packed MLP step (sgdnoise.models.native_mlp) against the torch path.

The same math with sums in another order: per-step losses agree to float rounding, and
after steps with per-member learning rates, momentum or plain SGD, weight decay and members
retiring, every parameter agrees within PARAM_RTOL of its largest entry (the tolerance
tests/test_pack.py states for packed runs). Widths and batch sizes that are not multiples of
the kernel's vector and row blocks (its three backward paths: one pass per weight row for up
to 8 rows, blocks of weight rows above, plain loops for layers narrower than a vector), and
layers without bias, output layers of 8 to 15 classes (their own path, along the input's
width), are covered, and batches of more rows than the kernel's chunk (128),
which it sums chunk by chunk before one update. Without a compiler, or with SGDNOISE_NATIVE=0, packs take
the torch path and say so.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sgdnoise import native
from sgdnoise.config import from_dict
from sgdnoise.models import native_mlp
from sgdnoise.models.build import build_model
from sgdnoise.nets import StackedNet

SHAPE = (40,)
PARAM_RTOL = 1e-5
LOSS_RTOL = 1e-5


def pair(template: nn.Module, states: list[dict], momentum: float) -> tuple[StackedNet, ...]:
    def make(native: bool) -> StackedNet:
        return StackedNet(template, states, [None] * len(states), momentum, 5e-4,
                          "classification", 512, native=native)  # fmt: skip

    native, torch_path = make(True), make(False)
    assert native.kernel == "native" and torch_path.kernel == "torch"
    return native, torch_path


def mlp_pair(model: dict, K: int, momentum: float) -> tuple[StackedNet, ...]:
    cfg = from_dict({"model": model})
    torch.manual_seed(0)
    states = [build_model(cfg.model, SHAPE, 10).state_dict() for _ in range(K)]
    return pair(build_model(cfg.model, SHAPE, 10), states, momentum)


def train_both(a: StackedNet, b: StackedNet, n: int, steps: int, lr: float,
               retire_at: int | None = None, classes: int = 10) -> None:  # fmt: skip
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(600, *SHAPE, generator=g), torch.randint(0, classes, (600,), generator=g)
    for step in range(steps):
        lrs = [lr * (k + 1) for k in range(a.size)]
        idx = torch.randint(0, 600, (a.size * n,), generator=g)
        la = a.losses(X[idx], Y[idx], contextlib.nullcontext)
        lb = b.losses(X[idx], Y[idx], contextlib.nullcontext)
        a.backward(la, 1)
        b.backward(lb, 1)
        a.step(lrs)
        b.step(lrs)
        # The kernel's losses are filled in by the step (the loop reads them after it).
        assert torch.allclose(la, lb, rtol=LOSS_RTOL, atol=0), step
        if step == retire_at:
            a.select([0, 2, 3])
            b.select([0, 2, 3])


def assert_close(a: StackedNet, b: StackedNet) -> None:
    for pa, pb in zip(a.params, b.params, strict=True):
        err = ((pa - pb).abs().max() / pb.abs().max()).item()
        assert err <= PARAM_RTOL, f"{tuple(pa.shape)}: relative error {err:.2e}"


@pytest.mark.parametrize(
    "model, n",
    [
        ({}, 4),
        ({}, 16),
        ({}, 40),
        ({"depth": 1, "width": 20}, 3),
        ({"depth": 3, "width": 36}, 7),
        ({"depth": 2, "width": 44}, 13),
        ({"depth": 1, "width": 6}, 9),
        ({}, 300),
        ({"depth": 1, "width": 6}, 257),
        ({"depth": 2, "width": 100}, 70),
    ],
    ids=[
        "default-B4",
        "default-B16",
        "default-B40",
        "narrow-B3",
        "deep-B7",
        "blocked-B13",
        "thin-B9",
        "default-B300-chunks",
        "thin-B257-chunks",
        "padded-B70",  # the kernel's buffers in rows of 112 and 80 floats
    ],  # fmt: skip
)
@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["momentum", "sgd"])
def test_native_step_equals_the_torch_path(model: dict, n: int, momentum: float) -> None:
    a, b = mlp_pair(model, K=5, momentum=momentum)
    start = [p.detach().clone() for p in b.params]
    # Fewer steps for the chunked batches: with more rows, more ReLU inputs sit near 0, where
    # the two roundings may fall on different sides of the kink (at n = 300 one does after
    # 15 to 25 steps, chunked or not, and that layer's error jumps to 1e-4).
    steps, retire_at = (30, 11) if n <= 128 else (6, 2)
    train_both(a, b, n, steps=steps, lr=0.01, retire_at=retire_at)
    assert a.size == 3
    assert_close(a, b)
    moved = max(((p - s[[0, 2, 3]]).abs().max() / s.abs().max()).item()
                for p, s in zip(b.params, start, strict=True))  # fmt: skip
    assert moved > 100 * PARAM_RTOL  # the comparison is not trivially met
    if momentum:  # the momentum buffers are the optimizer's, in place: checkpoints see them
        for va, vb in zip(a.optimizer.momentum_buffers, b.optimizer.momentum_buffers,
                          strict=True):  # fmt: skip
            assert va is not None and vb is not None
            assert ((va - vb).abs().max() / vb.abs().max()).item() <= 1e-4


@pytest.mark.parametrize(
    "model, J, n",
    [({}, 4, 16), ({}, 16, 32), ({"depth": 1, "width": 6}, 3, 9), ({}, 2, 150)],
    ids=["default-4x16", "default-16x32", "thin-3x9", "default-2x150-chunks"],
)
@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["momentum", "sgd"])
def test_micro_batches_summed_in_the_kernel_equal_the_torch_path(
    model: dict, J: int, n: int, momentum: float
) -> None:
    """Gradient accumulation through the kernel (`accumulated_step`: each micro-batch's
    gradient, their mean, one update) against the torch path's micro-batches one by one, with
    the gradient-noise window reading both: the parameters, the losses and the window's sums
    (each micro-batch's squared gradient norm, that of their mean) agree. Then the same
    step with the whole batch at once through the kernel: a step of J micro-batches is the
    step of one batch of J·n rows."""
    from sgdnoise.theory.noise_scale import NoiseWindow

    a, b = mlp_pair(model, K=3, momentum=momentum)
    whole = mlp_pair(model, K=3, momentum=momentum)[0]
    wa, wb = NoiseWindow(3, J, n, J * n), NoiseWindow(3, J, n, J * n)
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(900, *SHAPE, generator=g), torch.randint(0, 10, (900,), generator=g)
    for step in range(6):
        lrs = [0.02 * (k + 1) for k in range(3)]
        idx = torch.randint(0, 900, (3, J * n), generator=g)  # member-major rows
        la, sq = a.accumulated_step(X[idx.reshape(-1)], Y[idx.reshape(-1)], J, lrs)
        wa.add_step(sq[:, 0], J, sq[:, 1])
        for j in range(J):
            mb = idx[:, j * n : (j + 1) * n].reshape(-1)
            lb = b.losses(X[mb], Y[mb], contextlib.nullcontext)
            b.backward(lb, J)
            wb.after_micro_batch(b.grads(), j)
        wb.after_step(b.grads())
        b.step(lrs)
        lw = whole.losses(X[idx.reshape(-1)], Y[idx.reshape(-1)], contextlib.nullcontext)
        whole.backward(lw, 1)
        whole.step(lrs)
        assert torch.allclose(la, lb, rtol=LOSS_RTOL, atol=0), step
        assert torch.allclose(wa.sums, wb.sums, rtol=1e-4, atol=0), step
    assert_close(a, b)
    assert_close(a, whole)
    assert wa.steps == wb.steps == 6 and wa.sums[:, 2].tolist() == [6.0 * J] * 3


def test_micro_batches_of_at_most_8_rows_are_not_summed_in_the_kernel() -> None:
    """The kernel sums micro-batches of at least native_mlp.MIN_MICRO rows (fewer fuse the
    update into the backward pass); a pack with smaller ones keeps the torch path."""
    from sgdnoise.pack import native_step

    a, _ = mlp_pair({}, K=2, momentum=0.9)
    with pytest.raises(ValueError, match="at least 9 rows"):
        a.accumulated_step(torch.randn(32, *SHAPE), torch.zeros(32, dtype=torch.int64), 4,
                           [0.1, 0.1])  # fmt: skip
    cfg = {"train": {"batch_size": 64}}
    assert native_step(from_dict(cfg), on_gpu=False)
    assert native_step(from_dict({"train": {"batch_size": 64, "micro_batch_size": 16}}), False)
    assert not native_step(from_dict({"train": {"batch_size": 64, "micro_batch_size": 8}}), False)
    assert not native_step(from_dict(cfg), on_gpu=True)


def test_layers_without_bias() -> None:
    torch.manual_seed(0)
    template = nn.Sequential(nn.Flatten(), nn.Linear(40, 24, bias=False), nn.ReLU(),
                             nn.Linear(24, 10))  # fmt: skip
    states = [nn.Sequential(nn.Flatten(), nn.Linear(40, 24, bias=False), nn.ReLU(),
                            nn.Linear(24, 10)).state_dict() for _ in range(4)]  # fmt: skip
    a, b = pair(template, states, 0.9)
    train_both(a, b, n=5, steps=20, lr=0.02)
    assert_close(a, b)


@pytest.mark.parametrize(
    "hidden, classes, bias, n",
    [(13, 9, True, 6), (20, 15, False, 11), (33, 8, True, 130)],
    ids=["9-classes-B6", "15-classes-nobias-B11", "8-classes-B130-chunks"],
)
def test_output_layers_of_8_to_15_classes_equal_the_torch_path(
    hidden: int, classes: int, bias: bool, n: int
) -> None:
    """The output layer's own backward pass (8 to 15 columns, along its input's width, here
    not a whole number of vectors): in the one-pass order (B <= 8), the blocked one and
    across chunks."""

    def net() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(40, hidden), nn.ReLU(),
                             nn.Linear(hidden, classes, bias=bias))  # fmt: skip

    torch.manual_seed(0)
    a, b = pair(net(), [net().state_dict() for _ in range(4)], 0.9)
    start = [p.detach().clone() for p in b.params]
    train_both(a, b, n=n, steps=12, lr=0.02, classes=classes)
    assert_close(a, b)
    assert max((p - s).abs().max().item() for p, s in zip(b.params, start, strict=True)) > 1e-3


@pytest.mark.parametrize("model, n", [({}, 1000), ({"depth": 1, "width": 6}, 70)],
                         ids=["default-1000", "thin-70"])  # fmt: skip
def test_native_evaluation_equals_the_torch_path(model: dict, n: int) -> None:
    """Every member's loss and accuracy on shared examples: row counts across the kernel's
    chunks of 64 and the torch path's eval batches (512 here), a member diverged to NaN."""
    a, b = mlp_pair(model, K=3, momentum=0.9)
    train_both(a, b, n=16, steps=5, lr=0.05)
    for net in (a, b):
        with torch.no_grad():
            net.params[-1][2].fill_(float("nan"))  # member 2's output bias: NaN logits
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)
    ra, rb = (net.evaluate(X, Y, contextlib.nullcontext) for net in (a, b))
    (la, aa), (lb, ab) = (tuple(zip(*r, strict=True)) for r in (ra, rb))
    assert la[:2] == pytest.approx(lb[:2], rel=1e-6) and aa == ab
    # All-NaN logits predict class 0 (torch's argmax: the first NaN), in both paths.
    assert math.isnan(la[2]) and math.isnan(lb[2]) and aa[2] == (Y == 0).double().mean().item()
    assert len({*la[:2]}) == 2 and 0.0 < min(aa[:2])  # two members, both predicting


def test_a_diverging_member_turns_non_finite_and_the_others_do_not() -> None:
    a, b = mlp_pair({"depth": 1, "width": 32}, K=2, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(64, *SHAPE, generator=g) * 10, torch.randint(0, 10, (64,), generator=g)
    losses = torch.zeros(2)
    for _ in range(40):
        losses = a.losses(X[:8], Y[:8], contextlib.nullcontext)
        a.backward(losses, 1)
        a.step([1e-3, 1e6])
        losses = losses.clone()
    assert torch.isfinite(losses[0]) and not torch.isfinite(losses[1])


def test_disabled_or_without_a_compiler_the_python_paths_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setenv("SGDNOISE_NATIVE", "0")
    assert native_mlp.library() is None and native.library("nqm") is None
    # No compiler, an empty cache: one line per kernel says why, and both Python paths run.
    script = (
        "import contextlib, torch\n"
        "from sgdnoise import native\n"
        "from sgdnoise.config import from_dict\n"
        "from sgdnoise.models.build import build_model\n"
        "from sgdnoise.nets import StackedNet\n"
        "from sgdnoise.theory.nqm import NQMConfig, run\n"
        "m = build_model(from_dict({}).model, (40,), 10)\n"
        "net = StackedNet(m, [m.state_dict()] * 2, [None] * 2, 0.9, 5e-4, 'classification',"
        " 64, native=True)\n"
        "print(net.kernel, net.kernel)\n"
        "print(run(NQMConfig(dim=100), batch_size=4, lr_eff=0.5, n_steps=50)['final_loss'])\n"
        "print(native.library('mlp_step') is None, native.library('nqm') is None)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "CC": str(tmp_path / "no-such-cc"),
           "SGDNOISE_CACHE": str(tmp_path / "cache")}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and all("could not be built" in line for line in lines), out.stderr
    kernel, final_loss, missing = out.stdout.splitlines()
    assert kernel == "torch torch" and float(final_loss) > 0 and missing == "True True"
    assert not (tmp_path / "cache").exists()  # nothing half-written
    # A build into an empty cache: one library per kernel, nothing else beside them.
    env["CC"] = "cc"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.splitlines()[0] == "native native" and not out.stderr
    built = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert built == ["mlp_step", "nqm"]


def test_the_narrow_output_layers_path_keeps_the_other_paths_bits(tmp_path: Path) -> None:
    """linear_bwd_narrow_out (output layers of 8 to 15 columns) sums in the order of the path
    it replaces, one-pass or blocked, chunked or not: the kernel without it (NARROW_MAX_O 8)
    gives the same bits on every shape of benchmarks/kernel_ab.py, O = 8, 9, 10 and 15 among
    them."""
    kernel_ab = _kernel_ab()
    source = (Path(__file__).parents[1] / kernel_ab.SOURCE).read_text()
    assert source.count("#define NARROW_MAX_O 16") == 1
    a = kernel_ab.build(source, tmp_path / "a.so")
    b = kernel_ab.build(source.replace("#define NARROW_MAX_O 16", "#define NARROW_MAX_O 8"),
                        tmp_path / "b.so")  # fmt: skip
    assert {dims[-1] for dims, _ in kernel_ab.SHAPES} >= {8, 9, 10, 15}
    assert kernel_ab.same_bits(a, b)


def _has_avx512() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and " avx512f" in cpuinfo.read_text()


@pytest.mark.skipif(not _has_avx512(), reason="no AVX-512 on this CPU: the kernel is built "
                    "without its vectors of 16")  # fmt: skip
def test_vectors_of_16_give_the_bits_of_vectors_of_8(tmp_path: Path) -> None:
    """With AVX-512 the products and the update run on vectors of 16 (strips of 32 columns,
    overlapping at a layer's or a batch's edge); each lane sums what a lane of 8 summed, in
    the same order. The one-pass backward (B <= 8) sums each row's input gradient in two
    halves (even and odd groups of 8 columns) that one vector of 16 holds, reduces four
    rows at once, and with AVX-512 takes 5 to 8 rows in one pass: the kernel built without
    them (-DNO_WIDE) gives the same bits on every shape of benchmarks/kernel_ab.py, layers
    of 17 and 24 columns, batches of 17 and 33 rows, and a hidden layer of 24 columns (a
    group of 16, then one of 8) whose input gradient is summed for 3 to 8 rows among them.
    So a study gives the same tables on CPUs with and without AVX-512."""
    kernel_ab = _kernel_ab()
    source = (Path(__file__).parents[1] / kernel_ab.SOURCE).read_text()
    wide = kernel_ab.build(source, tmp_path / "wide.so")
    narrow = kernel_ab.build(source, tmp_path / "narrow.so", extra=("-DNO_WIDE",))
    assert {17, 24} <= {w for dims, _ in kernel_ab.SHAPES for w in dims}
    assert {17, 33} <= {n for _, ns in kernel_ab.SHAPES for n in ns}
    # A layer with an input gradient (not the first) of 16 k + 8 columns, at 5 to 8 rows.
    assert any(
        any(w % 16 == 8 for w in dims[2:-1]) and any(4 < n <= 8 for n in ns)
        for dims, ns in kernel_ab.SHAPES
    )
    assert kernel_ab.same_bits(wide, narrow)


def _kernel_ab() -> Any:
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "kernel_ab.py"
    spec = importlib.util.spec_from_file_location("kernel_ab", path)
    assert spec and spec.loader
    kernel_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_ab)
    return kernel_ab


def test_the_kernel_comparison_tells_the_same_bits_from_other_bits(tmp_path: Path) -> None:
    """benchmarks/kernel_ab.py vouches that a change to the kernel keeps its arithmetic: the
    same source gives the same bits; chunks of 64 rows instead of 128 (another summation
    order from 65 rows on) do not."""
    kernel_ab = _kernel_ab()
    source = (Path(__file__).parents[1] / kernel_ab.SOURCE).read_text()
    assert source.count("#define CHUNK_ROWS 128") == 1
    a = kernel_ab.build(source, tmp_path / "a.so")
    b = kernel_ab.build(source, tmp_path / "b.so")
    c = kernel_ab.build(source.replace("#define CHUNK_ROWS 128", "#define CHUNK_ROWS 64"),
                        tmp_path / "c.so")  # fmt: skip
    assert kernel_ab.same_bits(a, b)
    assert not kernel_ab.same_bits(a, c)
    times = kernel_ab.timing([a, b], 4, 2, 2, seconds=0.01)
    assert len(times) == 2 and all(len(ts) == 2 and min(ts) > 0 for ts in times)
