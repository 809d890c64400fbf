"""Packed training (sgdnoise.pack): K runs as one packed model give each run's own result.

Stated tolerance. A packed member computes the same math as its unpacked run, but batched
matrix products sum in another order, so its parameters differ by float rounding that
training amplifies. After these short runs (40 steps), every floating tensor of the state
agrees within PARAM_RTOL of its largest entry (measured: a few 1e-7), losses within
LOSS_RTOL, accuracies within one example, and step counts and statuses exactly. A member
given another member's learning rate or data order misses these bounds by orders of
magnitude.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from sgdnoise.config import Config, from_dict, with_values
from sgdnoise.models import native_mlp
from sgdnoise.pack import (
    MAX_PACK,
    NATIVE_MAX_PACK,
    NATIVE_PACK_WORK,
    StackedModel,
    default_pack_size,
    forward_flops,
    pack_key,
    train_pack,
    training_flops,
)
from sgdnoise.train import Preempted, RunResult, train

from helpers import SMALL, tracking_uri

PARAM_RTOL = 1e-5
LOSS_RTOL = 1e-4
STEPS = 40
MEMBERS = [(0.05, 0), (0.1, 0), (0.2, 1), (0.4, 1)]  # (lr_eff, seed): both kinds of member


def configs(members=MEMBERS, **values: Any) -> list[Config]:
    base = {"train.budget.value": STEPS, "train.eval_points": 4, **values}
    return [
        from_dict(with_values(SMALL, {**base, "train.lr_eff": lr, "train.seed": seed}))
        for lr, seed in members
    ]


def assert_same_run(packed: RunResult, single: RunResult, n_test: int) -> None:
    assert packed.status == single.status and packed.run_key == single.run_key
    assert packed.state is not None and single.state is not None
    assert packed.state.keys() == single.state.keys()
    for k, ref in single.state.items():
        got = packed.state[k]
        assert got.shape == ref.shape and got.dtype == ref.dtype, k
        if ref.is_floating_point():
            scale = ref.abs().max().clamp_min(1e-12)
            err = ((got - ref).abs().max() / scale).item()
            assert err <= PARAM_RTOL, f"{k}: relative error {err:.2e}"
        else:
            assert torch.equal(got, ref), k  # e.g. num_batches_tracked
    assert [h["step"] for h in packed.history] == [h["step"] for h in single.history]
    m, r = packed.metrics, single.metrics
    assert m.keys() == r.keys()
    for k in ("steps", "epochs", "diverged"):
        assert m[k] == r[k], k
    for k in ("final_train_loss", "final_test_loss", "grad_noise_scale"):
        if k in r:
            assert m[k] == pytest.approx(r[k], rel=LOSS_RTOL if "loss" in k else 1e-3), k
    for k in ("final_test_accuracy", "final_train_accuracy"):
        assert abs(m[k] - r[k]) <= 1.0 / n_test + 1e-9, k


@pytest.mark.parametrize(
    "values",
    [
        {"train.optimizer": "sgd"},
        {"train.optimizer": "momentum"},
        # Ghost norm with accumulation (16 of 32 per micro-batch, ghost batches of 8): also
        # covers the per-member gradient noise scale.
        {
            "train.optimizer": "sgd",
            "model.norm": "ghost",
            "model.ghost_batch_size": 8,
            "train.micro_batch_size": 16,
        },
        {
            "train.optimizer": "momentum",
            "model.norm": "ghost",
            "model.ghost_batch_size": 8,
            "train.micro_batch_size": 16,
        },
        # Convolutions (K-group conv) and batch norm over (N, C, L).
        {
            "train.optimizer": "momentum",
            "model.name": "cnn1d",
            "model.width": 8,
            "model.norm": "batch",
        },
    ],  # fmt: skip
    ids=["sgd", "momentum", "sgd-ghost", "momentum-ghost", "momentum-cnn1d-batchnorm"],
)
def test_packed_members_equal_their_unpacked_runs(tmp_path: Path, values) -> None:
    cfgs = configs(**values)
    packed = train_pack(cfgs, root=tmp_path, track=False, keep_state=True)
    single = [train(c, root=tmp_path, track=False, keep_state=True) for c in cfgs]
    n_test = 120  # 600 MNIST-1D examples, 80/20
    for p, s in zip(packed, single, strict=True):
        assert_same_run(p, s, n_test)
    if "train.micro_batch_size" in values:
        assert all("grad_noise_scale" in p.metrics for p in packed)
    # The members really differ (a pack that trained one model K times would not).
    assert len({p.state_sha256 for p in packed}) == len(packed)


def test_a_diverging_member_is_recorded_at_once_and_the_others_go_on(
    tmp_path: Path, mlflow_template: Path
) -> None:
    import shutil

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    members = [(0.05, 0), (2.0**10, 0), (0.1, 1), (0.2, 0)]
    cfgs = configs(members, **{"train.budget.value": 200})
    order: list[int] = []
    packed = train_pack(cfgs, root=tmp_path, keep_state=True, on_done=lambda i, r: order.append(i))
    assert order[0] == 1 and sorted(order) == [0, 1, 2, 3]  # reported before the others
    single = [train(c, root=tmp_path, track=False, keep_state=True) for c in cfgs]
    assert single[1].status == "diverged" and packed[1].status == "diverged"
    assert packed[1].metrics["steps"] == single[1].metrics["steps"] < 200
    for i in (0, 2, 3):
        assert packed[i].status == "finished"
        assert_same_run(packed[i], single[i], 120)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(tmp_path))
    for r, cfg in zip(packed, cfgs, strict=True):
        run = client.get_run(r.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["sgdnoise.status"] == r.status
        assert run.data.tags["sgdnoise.run_key"] == cfg.run_key
        assert run.data.params["derived.pack"] == "4"
        # B = 32 plain MLP on the CPU: the C kernel, when this machine can build it.
        expected = "native" if native_mlp.library() else "torch"
        assert run.data.params["derived.step_kernel"] == expected
        assert float(run.data.params["train.lr_eff"]) == cfg.train.lr_eff
    assert client.get_run(packed[1].run_id).data.metrics["diverged"] == 1.0


def test_a_preempted_pack_resumes_from_its_checkpoints_into_the_same_runs(
    tmp_path: Path, mlflow_template: Path
) -> None:
    """SIGTERM mid-pack: every member checkpoints and stops; a rerun of the unfinished
    members resumes them (same MLflow runs) and ends bit-identical to an uninterrupted pack."""
    import shutil

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    members = [(0.05, 0), (2.0**10, 0), (0.1, 1), (0.2, 0)]
    values = {
        "train.budget.value": 200,
        "train.checkpoint_every.unit": "steps",
        "train.checkpoint_every.value": 50,
    }
    cfgs = configs(members, **values)
    reference = train_pack(cfgs, root=tmp_path / "ref", track=False, keep_state=True)

    def preempt(i: int, result: RunResult) -> None:
        if result.status == "diverged":  # mid-run, with the SIGTERM handler installed
            os.kill(os.getpid(), signal.SIGTERM)

    first: dict[int, RunResult] = {}
    with pytest.raises(Preempted):
        train_pack(cfgs, root=tmp_path, on_done=lambda i, r: (first.update({i: r}), preempt(i, r)))
    assert list(first) == [1]
    assert len(list(tmp_path.glob("checkpoints/*/step-*.pt"))) == 3  # the three unfinished
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(tmp_path))
    killed = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], "attributes.status = 'KILLED'"
    )
    assert len(killed) == 3

    rest = [cfgs[i] for i in (0, 2, 3)]
    resumed = train_pack(rest, root=tmp_path, keep_state=True)
    assert {r.run_id for r in resumed} == {r.info.run_id for r in killed}  # same runs
    for r, ref in zip(resumed, [reference[i] for i in (0, 2, 3)], strict=True):
        assert r.status == "finished" and r.state_sha256 == ref.state_sha256
        assert [h["step"] for h in r.history] == [h["step"] for h in ref.history]
        assert client.get_run(r.run_id).info.status == "FINISHED"
    assert not list(tmp_path.glob("checkpoints/*/step-*.pt"))


@pytest.mark.skipif(
    native_mlp.library() is None,
    reason="needs a C compiler (tested without one in test_native_mlp)",
)
def test_multi_step_calls_equal_one_call_per_step(tmp_path: Path, monkeypatch) -> None:
    """Through the C kernel a pack takes the steps between two things the loop must do (a
    divergence check every CHECK_EVERY steps, an evaluation, a checkpoint by steps) in one
    call; the runs are bit-identical to one call per step: states, curves, the step a
    member diverged at, and the checkpoints written. Evaluations (every 15 steps) and
    checkpoints (every 23) fall between the checks; seeds 0 and 1 share two data orders."""
    from sgdnoise import loop
    from sgdnoise.data.order import BatchOrder
    from sgdnoise.nets import StackedNet

    members = [(0.05, 0), (2.0**10, 0), (0.1, 1), (0.2, 0)]
    values = {
        "train.budget.value": 90, "train.eval_points": 6, "train.batch_size": 8,
        "train.checkpoint_every.unit": "steps", "train.checkpoint_every.value": 23,
    }  # fmt: skip
    cfgs = configs(members, **values)
    calls: list[int] = []
    steps = StackedNet.steps

    def counted(self, x, y, streams, stream_of, lrs):
        calls.append(len(lrs))
        return steps(self, x, y, streams, stream_of, lrs)

    monkeypatch.setattr(StackedNet, "steps", counted)
    saved: dict[str, list[int]] = {}
    save = loop.Checkpointer.save

    def recorded(self, step, state):
        saved.setdefault(str(self.dir.name), []).append(step)
        return save(self, step, state)

    monkeypatch.setattr(loop.Checkpointer, "save", recorded)
    multi = train_pack(cfgs, root=tmp_path / "multi", track=False, keep_state=True)
    multi_saved, saved = saved, {}
    assert max(calls) > 8 and sum(calls) > 60  # most of the 90 steps, in few calls
    monkeypatch.setattr(loop.Loop, "multi_step", property(lambda self: False))
    calls.clear()
    single = train_pack(cfgs, root=tmp_path / "single", track=False, keep_state=True)
    assert not calls
    assert multi[1].status == single[1].status == "diverged"
    for a, b in zip(multi, single, strict=True):
        assert a.state_sha256 == b.state_sha256
        assert repr(a.history) == repr(b.history)  # repr: NaN losses compare equal
        timing = "examples_per_second"
        assert repr({k: v for k, v in a.metrics.items() if k != timing}) == repr(
            {k: v for k, v in b.metrics.items() if k != timing}
        )
    assert multi_saved == saved and all(v == [23, 46, 69] for v in saved.values())
    # A stream of steps is their global batches one after the other, across epochs.
    order = BatchOrder(50, 7, seed=3)
    assert torch.equal(
        order.batches(5, 12), torch.cat([order.global_batch(s) for s in range(5, 12)])
    )


def test_member_state_has_the_unpacked_keys_and_layout() -> None:
    from sgdnoise.models.mlp import mlp

    models = [mlp((40,), 10, 2, 8, "ghost", 4) for _ in range(3)]
    stacked = StackedModel(models[0], [m.state_dict() for m in models])
    for k, m in enumerate(models):
        state = stacked.member_state(k)
        ref = m.state_dict()
        assert list(state) == list(ref)
        assert all(torch.equal(state[n], ref[n]) and state[n].is_contiguous() for n in ref)
    x = torch.randn(5, 40)
    stacked.train(False)
    out = stacked.shared(x)
    for k, m in enumerate(models):
        m.eval()
        assert torch.allclose(out[k], m(x), rtol=1e-6, atol=1e-6)
    stacked.select([2, 0])
    assert torch.equal(stacked.member_state(0)["1.weight"], models[2].state_dict()["1.weight"])


def test_pack_keys_and_default_sizes() -> None:
    a, b = configs([(0.1, 0), (0.2, 3)])
    assert pack_key(a) == pack_key(b)
    (c,) = configs([(0.1, 0)], **{"train.batch_size": 64})
    assert pack_key(c) != pack_key(a)
    with pytest.raises(ValueError, match="differ only in"):
        train_pack([a, c], root=Path("/nonexistent"), track=False)

    def size(B: int, width: int | None) -> int:
        (cfg,) = configs([(0.1, 0)], **{"train.device": "cpu", "train.batch_size": B,
                                        "model.width": width})  # fmt: skip
        return default_pack_size(cfg, forward_flops(cfg, (40,), 10))

    # Small models and batches pack many runs; an arithmetic-bound step packs none. Plain
    # MLPs that step through the C kernel (on the CPU) pack fewer: their weights stay in the
    # caches.
    native = native_mlp.library() is not None
    assert size(16, 32) == size(16, 256) == (NATIVE_MAX_PACK if native else MAX_PACK["cpu"])
    assert size(16, 32) < MAX_PACK["cpu"] or not native
    (ghost,) = configs([(0.1, 0)], **{"train.device": "cpu", "train.batch_size": 16,
                                      "model.norm": "ghost", "model.width": 32})  # fmt: skip
    assert default_pack_size(ghost, forward_flops(ghost, (40,), 10)) == MAX_PACK["cpu"]
    # The pack's own step stays cheap (the kernel's bound is on the pack's FLOPs per step,
    # torch's on each member's too).
    big = 8192 if native else 4096
    assert 1 < size(big, 32) < size(16, 32)
    # The default MLP, as measured: through torch, packing stops where a member's step is
    # arithmetic-bound; through the C kernel, members step one after the other, so packs
    # only keep the loop's Python between calls small.
    if native:
        assert [size(B, 256) for B in (64, 128, 256, 512, 1024)] == [8, 8, 4, 2, 1]
    else:
        assert [size(B, 256) for B in (64, 128, 256, 512, 1024)] == [8, 4, 1, 1, 1]
    assert size(8192 if not native else 65536, 32) == 1
    if native:
        # Short runs pack by their whole work as well: 10 epochs of the default MLP on
        # MNIST-1D's 8,000 training examples are 38 GFLOP at every B, so B = 1,024 and
        # 2,048 (one member per pack by the step's FLOPs) pack 8; longer runs fewer.
        (cfg,) = configs([(0.1, 0)], **{"train.device": "cpu", "train.batch_size": 2048,
                                        "model.width": 256})  # fmt: skip
        forward = forward_flops(cfg, (40,), 10)
        assert default_pack_size(cfg, forward) == 1
        for epochs, k in ((10, NATIVE_MAX_PACK), (20, 4), (80, 1)):
            work = 3 * forward * 8000 * epochs
            assert default_pack_size(cfg, forward, work) == k, epochs
            assert (k * work <= NATIVE_PACK_WORK < 2 * k * work) or k == NATIVE_MAX_PACK
        # ... never fewer than by the step's FLOPs: a long run at a small B still packs.
        (small,) = configs([(0.1, 0)], **{"train.device": "cpu", "train.batch_size": 16,
                                          "model.width": 256})  # fmt: skip
        assert default_pack_size(small, forward, 1e15) == NATIVE_MAX_PACK
    assert forward_flops(configs([(0.1, 0)], **{"model.width": 32})[0], (40,), 10) == 2 * (
        40 * 32 + 32 * 32 + 32 * 10
    )  # multiply-adds of the three layers, 2 FLOPs each
    nqm = from_dict(with_values(SMALL, {"data.name": "nqm", "model.name": "nqm"}))
    assert default_pack_size(nqm, 0.0) == 1


def test_a_runs_work_is_its_budgets_examples_times_three_forward_passes(tmp_path: Path) -> None:
    """What sweep workers order and share by: epoch budgets are equal work at every B (not
    the rounded steps: 10 epochs of 480 examples are 150 steps at B = 32, 38 at B = 128);
    step budgets grow with B."""
    from sgdnoise.data.prepare import read_meta
    from sgdnoise.data.store import ensure_prepared

    def work(**values: Any) -> float:
        (cfg,) = configs([(0.1, 0)], **values)
        return training_flops(cfg, tmp_path)

    (cfg,) = configs([(0.1, 0)])
    meta = read_meta(ensure_prepared(cfg.data, tmp_path))
    assert meta is not None
    fwd = forward_flops(cfg, tuple(meta["input_shape"]), int(meta["num_classes"]))
    epochs = {"train.budget.unit": "epochs", "train.budget.value": 10}
    assert work(**epochs) == 3 * fwd * 10 * int(meta["n_train"])
    assert work(**epochs, **{"train.batch_size": 128}) == work(**epochs)
    assert work(**{"train.batch_size": 64}) == 2 * work() == 3 * fwd * STEPS * 64
    nqm = from_dict(with_values(SMALL, {"data.name": "nqm", "model.name": "nqm"}))
    assert training_flops(nqm, tmp_path) == 20 * 32  # steps x B: no model to count


def test_gpu_benchmark_script_runs(tmp_path: Path) -> None:
    """benchmarks/gpu.sh's measurements, at toy sizes on the CPU: the script a GPU session
    runs once must not fail there for a reason a CPU can catch."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--smoke",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["throughput_images_per_s"][0]["bf16_channels_last"] > 0
    assert result["ghost_norm_cost"][0]["ghost_over_batch_time"] > 0
    assert result["packing"][0]["K"] == 2 and result["packing"][0]["speedup"] > 0


def test_a_layer_without_a_packed_counterpart_is_named_and_not_packed(tmp_path: Path) -> None:
    from torch import nn

    from sgdnoise.models.packed import NotPackable, pack_model

    class Odd(nn.Module):  # a raw parameter outside any known layer
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    model = nn.Sequential(nn.Linear(3, 3), Odd())
    with pytest.raises(NotPackable, match="Odd"):
        pack_model(model, [model.state_dict(), model.state_dict()])
    # Every model this project builds packs (ResNet-50 too, though it is never packed by
    # default), SkipInit's gains included.
    from sgdnoise.pack import packable

    for values, shape in (
        ({"model.name": "cnn1d", "model.norm": "ghost"}, (40,)),
        ({"data.name": "cifar10", "model.name": "wrn", "model.norm": "skipinit",
          "model.depth": 10, "model.width": 1}, (3, 8, 8)),
        ({"model.name": "autoencoder", "model.norm": "batch"}, (40,)),
        ({"data.name": "cifar10", "model.name": "resnet50", "model.norm": "ghost"}, (3, 32, 32)),
    ):  # fmt: skip
        (cfg,) = configs([(0.1, 0)], **values)
        assert packable(cfg, shape, 10), values
