"""Packed training: K runs that differ only in learning rate and/or seed, trained as one.

The runs of one sweep group share the model, B and budget, so all their tensors have the
same shapes. Each parameter and buffer is stacked over a leading member axis in a packed
copy of the model (sgdnoise.models.packed): K small forward/backward passes become one pass
of K-batched kernels (bmm, grouped convolutions), so the fixed costs of a step (Python,
dispatch, kernel launches) and of an evaluation are paid once for the pack. The pack trains
in the same run loop as a single run (sgdnoise.loop): each member keeps its own
initialisation, data order, augmentation, learning-rate table, ghost-norm statistics,
divergence check, checkpoints and MLflow run. This module decides what may share a pack and
how large packs are, and starts them.

Same math, not the same bits: batched matrix products sum in another order than the
unbatched ones, so a member's parameters follow its unpacked run up to float rounding
amplified by training (tests/test_pack.py states the tolerance).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sgdnoise.allocator import keep_freed_memory
from sgdnoise.checkpoint import Checkpointer
from sgdnoise.config import Config, ConfigError, accumulation_steps, check_batch_size
from sgdnoise.data.order import derived_seed
from sgdnoise.loop import Loop, OnDone, RunResult, Setup, members_for, total_steps
from sgdnoise.models import native_mlp
from sgdnoise.models.packed import NotPackable, StackedModel, pack_model
from sgdnoise.paths import project_root
from sgdnoise.train import accelerator, augmentation, task_of, threads, train

__all__ = ["StackedModel", "default_pack_size", "forward_flops", "pack_key", "pack_problem",
           "pack_size", "packable", "train_pack", "training_flops", "MAX_PACK"]  # fmt: skip

# Keys that may differ between the members of one pack.
MEMBER_KEYS = (("train", "lr_eff"), ("train", "seed"), ("tracking", "run_name"))


def pack_key(cfg: Config) -> str:
    """Runs with equal keys can share a pack: everything but the member keys is equal."""
    import json

    d = cfg.to_dict()
    for section, key in MEMBER_KEYS:
        d[section].pop(key, None)
    return json.dumps(d, sort_keys=True, default=str)


# Packing pays while a member's step is dominated by fixed costs (Python, dispatch, kernel
# launches) or by memory traffic rather than arithmetic. Per device: (the largest forward
# FLOPs of one member's step that is packed, the largest of a whole pack's step); a pack
# grows in powers of two up to MAX_PACK within both. CPU, the default MLP on 2 cores with
# one thread, µs per member-step one by one -> packed (one process, no evaluation):
# B = 4: 855 -> 330 at K = 16; B = 16: 752 -> 253 at K = 16 (362 at K = 32: the pack's
# parameters, gradients and momentum outgrow the caches); B = 64: 1178 -> 790 at K = 8;
# B = 128 (20 MFLOP forward): 1847 -> 1468 at K = 4; B = 256 is arithmetic-bound unpacked
# (2.5x peak). GPU: sized so that a WRN-16-4 pack at B = 64 holds 16 members (not measured
# here; benchmarks/gpu.sh measures it).
PACK_FLOPS = {"cpu": (25e6, 100e6), "cuda": (1e11, 1e12)}
MAX_PACK = {"cpu": 16, "cuda": 16}
# Packs of plain MLPs on the CPU step through the C kernel of sgdnoise.models.native_mlp at
# every B: it runs a member's batch in chunks of 128 rows (their activations stay in L2) and
# evaluates in chunks too. µs per example-step of the default MLP, whole runs, two at once as
# in a sweep (`benchmarks/large_batch.py`), the ranges of three rounds, kernel vs torch's
# unpacked step: B = 2048: 9.1-10.4 vs 10.1-12.1; 4096: 7.8-10.0 vs 9.8-11.5; 8000: 8.6-9.9
# vs 9.0-11.3. (Unchunked, the kernel stopped paying at 512; before its rows were padded
# and its update ran by whole rows, it stopped at 2048.)
# Such packs hold at most NATIVE_MAX_PACK members: the kernel runs a member's step while its
# weights are cached, and 16 members' weights and momentum, 10 MB for the default MLP, crowd
# the cache two workers share (B = 4, whole packs of 400 steps: 164 µs per member-step at
# K = 8, 199 at K = 16, when the kernel took one step per call; since a member's steps run
# back to back, 16 no longer cost more, nor measurably less: `study_ab.py` read
# constant_epochs with 16 at 0.963 and 1.087 of the wall). The kernel steps one member
# after the other, so a member's step has no size limit. A pack amortizes the loop's Python
# between calls: up to NATIVE_PACK_FLOPS of forward FLOPs a pack step (B = 256: 4 members,
# 512: 2). Its members also share one set-up: the data loaded, the models built, a sweep
# worker's bookkeeping between packs (tens of ms each time). So short runs also pack up to
# NATIVE_PACK_WORK training FLOPs a pack, whatever B: 10 epochs of the default MLP on
# MNIST-1D are 38 GFLOP, about 0.3 s, at every B, and constant_epochs' large batches pack 3
# to 8 runs (3: an edge round's seeds) where they trained alone or in pairs. `python
# benchmarks/study_ab.py --base <the commit before>` (two rounds each): its sweep took 0.945
# and 0.894 of the wall, constant_steps' (512: 4 runs rather than 2, 1,024: 2 rather than
# 1) 0.971 and 0.929. A pack's work stays about 2 s of arithmetic, so the two workers' last
# runs still end close together.
NATIVE_MAX_PACK = 8
NATIVE_PACK_FLOPS = 200e6
NATIVE_PACK_WORK = 400e9


def native_step(cfg: Config, on_gpu: bool) -> bool:
    """Whether packs of cfg's runs step through the C kernel when their model is a plain
    MLP in fp32 (StackedNet checks the model, and that the kernel could be built): on the
    CPU, one micro-batch per step (the kernel fuses the backward pass with the update), or
    micro-batches of at least native_mlp.MIN_MICRO rows, summed in the kernel."""
    micro = accumulation_steps(cfg, 1) == 1 or cfg.train.micro_batch_size >= native_mlp.MIN_MICRO
    return not on_gpu and micro


def _on_gpu(cfg: Config) -> bool:
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def native_mlp_runs(cfg: Config) -> bool:
    """Whether cfg's runs, in a pack, step through the C kernel: a plain MLP in fp32 under
    `native_step`'s conditions, where the kernel could be built. Its step is faster than
    torch's packed or unpacked one at every B measured (4 to 8000), so a run without pack
    mates in a sweep trains as a pack of one (unless `train.pack: 1`)."""
    return (cfg.model.name == "mlp" and cfg.model.norm == "none"
            and cfg.train.precision == "fp32" and native_step(cfg, _on_gpu(cfg))
            and native_mlp.library() is not None)  # fmt: skip


def default_pack_size(cfg: Config, flops_per_example: float, run_flops: float = 0.0) -> int:
    """How many runs a sweep packs by default (`train.pack: null`), given the model's
    forward FLOPs per example (`forward_flops`) and a run's training FLOPs (`run_flops`,
    `training_flops`; 0: not known, no packing by work)."""
    if cfg.data.name == "nqm" or cfg.model.name == "resnet50":
        return 1  # exact theory, not training; one ResNet-50 run fills a GPU's memory
    kind = "cuda" if _on_gpu(cfg) else "cpu"
    member_max, pack_max = PACK_FLOPS[kind]
    most = MAX_PACK[kind]
    per_member = max(1.0, flops_per_example * cfg.train.batch_size)
    if native_mlp_runs(cfg):
        by_step = _doublings(per_member, NATIVE_PACK_FLOPS, NATIVE_MAX_PACK)
        by_work = _doublings(run_flops, NATIVE_PACK_WORK, NATIVE_MAX_PACK) if run_flops > 0 else 1
        return max(by_step, by_work)
    if per_member > member_max:
        return 1
    return _doublings(per_member, pack_max, most)


def _doublings(each: float, limit: float, most: int) -> int:
    """The largest power of two k <= most with k * each <= limit (1 at least)."""
    k = 1
    while 2 * k <= most and 2 * k * each <= limit:
        k *= 2
    return k


def forward_flops(cfg: Config, input_shape: Sequence[int], num_classes: int) -> float:
    """Forward FLOPs per example of cfg's model: 2 per multiply-add of its linear and
    convolution layers (the rest is small), counted by hooks on one example in eval mode.
    (torch.utils.flop_counter does the same but costs ~0.8 s per call here.)"""
    from sgdnoise.models.build import build_model

    model = build_model(cfg.model, tuple(input_shape), num_classes).eval()
    total = 0.0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        w = module.weight
        if isinstance(module, nn.Linear):
            total += 2.0 * output.numel() * w.shape[1]
        else:  # a convolution: each output element sums (in / groups) × kernel products
            total += 2.0 * output.numel() * w[0].numel()

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    return total


def pack_size(cfg: Config, root: Path) -> int:
    """train.pack when set, else the default for the device, the model and B (which needs
    the data's input shape: the dataset is prepared if it is not yet)."""
    if cfg.train.pack is not None:
        return cfg.train.pack
    if cfg.data.name == "nqm":
        return 1
    shape, classes, n_train = _data_shape(cfg, root)
    forward = _model_flops(cfg, shape, classes)
    size = default_pack_size(cfg, forward, _run_flops(cfg, forward, n_train))
    return size if size == 1 or packable(cfg, shape, classes) else 1


_FORWARD_FLOPS: dict[tuple[str, tuple[int, ...], int], float] = {}


def _model_flops(cfg: Config, shape: tuple[int, ...], classes: int) -> float:
    """forward_flops, counted once per model and data shape in a process (a sweep worker
    asks for every group it sizes and orders; counting builds the model)."""
    key = (repr(cfg.model), shape, classes)
    if key not in _FORWARD_FLOPS:
        _FORWARD_FLOPS[key] = forward_flops(cfg, shape, classes)
    return _FORWARD_FLOPS[key]


def _data_shape(cfg: Config, root: Path) -> tuple[tuple[int, ...], int, int]:
    """(input shape, classes, training examples) of cfg's dataset, prepared if it is not yet."""
    from sgdnoise.data.prepare import read_meta
    from sgdnoise.data.store import ensure_prepared

    meta = read_meta(ensure_prepared(cfg.data, root))
    assert meta is not None
    return tuple(meta["input_shape"]), int(meta["num_classes"]), int(meta["n_train"])


def training_flops(cfg: Config, root: Path) -> float:
    """A run's training FLOPs, 3 x forward x the examples its budget names (epochs x the
    training set, or steps x B): what a sweep's workers order and share their work by. Not
    the rounded steps, so that equal epoch budgets are equal work at every B. The NQM
    (theory, no model): its steps x B."""
    budget, B = cfg.train.budget, cfg.train.batch_size
    if cfg.data.name == "nqm":
        return float(budget.value * B)  # its budget is in steps
    shape, classes, n_train = _data_shape(cfg, root)
    return _run_flops(cfg, _model_flops(cfg, shape, classes), n_train)


def _run_flops(cfg: Config, forward: float, n_train: int) -> float:
    """training_flops from the model's forward FLOPs per example and the training set's size."""
    budget = cfg.train.budget
    examples = budget.value * (n_train if budget.unit == "epochs" else cfg.train.batch_size)
    return 3.0 * forward * examples


def packable(cfg: Config, input_shape: Sequence[int], num_classes: int) -> bool:
    """Whether every layer of cfg's model has a packed counterpart."""
    return pack_problem(cfg, input_shape, num_classes) is None


def pack_problem(cfg: Config, input_shape: Sequence[int], num_classes: int) -> str | None:
    """Why cfg's model cannot be packed (None: it can): a layer with parameters that has no
    packed form (Linear, Conv1d/2d and batch norms have), or, for a user model, a forward
    whose pack of two members does not compute each member's own output."""
    from sgdnoise.models.build import build_model
    from sgdnoise.usercode import is_import_path

    model = build_model(cfg.model, tuple(input_shape), num_classes)
    try:
        pack_model(model, [model.state_dict()])
    except NotPackable as e:
        return str(e)
    if not is_import_path(cfg.model.name):
        return None  # the built-in models' forwards keep examples apart
    return _mixing_problem(cfg, tuple(input_shape), num_classes)


def _mixing_problem(cfg: Config, shape: tuple[int, ...], num_classes: int) -> str | None:
    """A user's forward may mix examples along the batch axis (statistics of its own, a
    reshape across examples), which in a pack would mix members: compare a pack of two
    members with each member alone, in evaluation mode (dropout aside, deterministic)."""
    from sgdnoise.models.build import build_model

    with torch.random.fork_rng():  # the caller's random streams stay as they were
        members = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            members.append(build_model(cfg.model, shape, num_classes).eval())
        x = torch.randn(2, 3, *shape)
        stacked = StackedModel(members[0], [m.state_dict() for m in members])
        stacked.train(False)
        with torch.no_grad():
            alone = torch.stack([m(xk) for m, xk in zip(members, x, strict=True)])
            packed = stacked(x)
    scale = alone.abs().max().clamp_min(1.0)
    if packed.shape != alone.shape or ((packed - alone).abs().max() / scale).item() > 1e-4:
        return ("a pack of two members does not compute each member's own output (does the "
                "forward mix examples along the batch axis?)")  # fmt: skip
    return None


def train_pack(
    cfgs: Sequence[Config],
    *,
    root: Path | None = None,
    parent_run_id: str | None = None,
    extra_tags: Sequence[dict[str, str]] | None = None,
    track: bool = True,
    keep_state: bool = False,
    on_done: OnDone | None = None,
) -> list[RunResult]:
    """Train `cfgs` (same pack_key) as one pack; results in the order of `cfgs`.

    `on_done(i, result)` is called as soon as member i has finished or diverged (and its
    MLflow run is closed), before the rest of the pack goes on.
    """
    root = root or project_root()
    tags = list(extra_tags) if extra_tags is not None else [{} for _ in cfgs]
    if len({pack_key(c) for c in cfgs}) > 1:
        raise ValueError("a pack's runs must differ only in train.lr_eff and train.seed")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.pack", "packing runs in one process", "1 with processes > 1")
    results: list[RunResult | None] = [None] * len(cfgs)

    def done(i: int, result: RunResult) -> None:
        results[i] = result
        if on_done is not None:
            on_done(i, result)

    def one_by_one(members: Sequence[int]) -> None:
        for i in members:
            r = train(cfgs[i], root=root, parent_run_id=parent_run_id, extra_tags=tags[i],
                      track=track, keep_state=keep_state)  # fmt: skip
            done(i, r)

    if cfgs[0].data.name == "nqm" or (len(cfgs) == 1 and not native_mlp_runs(cfgs[0])):
        one_by_one(range(len(cfgs)))
        return results  # type: ignore[return-value]
    # Members resumed from checkpoints must stand at the same step to share a pack.
    ckpts = [Checkpointer(c, root, scope=parent_run_id) for c in cfgs]
    resumes = [c.load_latest() if c.enabled else None for c in ckpts]
    by_step: dict[int, list[int]] = {}
    for i, r in enumerate(resumes):
        by_step.setdefault(int(r["step"]) if r is not None else 0, []).append(i)
    for step, members in by_step.items():
        try:
            _train_group(
                [cfgs[i] for i in members], [ckpts[i] for i in members],
                [resumes[i] for i in members], [tags[i] for i in members], step, root,
                parent_run_id, track, keep_state,
                lambda j, r, members=members: done(members[j], r),
            )  # fmt: skip
        except NotPackable as e:  # raised before any member started: train them singly
            print(f"cannot pack {cfgs[0].model.name}: {e}; training one by one", file=sys.stderr)
            one_by_one(members)
    return results  # type: ignore[return-value]


def _train_group(
    cfgs: list[Config], ckpts: list[Checkpointer], resumes: list[dict[str, Any] | None],
    tags: list[dict[str, str]], start: int, root: Path, parent_run_id: str | None,
    track: bool, keep_state: bool, done: OnDone,
) -> None:  # fmt: skip
    from sgdnoise.data.store import load
    from sgdnoise.models.build import build_model
    from sgdnoise.nets import StackedNet

    keep_freed_memory()
    cfg0 = cfgs[0]
    acc = accelerator(cfg0)
    torch.set_num_threads(threads(cfg0, 1))
    data = load(cfg0.data, acc.device, root)
    check_batch_size(cfg0, data.n_train)
    task, augment = task_of(cfg0, data.meta), augmentation(data)
    states, template = [], None
    for cfg, resume in zip(cfgs, resumes, strict=True):
        if resume is not None:
            print(f"resuming {cfg.run_key} from step {resume['step']}", file=sys.stderr)
        torch.manual_seed(derived_seed("init", cfg.train.seed))
        model = build_model(cfg.model, tuple(data.input_shape), data.num_classes).to(acc.device)
        template = model if template is None else template
        states.append(resume["model"] if resume is not None else model.state_dict())
    assert template is not None
    net = StackedNet(
        template, [{k: v.to(acc.device) for k, v in s.items()} for s in states],
        [r["optimizer"] if r is not None else None for r in resumes], cfg0.momentum,
        cfg0.train.weight_decay, task, cfg0.train.eval_batch_size,
        fp32=cfg0.train.precision == "fp32",
        native=native_step(cfg0, acc.device.type != "cpu"),
    )  # fmt: skip
    setup = Setup(root, acc, data, task, augment, total_steps(cfg0, data.n_train), parent_run_id,
                  track, keep_state)  # fmt: skip
    members = members_for(setup, cfgs, ckpts, resumes, tags, packed=True, kernel=net.kernel)
    noise = [r.get("noise") or {} for r in resumes] if resumes[0] is not None else None
    Loop(setup, net, members, start, noise, done).run()
