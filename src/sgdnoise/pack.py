"""Packed training: K runs that differ only in learning rate and/or seed, trained as one.

The runs of one sweep group share the model, B and budget, so all their tensors have the
same shapes. Each parameter and buffer is stacked over a leading member axis in a packed
copy of the model (sgdnoise.models.packed): K small forward/backward passes become one pass
of K-batched kernels (bmm, grouped convolutions), so the fixed costs of a step (Python,
dispatch, kernel launches) and of an evaluation are paid once for the pack. Each member
keeps its own initialisation, data order, augmentation, learning-rate table, ghost-norm
statistics, divergence check, checkpoints and MLflow run. A member that diverges is
recorded at once (its trial can complete while the others train) and leaves the pack.

Same math, not the same bits: batched matrix products sum in another order than the
unbatched ones, so a member's parameters follow its unpacked run up to float rounding
amplified by training (tests/test_pack.py states the tolerance).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sgdnoise import tracking
from sgdnoise.checkpoint import Checkpointer
from sgdnoise.config import Config, ConfigError, accumulation_steps
from sgdnoise.data.order import BatchOrder, derived_seed
from sgdnoise.models.packed import NotPackable, pack_model, transposed_names
from sgdnoise.optim import HeavyBall, lr_table
from sgdnoise.paths import project_root
from sgdnoise.train import (
    CHECK_EVERY,
    Preempted,
    RunResult,
    _bn_batch,
    _Evaluator,
    _finish_tracking,
    _start_tracking,
    _StopFlag,
    _threads,
    eval_row,
    eval_steps,
    final_metrics,
    state_sha256,
    total_steps,
)

# Keys that may differ between the members of one pack.
MEMBER_KEYS = (("train", "lr_eff"), ("train", "seed"), ("tracking", "run_name"))

OnDone = Callable[[int, RunResult], None]


def pack_key(cfg: Config) -> str:
    """Runs with equal keys can share a pack: everything but the member keys is equal."""
    import json

    d = cfg.to_dict()
    for section, key in MEMBER_KEYS:
        d[section].pop(key, None)
    return json.dumps(d, sort_keys=True, default=str)


# Packing pays while a step is dominated by fixed costs (Python, dispatch, kernel launches)
# rather than arithmetic. Per device: (the largest forward FLOPs of one member's step that
# is packed, the largest of a whole pack's step); a pack grows in powers of two up to
# MAX_PACK within both. CPU, measured on 2 cores with one thread (benchmarks/pack_steps.py:
# runs per second of K members packed vs one by one): an MLP of width 32 at B = 16 (84
# kFLOP per member-step) 2.9x at K = 8, 3.8x at 16, 4.6x at 32; the default width-256 MLP
# 1.4x at B = 16 (2.5 MFLOP, K = 8; 1.2x at K = 16), about 1x at B = 64 (10 MFLOP); the
# default CNN1d 1.45x at B = 16 (5 MFLOP), 0.9x at B = 64 (measured before the optimizer
# change that made unpacked steps a little cheaper). GPU: sized so that a WRN-16-4 pack at
# B = 64 holds 16 members (not measured here; benchmarks/gpu.sh measures it).
PACK_FLOPS = {"cpu": (6e6, 24e6), "cuda": (1e11, 1e12)}
MAX_PACK = {"cpu": 32, "cuda": 16}


def default_pack_size(cfg: Config, flops_per_example: float) -> int:
    """How many runs a sweep packs by default (`train.pack: null`), given the model's
    forward FLOPs per example (`forward_flops`)."""
    if cfg.data.name == "nqm" or cfg.model.name == "resnet50":
        return 1  # exact theory, not training; one ResNet-50 run fills a GPU's memory
    on_gpu = cfg.train.device == "cuda" or (
        cfg.train.device == "auto" and torch.cuda.is_available()
    )
    kind = "cuda" if on_gpu else "cpu"
    member_max, pack_max = PACK_FLOPS[kind]
    per_member = max(1.0, flops_per_example * cfg.train.batch_size)
    if per_member > member_max:
        return 1
    k = 1
    while 2 * k <= MAX_PACK[kind] and 2 * k * per_member <= pack_max:
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
    from sgdnoise.data.prepare import read_meta
    from sgdnoise.data.store import ensure_prepared

    meta = read_meta(ensure_prepared(cfg.data, root))
    assert meta is not None
    shape, classes = tuple(meta["input_shape"]), int(meta["num_classes"])
    size = default_pack_size(cfg, forward_flops(cfg, shape, classes))
    return size if size == 1 or packable(cfg, shape, classes) else 1


def packable(cfg: Config, input_shape: Sequence[int], num_classes: int) -> bool:
    """Whether every layer of cfg's model has a packed counterpart."""
    from sgdnoise.models.build import build_model

    model = build_model(cfg.model, tuple(input_shape), num_classes)
    try:
        pack_model(model, [model.state_dict()])
    except NotPackable:
        return False
    return True


class StackedModel:
    """K copies of one architecture as one packed module (sgdnoise.models.packed)."""

    def __init__(self, template: nn.Module, states: Sequence[dict[str, torch.Tensor]]):
        self.template = template  # holds the structure; loaded with a member to evaluate it
        self.module = pack_model(template, states)
        self.param_names = [n for n, _ in template.named_parameters()]
        self.state_names = list(template.state_dict().keys())
        self.transposed = transposed_names(self.module)
        self.size = len(states)
        self.params = self._params()

    def _params(self) -> list[torch.Tensor]:
        """The stacked parameters, in the template's parameter order."""
        return [self.module.get_parameter(n) for n in self.param_names]

    def _to_leaf(self, name: str, stacked: torch.Tensor) -> torch.Tensor:
        """A stacked tensor in the template's layout -> the packed module's layout."""
        return stacked.transpose(-1, -2).contiguous() if name in self.transposed else stacked

    def _view(self, name: str, leaf: torch.Tensor) -> torch.Tensor:
        """A packed tensor as the template lays it out (transposed back where stored so)."""
        return leaf.transpose(-1, -2) if name in self.transposed else leaf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (K, N, ...) -> (K, N, ...), member k on its own inputs x[k]."""
        out = self.module(x.reshape(-1, *x.shape[2:]))
        return out.view(self.size, -1, *out.shape[1:])

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, ...) -> (K, N, ...), every member on the same inputs."""
        return self(x.unsqueeze(0).expand(self.size, *x.shape))

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @property
    def training(self) -> bool:
        return self.module.training

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's state dict, with the keys and layouts of the unpacked model."""
        state = self.module.state_dict()
        return {n: self._view(n, state[n])[k].detach().clone(memory_format=torch.contiguous_format)
                for n in self.state_names}  # fmt: skip

    def load_member(self, k: int) -> nn.Module:
        """The template module holding member k's state (for a single-member evaluation)."""
        self.template.load_state_dict(self.member_state(k))
        return self.template

    @torch.no_grad()
    def select(self, keep: list[int]) -> None:
        """Keep only the members at `keep` (in that order)."""
        index = torch.tensor(keep, device=self.params[0].device)
        for module in self.module.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(p.index_select(0, index)))
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, b.index_select(0, index))
        self.size = len(keep)
        self.params = self._params()


class StackedSGD(HeavyBall):
    """HeavyBall on stacked parameters with a learning rate per member: the elementwise
    parts run on the stacked tensors, the update θ ← θ − ε v per member with the same
    foreach kernel and scalar alpha as an unpacked run."""

    def __init__(self, params: list[torch.Tensor], momentum: float, weight_decay: float):
        super().__init__(params, 0.0, momentum, weight_decay)

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:  # type: ignore[override]
        directions = self.directions(list(range(len(self.params))))
        for k, lr in enumerate(lrs):
            torch._foreach_add_([p[k] for p in self.params], [d[k] for d in directions],
                                alpha=-lr)  # fmt: skip

    def select(self, keep: list[int], params: list[torch.Tensor]) -> None:
        """Keep the members at `keep`; `params` are the model's stacked parameters now."""
        index = torch.tensor(keep, device=params[0].device)
        self.params = list(params)
        self.momentum_buffers = [
            b.index_select(0, index) if b is not None else None for b in self.momentum_buffers
        ]


class _PackedNoise:
    """_NoiseWindow (train.py) for every member at once: squared gradient norms per member,
    summed on the device between evaluations."""

    def __init__(self, params: list[torch.Tensor], K: int, M: int, B: int):
        self.K, self.M, self.B = K, M, B
        self.prev = [torch.zeros_like(p) for p in params]
        self.sums = torch.zeros(params[0].shape[0], 3, dtype=torch.float64, device=params[0].device)
        self.steps = 0

    @staticmethod
    def _sq(tensors: list[torch.Tensor]) -> torch.Tensor:
        return sum(t.double().pow(2).flatten(1).sum(1) for t in tensors)  # type: ignore[return-value]

    def after_micro_batch(self, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        self.sums[:, 0] += self._sq(torch._foreach_sub(grads, self.prev)) * self.K**2
        self.sums[:, 2] += 1
        torch._foreach_copy_(self.prev, grads)

    def after_step(self, params: list[torch.Tensor]) -> None:
        self.sums[:, 1] += self._sq([p.grad for p in params])
        torch._foreach_zero_(self.prev)
        self.steps += 1

    def estimates(self) -> list[float | None]:
        from sgdnoise.theory.noise_scale import estimate

        if self.steps == 0:
            return [None] * self.sums.shape[0]
        out: list[float | None] = []
        for small, big, n in self.sums.tolist():
            g_sq, tr_sigma = estimate(small / max(n, 1.0), self.M, big / self.steps, self.B)
            ok = g_sq > 0 and math.isfinite(tr_sigma)
            out.append(tr_sigma / g_sq if ok else None)
        self.sums.zero_()
        self.steps = 0
        return out

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.sums.device)
        self.prev = [p.index_select(0, index) for p in self.prev]
        self.sums = self.sums.index_select(0, index)


class _Member:
    """What one member carries besides its slice of the stacked tensors."""

    def __init__(self, index: int, cfg: Config, order: BatchOrder, lrs: list[float],
                 ckpt: Checkpointer, tracker: Any):  # fmt: skip
        self.index, self.cfg, self.order, self.lrs = index, cfg, order, lrs
        self.ckpt, self.tracker = ckpt, tracker
        self.history: list[dict[str, float]] = []
        self.initial_loss = math.inf
        self.train_time = 0.0


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
    from sgdnoise.train import train

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

    if len(cfgs) == 1 or cfgs[0].data.name == "nqm":
        one_by_one(range(len(cfgs)))
        return results  # type: ignore[return-value]
    # Members resumed from checkpoints must stand at the same step to share a pack.
    resumes = [Checkpointer(c, root, scope=parent_run_id).load_latest() for c in cfgs]
    by_step: dict[int, list[int]] = {}
    for i, r in enumerate(resumes):
        by_step.setdefault(int(r["step"]) if r is not None else 0, []).append(i)
    for members in by_step.values():
        try:
            _train_group(
                [cfgs[i] for i in members], [resumes[i] for i in members],
                [tags[i] for i in members], root, parent_run_id, track, keep_state,
                lambda j, r, members=members: done(members[j], r),
            )  # fmt: skip
        except NotPackable as e:  # raised before any member started: train them singly
            print(f"cannot pack {cfgs[0].model.name}: {e}; training one by one", file=sys.stderr)
            one_by_one(members)
    return results  # type: ignore[return-value]


def _train_group(cfgs, resumes, tags, root, parent_run_id, track, keep_state, done) -> None:
    from sgdnoise.data.augment import apply_crop_flip, crop_flip_params
    from sgdnoise.data.store import load
    from sgdnoise.models.build import build_model

    cfg0 = cfgs[0]
    t_cfg = cfg0.train
    want_cuda = t_cfg.device == "cuda" or (t_cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if want_cuda else "cpu")
    torch.set_num_threads(_threads(cfg0, 1))
    if t_cfg.precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    K_acc = accumulation_steps(cfg0, 1)
    M = t_cfg.micro_batch_size or t_cfg.batch_size
    B = t_cfg.batch_size
    data = load(cfg0.data, device, root)
    task = "reconstruction" if cfg0.model.name == "autoencoder" else "classification"
    reconstruction = task == "reconstruction"
    augment = data.meta.get("augment")
    if augment not in (None, "crop_flip"):
        raise ValueError(f"unknown augmentation {augment!r} in data meta.json")

    states, template = [], None
    for cfg, resume in zip(cfgs, resumes, strict=True):
        torch.manual_seed(derived_seed("init", cfg.train.seed))
        model = build_model(cfg.model, tuple(data.input_shape), data.num_classes).to(device)
        template = model if template is None else template
        states.append(resume["model"] if resume is not None else model.state_dict())
    assert template is not None
    net = StackedModel(template, [{k: v.to(device) for k, v in s.items()} for s in states])
    opt = StackedSGD(net.params, cfg0.momentum, t_cfg.weight_decay)
    if resumes[0] is not None and resumes[0]["optimizer"]["state"]:
        opt.momentum_buffers = [
            net._to_leaf(n, torch.stack([r["optimizer"]["state"][i]["momentum_buffer"].to(device)
                                         for r in resumes])).detach()
            for i, n in enumerate(net.param_names)
        ]  # fmt: skip
    total = total_steps(cfg0, data.n_train)
    evals = eval_steps(total, t_cfg.eval_points)
    members = []
    for i, (cfg, resume) in enumerate(zip(cfgs, resumes, strict=True)):
        ckpt = Checkpointer(cfg, root, scope=parent_run_id)
        tracker = None
        if track and resume is not None and resume.get("run_id"):
            tracker = tracking.RunTracker(cfg, root, auto_flush=False)
            tracker.resume(resume["run_id"])
        elif track:
            derived = {
                "derived.lr": cfg.lr, "derived.accumulation": K_acc, "derived.processes": 1,
                "derived.total_steps": total, "derived.n_train": data.n_train,
                "derived.bn_batch": _bn_batch(cfg), "derived.pack": len(cfgs),
            }  # fmt: skip
            tracker = _start_tracking(
                cfg, root, derived, data.checksum, str(device), 1, parent_run_id, tags[i],
                auto_flush=not ckpt.enabled,
            )  # fmt: skip
        m = _Member(i, cfg, BatchOrder(data.n_train, B, cfg.train.seed, device),
                    lr_table(t_cfg.schedule, cfg.lr, total, t_cfg.warmup), ckpt, tracker)  # fmt: skip
        if resume is not None:
            m.history = list(resume["history"])
            m.initial_loss = float(resume["initial_loss"])
            m.train_time = float(resume["train_time"])
        members.append(m)
    start = int(resumes[0]["step"]) if resumes[0] is not None else 0
    noise = _PackedNoise(net.params, K_acc, M, B) if t_cfg.noise_scale and K_acc > 1 else None
    if noise is not None and resumes[0] is not None and resumes[0].get("noise"):
        noise.sums = torch.stack([r["noise"]["sums"] for r in resumes]).to(device)
        noise.steps = int(resumes[0]["noise"]["steps"])
    X, Y = data.train_x, data.train_y
    single = _Evaluator(template, task, t_cfg.eval_batch_size, None, autocast)

    def evaluate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(K, 3): loss sum, correct count, n for every member, one batched pass."""
        K, n, bs = net.size, len(x), t_cfg.eval_batch_size
        sums = torch.zeros(K, 3, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i in range(0, n, bs):
                xb, yb = x[i : i + bs], y[i : i + bs]
                with autocast():
                    out = net.shared(xb)
                out = out.float()
                if reconstruction:
                    err = (out - xb).pow(2).reshape(K, len(xb), -1).sum(2)
                    sums[:, 0] += err.sum(1) / xb[0].numel()
                else:
                    ce = F.cross_entropy(out.flatten(0, 1), yb.repeat(K), reduction="none")
                    sums[:, 0] += ce.view(K, -1).sum(1)
                    sums[:, 1] += (out.argmax(-1) == yb).sum(1)
                sums[:, 2] += len(xb)
        return sums

    def record(step: int) -> list[float]:
        """Evaluate every member; log; return the train losses."""
        net.train(False)
        tr, te = evaluate(X, Y), evaluate(data.test_x, data.test_y)
        net.train(True)
        tr_m, te_m = (tr[:, :2] / tr[:, 2:]).tolist(), (te[:, :2] / te[:, 2:]).tolist()
        gns = noise.estimates() if noise is not None else [None] * len(members)
        for m, a, b, g in zip(members, tr_m, te_m, gns, strict=True):
            row = eval_row(a[0], a[1], b[0], b[1], m.lrs[min(step, total - 1)], task)
            if g is not None:
                row["grad_noise_scale"] = g
            m.history.append({"step": step, **row})
            if m.tracker:
                m.tracker.log_metrics(row, step)
        return [a[0] for a in tr_m]

    def retire(gone: list[int], status: str, step: int, elapsed: float) -> None:
        """Finish members at positions `gone` (diverged, or all at the end) and drop them."""
        nonlocal members
        for pos in gone:
            m = members[pos]
            model = net.load_member(pos)
            if m.history[-1]["step"] != step:  # diverged between evaluations
                a, b = single(X, Y), single(data.test_x, data.test_y)
                row = eval_row(a[0], a[1], b[0], b[1], m.lrs[min(step, total - 1)], task)
                m.history.append({"step": step, **row})
                if m.tracker:
                    m.tracker.log_metrics(row, step)
            train_time = m.train_time + elapsed
            metrics = final_metrics(m.history, status, step, m.order, B, train_time)
            result = RunResult(None, m.cfg.run_key, status, metrics, state_sha256(model),
                               m.history)  # fmt: skip
            _finish_tracking(m.tracker, result)
            if m.ckpt.enabled:
                m.ckpt.clear()
            if keep_state:
                result.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            done(m.index, result)
        keep = [p for p in range(len(members)) if p not in gone]
        if keep and len(keep) < len(members):
            net.select(keep)
            opt.select(keep, net.params)
            if noise is not None:
                noise.select(keep)
        members = [members[p] for p in keep]

    def checkpoint(step: int, elapsed: float) -> None:
        for pos, m in enumerate(members):
            # The unpacked run's optimizer state (HeavyBall's format): either can resume it.
            optimizer_state = {
                "state": {
                    i: {"momentum_buffer": net._view(n, b)[pos].clone(
                        memory_format=torch.contiguous_format)}
                    for i, (n, b) in enumerate(zip(net.param_names, opt.momentum_buffers,
                                                   strict=True))
                    if b is not None
                },
                "param_groups": [{**opt.param_groups[0], "lr": m.lrs[min(step, total - 1)]}],
            }  # fmt: skip
            m.ckpt.save(step, {
                "step": step, "model": net.member_state(pos), "optimizer": optimizer_state,
                "history": m.history, "initial_loss": m.initial_loss,
                "train_time": m.train_time + elapsed,
                "run_id": m.tracker.run_id if m.tracker else None,
                "noise": {"sums": noise.sums[pos].cpu(), "steps": noise.steps}
                if noise is not None else {},
            })  # fmt: skip
            if m.tracker:
                m.tracker.flush()

    def check(losses: list[float]) -> list[int]:
        factor = t_cfg.divergence_factor
        return [
            p for p, (m, v) in enumerate(zip(members, losses, strict=True))
            if not math.isfinite(v) or v > factor * m.initial_loss
        ]  # fmt: skip

    next_eval = bisect.bisect_left(evals, start)
    stop = _StopFlag()
    net.train(True)
    elapsed, t0 = 0.0, time.perf_counter()
    losses = None
    try:
        with stop.installed():
            for s in range(start, total):
                if s == evals[next_eval]:
                    elapsed += time.perf_counter() - t0
                    values = record(s)
                    if s == 0:
                        for m, v in zip(members, values, strict=True):
                            m.initial_loss = v if math.isfinite(v) else math.inf
                    next_eval += 1
                    if gone := check(values):
                        retire(gone, "diverged", s, elapsed)
                        if not members:
                            return
                    t0 = time.perf_counter()
                K = len(members)
                idx = torch.stack([m.order.global_batch(s) for m in members])  # (K, B)
                if augment:
                    aug = [crop_flip_params(B, torch.Generator(device=X.device).manual_seed(
                        derived_seed("aug", m.cfg.train.seed, s))) for m in members]  # fmt: skip
                lrs = [m.lrs[s] for m in members]
                for j in range(K_acc):
                    mb = idx[:, j * M : (j + 1) * M] if K_acc > 1 else idx
                    x, y = X[mb.reshape(-1)], Y[mb]
                    if augment:
                        parts = [a[j * M : (j + 1) * M] for p in aug for a in p]
                        params = [torch.cat(parts[i::3]) for i in range(3)]
                        x = apply_crop_flip(x, *params)
                    x = x.view(K, -1, *x.shape[1:])
                    with autocast():
                        out = net(x)
                    if reconstruction:
                        losses = (out.float() - x).pow(2).reshape(K, -1).mean(1)
                    else:
                        ce = F.cross_entropy(out.float().flatten(0, 1), y.reshape(-1),
                                             reduction="none")  # fmt: skip
                        losses = ce.view(K, -1).mean(1)
                    (losses.sum() / K_acc if K_acc > 1 else losses.sum()).backward()
                    if noise is not None:
                        noise.after_micro_batch(net.params)
                if noise is not None:
                    noise.after_step(net.params)
                opt.step(lrs)
                opt.zero_grad()
                if (s + 1) % CHECK_EVERY == 0 and (gone := check(losses.tolist())):
                    elapsed += time.perf_counter() - t0
                    retire(gone, "diverged", s + 1, elapsed)
                    if not members:
                        return
                    t0 = time.perf_counter()
                if stop.flag:
                    checkpoint(s + 1, elapsed + time.perf_counter() - t0)
                    raise Preempted(s + 1)
                if members[0].ckpt.due(s + 1) and s + 1 < total:
                    checkpoint(s + 1, elapsed + time.perf_counter() - t0)
            elapsed += time.perf_counter() - t0
            record(total)
            retire(list(range(len(members))), "finished", total, elapsed)
    except Preempted:
        for m in members:
            if m.tracker:
                m.tracker.fail("KILLED")
        raise
    except BaseException:
        for m in members:
            if m.tracker:
                m.tracker.fail()
        raise
