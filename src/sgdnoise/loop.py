"""The run loop: one run, or a pack of K runs, trained step by step by the same code.

`train()` (one run, any number of processes) and `train_pack()` (K runs of one group in one
process) differ only in what they hand this loop: a `SingleNet` or a `StackedNet`
(sgdnoise.nets) and their members. Everything else is here, once, for both: the batch
order and augmentation of each member, gradient accumulation, the gradient-noise window,
evaluation and recording, the divergence check, checkpoints and resume, SIGTERM, and the
members' MLflow runs. A member that diverges is evaluated, recorded and reported at once,
and the pack goes on without it.

Exactness: every update is the mean gradient over the B examples of the global batch, which
depends only on (dataset, seed, B); a micro-batch's mean loss is divided by the number of
micro-batches and DDP averages over processes (docs/protocol.md).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgdnoise import contract as C
from sgdnoise import tracking
from sgdnoise.checkpoint import Checkpointer
from sgdnoise.config import Config, accumulation_steps
from sgdnoise.data.augment import apply_crop_flip, crop_flip_params
from sgdnoise.data.order import BatchOrder, derived_seed
from sgdnoise.nets import state_sha256
from sgdnoise.optim import lr_table
from sgdnoise.theory.noise_scale import NoiseWindow

# Divergence is checked every this many steps (a host sync; cheap on CPU, not free on GPU).
CHECK_EVERY = 16
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after a checkpoint; run it again


@dataclass
class RunResult:
    run_id: str | None
    run_key: str
    status: str  # contract.STATUS_FINISHED | contract.STATUS_DIVERGED
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


OnDone = Callable[[int, RunResult], None]


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written at this step."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM at step {step}; checkpoint written")
        self.step = step


class StopFlag:
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

    def requested(self, acc: Any, step: int) -> bool:
        if acc.num_processes == 1:
            return self.flag
        if step % CHECK_EVERY:
            return False
        flag = torch.tensor([float(self.flag)], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)


def total_steps(cfg: Config, n_train: int) -> int:
    budget = cfg.train.budget
    if budget.unit == "steps":
        return int(budget.value)
    return max(1, round(budget.value * n_train / cfg.train.batch_size))


def eval_steps(total: int, points: int) -> list[int]:
    """`points` evenly spaced evaluation steps from 0, plus the final step."""
    return sorted({round(i * total / points) for i in range(points)} | {total})


EvalSets = tuple[Any, torch.Tensor, Any, torch.Tensor]


def eval_sets(data: Any, subset: int | None) -> tuple[EvalSets, EvalSets]:
    """(full, intermediate) evaluation sets, each (train x, train y, test x, test y). The
    intermediate ones are the first `subset` examples of a fixed permutation of each split
    (the same for every run and seed), or the full sets when `subset` is None."""
    full = (data.train_x, data.train_y, data.test_x, data.test_y)
    if subset is None:
        return full, full

    def take(x: Any, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
        if subset >= len(y):
            return x, y
        g = torch.Generator().manual_seed(derived_seed("eval_subset", len(y)))
        idx = torch.randperm(len(y), generator=g)[:subset].sort().values.to(y.device)
        return x[idx], y[idx]

    return full, (*take(data.train_x, data.train_y), *take(data.test_x, data.test_y))


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


def bn_batch(cfg: Config) -> int | str:
    """The number of examples each normalization statistic is computed over."""
    if cfg.model.norm == "ghost":
        return min(cfg.model.ghost_batch_size, cfg.train.micro_batch_size)
    if cfg.model.norm == "batch":
        return cfg.train.micro_batch_size
    return "none"


def start_tracking(
    cfg: Config, root: Path, derived: dict[str, Any], checksum: str, device: str,
    processes: int, parent_run_id: str | None, extra_tags: dict[str, str] | None,
    auto_flush: bool = True,
) -> tracking.RunTracker:  # fmt: skip
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


def finish_tracking(tracker: tracking.RunTracker | None, result: RunResult) -> None:
    if tracker is None:
        return
    tags = {C.STATUS: result.status, C.STATE_SHA256: result.state_sha256}
    # grad_noise_scale is a curve metric that the evaluations already logged: a second
    # value at the last step would be a duplicate row in its history (or not, when both
    # land in the same millisecond and MLflow merges them), moving medians over windows.
    final = {k: v for k, v in result.metrics.items() if k != "grad_noise_scale"}
    tracker.finish(final, tags, "FINISHED")
    result.run_id = tracker.run_id


@dataclass
class Member:
    """One run of the loop: its config, batch order, learning rates, checkpoints, MLflow
    run, and what it has measured so far."""

    index: int  # position in the caller's list of configs
    cfg: Config
    order: BatchOrder
    lrs: list[float]
    ckpt: Checkpointer
    tracker: tracking.RunTracker | None
    history: list[dict[str, float]] = field(default_factory=list)
    initial_loss: float = math.inf
    train_time: float = 0.0  # before this process resumed it
    last_full: bool = False  # whether its last evaluation used the full sets


@dataclass
class Setup:
    """What the members of one loop share."""

    root: Path
    acc: Any  # accelerate.Accelerator: processes, device, reductions
    data: Any  # sgdnoise.data.store.InMemoryData
    task: str  # "classification" | "reconstruction"
    augment: str | None
    total: int
    parent_run_id: str | None
    track: bool
    keep_state: bool


def members_for(
    s: Setup, cfgs: Sequence[Config], ckpts: Sequence[Checkpointer],
    resumes: Sequence[dict[str, Any] | None], tags: Sequence[dict[str, str] | None],
    packed: bool, kernel: str | None = None,
) -> list[Member]:  # fmt: skip
    """A Member per config: its order (shared by members of one seed), learning rates,
    checkpointer (which loaded `resumes`), and MLflow run (resumed from its checkpoint, or
    started on the main process with the run's derived params; a pack's `kernel`, what
    computes its steps, among them)."""
    orders: dict[int, BatchOrder] = {}
    device, P = s.acc.device, s.acc.num_processes
    members = []
    for i, (cfg, ckpt, resume) in enumerate(zip(cfgs, ckpts, resumes, strict=True)):
        seed, B = cfg.train.seed, cfg.train.batch_size
        if seed not in orders:
            orders[seed] = BatchOrder(s.data.n_train, B, seed, device)
        tracker = None
        if s.track and s.acc.is_main_process and resume is not None and resume.get("run_id"):
            tracker = tracking.RunTracker(cfg, s.root, auto_flush=False)
            tracker.resume(resume["run_id"], tags[i])
        elif s.track and s.acc.is_main_process:
            derived = {
                "derived.lr": cfg.lr, "derived.accumulation": accumulation_steps(cfg, P),
                "derived.processes": P, "derived.total_steps": s.total,
                "derived.n_train": s.data.n_train, "derived.full_batch": B == s.data.n_train,
                "derived.bn_batch": bn_batch(cfg),
            }  # fmt: skip
            if packed:
                derived["derived.pack"] = len(cfgs)
                derived["derived.step_kernel"] = kernel
            tracker = start_tracking(
                cfg, s.root, derived, s.data.checksum, str(device), P, s.parent_run_id,
                tags[i], auto_flush=not ckpt.enabled,
            )  # fmt: skip
        lrs = lr_table(cfg.train.schedule, cfg.lr, s.total, cfg.train.warmup)
        m = Member(i, cfg, orders[seed], lrs, ckpt, tracker)
        if resume is not None:
            m.history = list(resume["history"])
            m.initial_loss = float(resume["initial_loss"])
            m.train_time = float(resume["train_time"])
        members.append(m)
    return members


class Loop:
    """Train `members` on `net` from step `start` (they all stand there) to the budget."""

    def __init__(self, s: Setup, net: Any, members: list[Member], start: int,
                 noise: list[dict[str, Any]] | None, on_done: OnDone,
                 progress: Any = None):  # fmt: skip
        """`progress`: a sgdnoise.progress.Progress for the first member (one run on the
        command line), or None."""
        self.s, self.net, self.members, self.start, self.on_done = s, net, members, start, on_done
        self.progress = progress
        cfg = members[0].cfg
        t = cfg.train
        self.acc, self.autocast = s.acc, s.acc.autocast
        self.P, self.rank = s.acc.num_processes, s.acc.process_index
        self.B, self.share = t.batch_size, t.batch_size // self.P
        self.k = accumulation_steps(cfg, self.P)  # micro-batches per step and process
        self.micro = t.micro_batch_size
        self.factor = t.divergence_factor
        self.evals = eval_steps(s.total, t.eval_points)
        self.full_sets, self.curve_sets = eval_sets(s.data, t.eval_subset)
        self.window = None
        if t.noise_scale and self.k > 1:
            device = s.data.train_y.device
            self.window = NoiseWindow(net.size, self.k, self.micro, self.B, self.P, device)
            if noise is not None:
                self.window.load(noise)
        self.seeds: list[int] = []
        self.orders: list[BatchOrder] = []
        self.of_member = torch.zeros(0, dtype=torch.long)
        self.elapsed, self.t0 = 0.0, 0.0

    # ---- the loop ----
    def run(self) -> None:
        next_eval = bisect.bisect_left(self.evals, self.start)
        stop = StopFlag()
        self.net.train(True)
        self.t0 = time.perf_counter()
        try:
            with stop.installed():
                s = self.start
                while s < self.s.total:
                    if s == self.evals[next_eval]:
                        next_eval += 1
                        if not self._evaluate(s):
                            return
                    # Steps [s, e) in one go: e is s + 1, or the next step at which the loop
                    # has something to do when the kernel can take several steps per call.
                    e = self._chunk_end(s, self.evals[next_eval])
                    losses = self._steps(s, e) if e > s + 1 else self._step(s)
                    s = e
                    if self.progress is not None and s % CHECK_EVERY == 0:
                        self.progress.update(s)
                    if s % CHECK_EVERY == 0 and (gone := self._diverged(losses.tolist())):
                        self._pause()
                        self._retire(gone, "diverged", s)
                        if not self.members:
                            return
                        self._resume()
                    if stop.requested(self.acc, s):
                        self._checkpoint(s)
                        raise Preempted(s)
                    if self.members[0].ckpt.due(s) and s < self.s.total:
                        self._checkpoint(s)
                self._pause()
                self._record(self.s.total, full=True)
                self._retire(list(range(len(self.members))), "finished", self.s.total)
        except BaseException as e:
            status = "KILLED" if isinstance(e, Preempted) else "FAILED"
            for m in self.members:
                if m.tracker:
                    m.tracker.fail(status)
            raise
        finally:
            if self.progress is not None:
                self.progress.close()

    def _pause(self) -> None:
        self.elapsed += time.perf_counter() - self.t0

    def _resume(self) -> None:
        self.t0 = time.perf_counter()

    def _evaluate(self, s: int) -> bool:
        """An evaluation step: record, judge divergence; False when no member is left."""
        self._pause()
        values = self._record(s)
        if s == 0:
            for m, v in zip(self.members, values, strict=True):
                m.initial_loss = v if math.isfinite(v) else math.inf
        if gone := self._diverged(values):
            self._retire(gone, "diverged", s)
            if not self.members:
                return False
        self._resume()
        return True

    # ---- optimizer steps ----
    def _chunk_end(self, s: int, next_eval: int) -> int:
        """Where a call that starts at step s ends: s + 1, or through the C kernel's
        multi-step call (one process, one micro-batch, no augmentation, no noise window)
        the first later step that needs the loop: a divergence check, an evaluation, a
        checkpoint due by steps, the end. A SIGTERM is acted on there (at most CHECK_EVERY
        steps later)."""
        if not self.multi_step:
            return s + 1
        e = min(next_eval, (s // CHECK_EVERY + 1) * CHECK_EVERY)
        due = self.members[0].ckpt.next_due()
        return min(e, due) if due is not None and due > s else e

    @property
    def multi_step(self) -> bool:
        return (getattr(self.net, "native", None) is not None and self.k == 1 and self.P == 1
                and self.window is None and self.s.augment is None
                and isinstance(self.s.data.train_x, torch.Tensor))  # fmt: skip

    def _steps(self, s: int, e: int) -> torch.Tensor:
        """Steps [s, e) of every member in one call of the C kernel; the last step's losses."""
        self._refresh_seeds()
        streams = [order.batches(s, e) for order in self.orders]
        lrs = torch.tensor([m.lrs[s:e] for m in self.members], dtype=torch.float32).T
        losses = self.net.steps(self.s.data.train_x, self.s.data.train_y, streams,
                                self.of_member.tolist(), lrs)  # fmt: skip
        return losses[-1]

    def _step(self, s: int) -> torch.Tensor:
        """Forward, backward and update for every member; the last micro-batch's losses."""
        X, Y = self.s.data.train_x, self.s.data.train_y
        idx, aug = self._batches(s)
        losses = torch.zeros(0)
        # Micro-batches the C kernel adds up itself, in one call after the loop.
        summing = self.k > 1 and getattr(self.net, "native", None) is not None
        summed: list[tuple[torch.Tensor, torch.Tensor]] = []
        for j in range(self.k):
            mb = idx[:, j * self.micro : (j + 1) * self.micro] if self.k > 1 else idx
            x, y = X[mb.reshape(-1)], Y[mb].reshape(-1)
            if aug is not None:
                lo = self.rank * self.share + j * self.micro
                x = apply_crop_flip(x, *(torch.cat([a[i][lo : lo + self.micro] for a in aug])
                                         for i in range(3)))  # fmt: skip
            if summing:
                summed.append((x, y))
                continue
            with self.net.accumulating(j < self.k - 1):
                losses = self.net.losses(x, y, self.autocast)
                self.net.backward(losses, self.k)
            if self.window is not None:
                self.window.after_micro_batch(self.net.grads(), j)
        if summed:
            return self._summed_step(s, summed)
        if self.window is not None:
            self.window.after_step(self.net.grads())
        self.net.step([m.lrs[s] for m in self.members])
        return losses

    def _summed_step(self, s: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Step s's micro-batches (member-major each) in one call of the C kernel (one
        process): each micro-batch's gradient, for the noise window its squared norm, their
        mean, the update; the last micro-batch's losses."""
        K = len(self.members)
        x = torch.stack([x.reshape(K, self.micro, -1) for x, _ in parts], 1)
        y = torch.stack([y.reshape(K, self.micro) for _, y in parts], 1)
        losses, sq = self.net.accumulated_step(x.reshape(K * self.k * self.micro, -1),
                                               y.reshape(-1), self.k,
                                               [m.lrs[s] for m in self.members])  # fmt: skip
        if self.window is not None:
            self.window.add_step(sq[:, 0], self.k, sq[:, 1])
        return losses

    def _batches(self, s: int) -> tuple[torch.Tensor, list[tuple] | None]:
        """(K, B / processes) example indices of step s, one row per member (members of one
        seed share theirs), and per member the crop/flip draws of the global batch."""
        self._refresh_seeds()
        rows = [order.global_batch(s) for order in self.orders]
        if self.P > 1:
            rows = [r[self.rank * self.share : (self.rank + 1) * self.share] for r in rows]
        idx = torch.stack(rows)[self.of_member]
        if self.s.augment is None:
            return idx, None
        # Drawn for the whole global batch, then sliced: a sample's augmentation does not
        # depend on how the batch is split over micro-batches and processes.
        device = self.s.data.train_x.device
        per_seed = [crop_flip_params(self.B, torch.Generator(device=device).manual_seed(
            derived_seed("aug", seed, s))) for seed in self.seeds]  # fmt: skip
        return idx, [per_seed[i] for i in self.of_member.tolist()]

    def _refresh_seeds(self) -> None:
        """The members' distinct seeds and data orders (after a start or a retirement)."""
        if not self.seeds:
            by_seed = {m.cfg.train.seed: m.order for m in self.members}
            self.seeds = sorted(by_seed)
            self.orders = [by_seed[seed] for seed in self.seeds]
            self.of_member = torch.tensor(
                [self.seeds.index(m.cfg.train.seed) for m in self.members], device=self.acc.device
            )

    def _diverged(self, values: list[float]) -> list[int]:
        """Positions of the members whose loss is non-finite or above divergence_factor ×
        their initial loss; every process takes the same decision."""
        bad = [not math.isfinite(v) or v > self.factor * m.initial_loss
               for m, v in zip(self.members, values, strict=True)]  # fmt: skip
        if self.P > 1:
            flags = torch.tensor(bad, dtype=torch.float32, device=self.acc.device)
            bad = (self.acc.reduce(flags, reduction="sum") > 0).tolist()
        return [p for p, b in enumerate(bad) if b]

    # ---- measuring and recording ----
    def _record(self, step: int, full: bool = False) -> list[float]:
        """Evaluate every member (on the full sets when `full`, else the curves' sets), log
        it; return the training losses."""
        xs = self.full_sets if full else self.curve_sets
        tr = self.net.evaluate(xs[0], xs[1], self.autocast)
        te = self.net.evaluate(xs[2], xs[3], self.autocast)
        gns = self.window.estimates() if self.window is not None else [None] * len(tr)
        for m, a, b, g in zip(self.members, tr, te, gns, strict=True):
            row = eval_row(a[0], a[1], b[0], b[1], m.lrs[min(step, self.s.total - 1)],
                           self.s.task)  # fmt: skip
            if g is not None:
                row["grad_noise_scale"] = g
            self._append(m, step, row, full or self.full_sets is self.curve_sets)
        if self.progress is not None and self.acc.is_main_process:
            self.progress.evaluated(step, self.members[0].history[-1])
        return [a[0] for a in tr]

    def _append(self, m: Member, step: int, row: dict[str, float], full: bool) -> None:
        if m.history and m.history[-1]["step"] == step:
            # The final evaluation of a step already evaluated on the curves' subset.
            if "grad_noise_scale" in m.history[-1]:
                row["grad_noise_scale"] = m.history[-1]["grad_noise_scale"]
            m.history.pop()
        m.history.append({"step": step, **row})
        m.last_full = full
        if m.tracker:
            m.tracker.log_metrics(row, step)

    def _retire(self, gone: list[int], status: str, step: int) -> None:
        """Finish the members at positions `gone` (diverged, or all at the end): their final
        evaluation on the full sets, result, MLflow run, checkpoints; then drop them."""
        main = self.acc.is_main_process
        for pos in gone:
            m = self.members[pos]
            if m.history[-1]["step"] != step or not m.last_full:
                xs = self.full_sets
                a = self.net.evaluate_member(pos, xs[0], xs[1], self.autocast)
                b = self.net.evaluate_member(pos, xs[2], xs[3], self.autocast)
                lr = m.lrs[min(step, self.s.total - 1)]
                self._append(m, step, eval_row(*a, *b, lr, self.s.task), True)
            metrics = final_metrics(m.history, status, step, m.order, self.B,
                                    m.train_time + self.elapsed)  # fmt: skip
            state = self.net.member_state(pos)
            result = RunResult(None, m.cfg.run_key, status, metrics, state_sha256(state),
                               m.history, is_main=main)  # fmt: skip
            finish_tracking(m.tracker, result)
            if m.ckpt.enabled and main:
                m.ckpt.clear()
            if self.s.keep_state:
                result.state = {k: v.detach().cpu().clone() for k, v in state.items()}
            self.on_done(m.index, result)
        keep = [p for p in range(len(self.members)) if p not in gone]
        if keep and len(keep) < len(self.members):
            self.net.select(keep)
            if self.window is not None:
                self.window.select(keep)
        self.members = [self.members[p] for p in keep]
        self.seeds = []

    def _checkpoint(self, step: int) -> None:
        """At an optimizer-step boundary: every member's state and metrics so far, then its
        MLflow metrics flushed (a resumed run never logs a step twice)."""
        if self.acc.is_main_process:
            elapsed = self.elapsed + time.perf_counter() - self.t0
            for pos, m in enumerate(self.members):
                m.ckpt.save(step, {
                    "step": step,
                    "model": self.net.member_state(pos),
                    "optimizer": self.net.optimizer_state(pos, m.lrs[min(step, self.s.total - 1)]),
                    "history": m.history,
                    "initial_loss": m.initial_loss,
                    "train_time": m.train_time + elapsed,
                    "run_id": m.tracker.run_id if m.tracker else None,
                    "noise": self.window.state(pos) if self.window is not None else {},
                })  # fmt: skip
                if m.tracker:
                    m.tracker.flush()
        self.acc.wait_for_everyone()
