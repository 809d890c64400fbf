"""One training run: B = micro_batch × accumulation × processes, exactly.

Accelerate sets up the processes (torchrun / accelerate launch), the device, DDP and
autocast. The accumulation loop itself is written out here rather than through
`accelerator.accumulate` / a prepared optimizer: those wrappers cost about a third of a
small model's step on CPU (see benchmarks/step_time.py), and writing it out makes the
exactness argument visible: every micro-batch's mean loss is divided by the number of
micro-batches, DDP averages over processes, so the update is the mean over all B examples.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sgdnoise import tracking
from sgdnoise.checkpoint import Checkpointer
from sgdnoise.config import Config, accumulation_steps
from sgdnoise.data.order import BatchOrder, derived_seed
from sgdnoise.optim import lr_table, make_optimizer
from sgdnoise.paths import project_root

# Divergence is checked every this many steps (a host sync; cheap on CPU, not free on GPU).
CHECK_EVERY = 16


@dataclass
class RunResult:
    run_id: str | None
    run_key: str
    status: str  # "finished" | "diverged"
    metrics: dict[str, float]
    state_sha256: str
    history: list[dict[str, float]] = field(default_factory=list)
    is_main: bool = True
    # The final parameters and buffers (on CPU), kept only when asked for.
    state: dict[str, torch.Tensor] | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_key": self.run_key,
            "status": self.status,
            **self.metrics,
            "state_sha256": self.state_sha256,
        }


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after a checkpoint; run it again


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written at this step."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM at step {step}; checkpoint written")
        self.step = step


class _StopFlag:
    """SIGTERM sets a flag; the loop acts on it at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.flag = False

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals only reach the main thread
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self, acc, every: int, step: int) -> bool:
        if acc.num_processes == 1:
            return self.flag
        if step % every:
            return False
        flag = torch.tensor([float(self.flag)], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)


def state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters and buffers, in sorted-name order, with dtypes and shapes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def total_steps(cfg: Config, n_train: int) -> int:
    budget = cfg.train.budget
    if budget.unit == "steps":
        return int(budget.value)
    return max(1, round(budget.value * n_train / cfg.train.batch_size))


def eval_steps(total: int, points: int) -> list[int]:
    """`points` evenly spaced evaluation steps from 0, plus the final step."""
    return sorted({round(i * total / points) for i in range(points)} | {total})


def _threads(cfg: Config, local_processes: int) -> int:
    if cfg.train.threads:
        return cfg.train.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's (or a sweep worker's) share
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, local_processes))


class _Evaluator:
    """Full-dataset loss/accuracy in eval mode, sharded over processes and summed."""

    def __init__(self, model, task: str, batch: int, acc=None, autocast=contextlib.nullcontext):
        """`acc` None: one process (a packed run's member evaluated on its own)."""
        self.model, self.task, self.batch = model, task, batch
        self.acc, self.autocast = acc, autocast

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        p, n_proc = (self.acc.process_index, self.acc.num_processes) if self.acc else (0, 1)
        lo, hi = p * len(x) // n_proc, (p + 1) * len(x) // n_proc
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=x.device)
        for i in range(lo, hi, self.batch):
            xb, yb = x[i : min(i + self.batch, hi)], y[i : min(i + self.batch, hi)]
            with self.autocast():
                out = self.model(xb)
            out = out.float()
            if self.task == "reconstruction":
                sums[0] += F.mse_loss(out, xb, reduction="sum") / xb[0].numel()
            else:
                sums[0] += F.cross_entropy(out, yb, reduction="sum")
                sums[1] += (out.argmax(1) == yb).sum()
            sums[2] += len(xb)
        if n_proc > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        self.model.train(was_training)
        return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def train(
    cfg: Config,
    *,
    root: Path | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    track: bool = True,
    keep_state: bool = False,
) -> RunResult:
    """Train one configuration; log it to MLflow on the main process; return its result."""
    from accelerate import Accelerator

    from sgdnoise.data.store import ensure_prepared, load_prepared
    from sgdnoise.models.build import build_model

    root = root or project_root()
    if cfg.data.name == "nqm":
        return _train_nqm(cfg, root, parent_run_id, extra_tags, track)
    t_cfg = cfg.train
    want_cuda = t_cfg.device == "cuda" or (t_cfg.device == "auto" and torch.cuda.is_available())
    acc = Accelerator(
        cpu=not want_cuda, mixed_precision="bf16" if t_cfg.precision == "bf16" else "no"
    )
    P = acc.num_processes
    torch.set_num_threads(_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", P))))
    K = accumulation_steps(cfg, P)
    M = t_cfg.micro_batch_size
    device = acc.device

    with acc.main_process_first():
        data_dir = ensure_prepared(cfg.data, root)
    data = load_prepared(data_dir, device)
    task = "reconstruction" if cfg.model.name == "autoencoder" else "classification"
    augment = data.meta.get("augment")
    if augment not in (None, "crop_flip"):
        raise ValueError(f"unknown augmentation {augment!r} in {data_dir}/meta.json")

    torch.manual_seed(derived_seed("init", t_cfg.seed))
    model = build_model(cfg.model, tuple(data.input_shape), data.num_classes).to(device)
    optimizer = make_optimizer(model, cfg)
    ckpt = Checkpointer(cfg, root, scope=parent_run_id)
    resume = ckpt.load_latest() if ckpt.enabled else None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        print(f"resuming {cfg.run_key} from step {resume['step']}", file=sys.stderr)
    total = total_steps(cfg, data.n_train)
    lrs = lr_table(t_cfg.schedule, cfg.lr, total, t_cfg.warmup)
    evals = eval_steps(total, t_cfg.eval_points)
    order = BatchOrder(data.n_train, t_cfg.batch_size, t_cfg.seed, device)
    if P > 1:
        model = acc.prepare_model(model)
    # (unwrap_model asks whether the model is torch.compile'd, which imports torch._dynamo:
    # ~1.3 s of start-up for a model that one process never wraps.)
    net = acc.unwrap_model(model) if P > 1 else model
    evaluate = _Evaluator(net, task, t_cfg.eval_batch_size, acc, acc.autocast)

    tracker = None
    if track and acc.is_main_process and resume is not None and resume.get("run_id"):
        tracker = tracking.RunTracker(cfg, root, auto_flush=False)
        tracker.resume(resume["run_id"])
    elif track and acc.is_main_process:
        derived = {
            "derived.lr": cfg.lr,
            "derived.accumulation": K,
            "derived.processes": P,
            "derived.total_steps": total,
            "derived.n_train": data.n_train,
            "derived.bn_batch": _bn_batch(cfg),
        }
        tracker = _start_tracking(
            cfg, root, derived, data.checksum, str(device), P, parent_run_id, extra_tags,
            auto_flush=not ckpt.enabled,
        )  # fmt: skip
    stop = _StopFlag()
    try:
        with stop.installed():
            result = _loop(
                cfg, acc, model, net, optimizer, data, order, lrs, evals, evaluate, task,
                augment, K, M, tracker, ckpt, resume, stop,
            )  # fmt: skip
    except Preempted:
        if tracker:
            tracker.fail("KILLED")
        raise
    except BaseException:
        if tracker:
            tracker.fail()
        raise
    _finish_tracking(tracker, result)
    if ckpt.enabled and acc.is_main_process:
        ckpt.clear()
    result.is_main = acc.is_main_process
    if keep_state:
        result.state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return result


class _NoiseWindow:
    """The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018), from the
    gradients accumulation computes anyway: micro-batch j's gradient is K times the change
    of the accumulated .grad, the full-batch gradient is .grad before the update. Squared
    norms are summed on the device over the steps since the last evaluation (no host sync
    per step); the estimate is the ratio of those averages. Under DDP the last micro-batch's
    gradient is already averaged over processes, so only the others count as small batches.
    """

    def __init__(self, net: torch.nn.Module, K: int, M: int, B: int, P: int):
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.K, self.M, self.B, self.P = K, M, B, P
        dev = self.params[0].device
        self.prev = [torch.zeros_like(p) for p in self.params]
        self.sums = torch.zeros(3, dtype=torch.float64, device=dev)  # small, big, n_small
        self.steps = 0

    def after_micro_batch(self, j: int) -> None:
        if self.P > 1 and j == self.K - 1:
            return
        grads = [p.grad for p in self.params]
        diff = torch._foreach_sub(grads, self.prev)
        sq = torch.stack(torch._foreach_norm(diff)).double().pow(2).sum()
        self.sums[0] += sq * self.K**2
        self.sums[2] += 1
        torch._foreach_copy_(self.prev, grads)

    def after_step(self) -> None:
        grads = [p.grad for p in self.params]
        self.sums[1] += torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        torch._foreach_zero_(self.prev)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.copy_(state["sums"])
        self.steps = int(state["steps"])

    def estimate(self) -> float | None:
        """B_simple over the window since the last call; None without data or |G|² <= 0."""
        from sgdnoise.theory.noise_scale import estimate

        if self.steps == 0:
            return None
        small, big, n = self.sums.tolist()
        self.sums.zero_()
        steps, self.steps = self.steps, 0
        g_sq, tr_sigma = estimate(small / max(n, 1.0), self.M, big / steps, self.B)
        return tr_sigma / g_sq if g_sq > 0 and math.isfinite(tr_sigma) else None


def _start_tracking(
    cfg, root, derived, checksum, device, processes, parent_run_id, extra_tags, auto_flush=True
):
    tracker = tracking.RunTracker(cfg, root, auto_flush=auto_flush)
    tags = tracking.provenance_tags(
        cfg, root, data_checksum=checksum, device=device, processes=processes
    )
    tracker.start(
        params={**cfg.flat(), **derived},
        tags={**tags, **(extra_tags or {})},
        run_name=tracking.run_name(cfg),
        parent_run_id=parent_run_id,
    )
    return tracker


def _finish_tracking(tracker, result: RunResult) -> None:
    if tracker is None:
        return
    TAG = tracking.TAG
    tags = {TAG + "status": result.status, TAG + "state_sha256": result.state_sha256}
    tracker.finish(result.metrics, tags, "FINISHED")
    result.run_id = tracker.run_id


def _train_nqm(cfg, root, parent_run_id, extra_tags, track) -> RunResult:
    """The noisy quadratic model: its exact expected loss under the same schedule, budget,
    B and optimizer, recorded like any run (train and test loss are the expected risk)."""
    import json

    import numpy as np

    from sgdnoise.theory import nqm

    q = cfg.nqm
    model = nqm.NQMConfig(dim=q.dim, h_power=q.h_power, c_scale=q.c_scale, theta0=q.theta0)
    total = int(cfg.train.budget.value)
    lrs_eff = np.asarray(lr_table(cfg.train.schedule, cfg.train.lr_eff, total, cfg.train.warmup))
    checksum = hashlib.sha256(json.dumps(cfg.to_dict()["nqm"], sort_keys=True).encode())
    tracker = None
    if track:
        derived = {"derived.lr": cfg.lr, "derived.total_steps": total}
        tracker = _start_tracking(
            cfg, root, derived, checksum.hexdigest(), "cpu", 1, parent_run_id, extra_tags
        )
    try:
        t0 = time.perf_counter()
        out = nqm.run(
            model, batch_size=cfg.train.batch_size, momentum=cfg.momentum, lrs_eff=lrs_eff,
            target=q.target,
        )  # fmt: skip
        elapsed = time.perf_counter() - t0
        curve = np.asarray(out["curve"], dtype=np.float64)
        steps = np.asarray(out["steps"])
        history = []
        for step in eval_steps(total, cfg.train.eval_points):
            i = int(np.searchsorted(steps, step))
            value = float(curve[min(i, len(curve) - 1)])
            row = {
                "train_loss": value,
                "test_loss": value,
                "lr": float(lrs_eff[min(step, total - 1)]),
            }
            history.append({"step": step, **row})
            if tracker:
                tracker.log_metrics(row, step)
        # The same rule as for networks: non-finite, or above divergence_factor × initial.
        limit = cfg.train.divergence_factor * float(out["initial_loss"])
        diverged = bool(out["diverged"]) or not float(out["final_loss"]) <= limit
        status = "diverged" if diverged else "finished"
        metrics = {
            "final_train_loss": float(out["final_loss"]),
            "final_test_loss": float(out["final_loss"]),
            "diverged": float(diverged),
            "steps": float(total),
            "epochs": 0.0,
            "examples_per_second": total * cfg.train.batch_size / max(elapsed, 1e-9),
        }
        if q.target is not None:
            reached = out["steps_to_target"]
            metrics["steps_to_target"] = float(reached) if reached is not None else math.inf
        sha = hashlib.sha256(curve.tobytes()).hexdigest()
        result = RunResult(None, cfg.run_key, status, metrics, sha, history)
    except BaseException:
        if tracker:
            tracker.fail()
        raise
    _finish_tracking(tracker, result)
    return result


def _bn_batch(cfg: Config) -> int | str:
    """The number of examples each normalization statistic is computed over."""
    if cfg.model.norm == "ghost":
        return min(cfg.model.ghost_batch_size, cfg.train.micro_batch_size)
    if cfg.model.norm == "batch":
        return cfg.train.micro_batch_size
    return "none"


def _loop(
    cfg, acc, model, net, optimizer, data, order, lrs, evals, evaluate, task, augment, K, M,
    tracker, ckpt, resume, stop,
):  # fmt: skip
    from sgdnoise.data.augment import apply_crop_flip, crop_flip_params

    t_cfg = cfg.train
    total = len(lrs)
    P, rank = acc.num_processes, acc.process_index
    share = t_cfg.batch_size // P
    X, Y = data.train_x, data.train_y
    group = optimizer.param_groups[0]
    no_sync = model.no_sync if P > 1 else contextlib.nullcontext
    autocast = acc.autocast
    reconstruction = task == "reconstruction"
    history: list[dict[str, float]] = []
    initial_loss = math.inf
    status, stopped_at = "finished", total
    train_time = 0.0
    start = 0
    noise = _NoiseWindow(net, K, M, t_cfg.batch_size, P) if t_cfg.noise_scale and K > 1 else None
    if resume is not None:
        start, history = int(resume["step"]), list(resume["history"])
        initial_loss, train_time = float(resume["initial_loss"]), float(resume["train_time"])
        if noise is not None and "noise" in resume:
            noise.load_state_dict(resume["noise"])
    next_eval = bisect.bisect_left(evals, start)
    model.train()

    def checkpoint(step: int) -> None:
        """At an optimizer-step boundary: the state, the metrics so far, then flush."""
        if acc.is_main_process:
            ckpt.save(
                step,
                {
                    "step": step,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "initial_loss": initial_loss,
                    "train_time": train_time + time.perf_counter() - t0,
                    "run_id": tracker.run_id if tracker else None,
                    "noise": noise.state_dict() if noise is not None else {},
                },
            )
            if tracker:
                tracker.flush()
        acc.wait_for_everyone()

    def record(step: int) -> float:
        tr_loss, tr_acc = evaluate(X, Y)
        te_loss, te_acc = evaluate(data.test_x, data.test_y)
        row = eval_row(tr_loss, tr_acc, te_loss, te_acc, lrs[min(step, total - 1)], task)
        if noise is not None and (b_simple := noise.estimate()) is not None:
            row["grad_noise_scale"] = b_simple
        history.append({"step": step, **row})
        if tracker:
            tracker.log_metrics(row, step)
        return tr_loss

    def diverged(value: float) -> bool:
        bad = not math.isfinite(value) or value > t_cfg.divergence_factor * initial_loss
        if P > 1:  # every process must stop at the same step
            flag = torch.tensor([float(bad)], device=acc.device)
            bad = bool(acc.reduce(flag, reduction="sum").item() > 0)
        return bad

    loss = None
    t0 = time.perf_counter()
    for s in range(start, total):
        if s == evals[next_eval]:
            train_time += time.perf_counter() - t0
            value = record(s)
            if s == 0:
                initial_loss = value if math.isfinite(value) else math.inf
            next_eval += 1
            if diverged(value):
                status, stopped_at = "diverged", s
                break
            t0 = time.perf_counter()
        idx = order.global_batch(s)
        if P > 1:
            idx = idx[rank * share : (rank + 1) * share]
        if augment:
            # Drawn for the whole global batch, then sliced: a sample's augmentation does
            # not depend on how the batch is split over micro-batches and processes.
            gen = torch.Generator(device=X.device).manual_seed(derived_seed("aug", t_cfg.seed, s))
            aug = crop_flip_params(t_cfg.batch_size, gen)
        group["lr"] = lrs[s]
        for j in range(K):
            mb = idx[j * M : (j + 1) * M] if K > 1 else idx
            x, y = X[mb], Y[mb]
            if augment:
                lo = rank * share + j * M
                x = apply_crop_flip(x, *(a[lo : lo + M] for a in aug))
            with no_sync() if j < K - 1 else contextlib.nullcontext():
                with autocast():
                    out = model(x)
                if reconstruction:
                    loss = F.mse_loss(out.float(), x)
                else:
                    loss = F.cross_entropy(out.float(), y)
                (loss / K if K > 1 else loss).backward()
            if noise is not None:
                noise.after_micro_batch(j)
        if noise is not None:
            noise.after_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (s + 1) % CHECK_EVERY == 0 and diverged(loss.item()):
            status, stopped_at = "diverged", s + 1
            break
        if stop.requested(acc, every=1 if P == 1 else CHECK_EVERY, step=s + 1):
            checkpoint(s + 1)
            raise Preempted(s + 1)
        if ckpt.due(s + 1) and s + 1 < total:
            checkpoint(s + 1)
    train_time += time.perf_counter() - t0
    if status == "finished":
        record(total)
    elif history[-1]["step"] != stopped_at:
        record(stopped_at)

    metrics = final_metrics(history, status, stopped_at, order, t_cfg.batch_size, train_time)
    return RunResult(None, cfg.run_key, status, metrics, state_sha256(net), history)


def eval_row(
    tr_loss: float, tr_acc: float, te_loss: float, te_acc: float, lr: float, task: str
) -> dict[str, float]:
    """One evaluation's metrics (accuracies only for classifiers)."""
    row = {"train_loss": tr_loss, "test_loss": te_loss, "lr": lr}
    if task != "reconstruction":
        row["test_accuracy"] = te_acc
        row["train_accuracy"] = tr_acc
    return row


def final_metrics(
    history: list[dict[str, float]], status: str, stopped_at: int, order: BatchOrder,
    batch_size: int, train_time: float,
) -> dict[str, float]:  # fmt: skip
    """A run's summary metrics from its last evaluation."""
    last = history[-1]
    metrics = {
        "final_train_loss": last["train_loss"],
        "final_test_loss": last["test_loss"],
        "diverged": float(status == "diverged"),
        "steps": float(stopped_at),
        "epochs": order.epochs(stopped_at),
        "examples_per_second": stopped_at * batch_size / max(train_time, 1e-9),
    }
    measured = [h["grad_noise_scale"] for h in history if "grad_noise_scale" in h]
    if measured:
        metrics["grad_noise_scale"] = measured[-1]
    if "test_accuracy" in last:
        metrics["final_test_accuracy"] = last["test_accuracy"]
        metrics["final_train_accuracy"] = last["train_accuracy"]
    return metrics
