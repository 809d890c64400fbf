"""`train()`: one run, any number of processes; B = micro_batch × accumulation × processes.

Accelerate sets up the processes (torchrun / accelerate launch), the device, DDP and
autocast; the step itself is sgdnoise.loop's, written out rather than through
`accelerator.accumulate` and a prepared optimizer: those wrappers cost about a third of a
small model's step on CPU (benchmarks/step_time.py), and writing it out keeps the exactness
argument visible (docs/protocol.md). The noisy quadratic model runs its exact theory instead.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sgdnoise.allocator import keep_freed_memory
from sgdnoise.checkpoint import Checkpointer
from sgdnoise.config import Config, check_batch_size
from sgdnoise.data.order import derived_seed
from sgdnoise.loop import (
    EXIT_PREEMPTED,
    Loop,
    Preempted,
    RunResult,
    Setup,
    eval_steps,
    finish_tracking,
    members_for,
    start_tracking,
    total_steps,
)
from sgdnoise.optim import lr_table, make_optimizer
from sgdnoise.paths import project_root

__all__ = ["EXIT_PREEMPTED", "Preempted", "RunResult", "train", "total_steps"]


def threads(cfg: Config, local_processes: int) -> int:
    """Intra-op threads: train.threads, else the user's (or a sweep worker's)
    $OMP_NUM_THREADS, else the cores shared among the local processes."""
    if cfg.train.threads:
        return cfg.train.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, local_processes))


def accelerator(cfg: Config) -> Any:
    """Processes, device and autocast for cfg (the CPU unless CUDA is asked for or there)."""
    from accelerate import Accelerator

    t = cfg.train
    want_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    return Accelerator(cpu=not want_cuda, mixed_precision="bf16" if t.precision == "bf16" else "no")


def task_of(cfg: Config, meta: dict[str, Any]) -> str:
    """Reconstruction for the autoencoder and for data without labels (user data)."""
    if cfg.model.name == "autoencoder" or meta.get("task") == "reconstruction":
        return "reconstruction"
    return "classification"


def needs_check(cfg: Config) -> bool:
    """Whether the model must be checked against the data before any work: only a user model
    or user data can fail there (built-in pairs are checked by config)."""
    from sgdnoise.data.tensors import is_user_data
    from sgdnoise.usercode import is_import_path

    return is_import_path(cfg.model.name) or is_user_data(cfg.data.name)


def preflight(cfg: Config, root: Path) -> None:
    """Everything that can be wrong with cfg on its data, writing nothing: B against the
    training set, and a user model or user data built and run once (models.check)."""
    from sgdnoise.data.store import describe

    facts = describe(cfg.data, root)
    check_batch_size(cfg, facts.n_train)
    if needs_check(cfg):
        from sgdnoise.models.check import check_model

        task = task_of(cfg, {"task": facts.task})
        check_model(cfg.model, facts.input_shape, facts.num_classes, task)


def augmentation(data: Any) -> str | None:
    augment = data.meta.get("augment")
    if augment not in (None, "crop_flip"):
        raise ValueError(f"unknown augmentation {augment!r} in data meta.json")
    return augment


def train(
    cfg: Config,
    *,
    root: Path | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, str] | None = None,
    track: bool = True,
    keep_state: bool = False,
    progress: bool = False,
) -> RunResult:
    """Train one configuration; log it to MLflow on the main process; return its result.
    `progress`: show it on stderr (a bar on a terminal, else a line per evaluation)."""
    from sgdnoise.data.store import load
    from sgdnoise.models.build import build_model
    from sgdnoise.nets import SingleNet

    root = root or project_root()
    if cfg.data.name == "nqm":
        return _train_nqm(cfg, root, parent_run_id, extra_tags, track)
    keep_freed_memory()
    acc = accelerator(cfg)
    P = acc.num_processes
    torch.set_num_threads(threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", P))))
    with acc.main_process_first():
        # Bad input fails before anything is written (the data folder included).
        preflight(cfg, root)
        data = load(cfg.data, acc.device, root)
    task, augment = task_of(cfg, data.meta), augmentation(data)

    torch.manual_seed(derived_seed("init", cfg.train.seed))
    model = build_model(cfg.model, tuple(data.input_shape), data.num_classes).to(acc.device)
    optimizer = make_optimizer(model, cfg)
    ckpt = Checkpointer(cfg, root, scope=parent_run_id)
    resume = ckpt.load_latest() if ckpt.enabled else None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        print(f"resuming {cfg.run_key} from step {resume['step']}", file=sys.stderr)
    net = SingleNet(model, optimizer, acc, task, cfg.train.eval_batch_size)
    setup = Setup(root, acc, data, task, augment, total_steps(cfg, data.n_train), parent_run_id,
                  track, keep_state)  # fmt: skip
    members = members_for(setup, [cfg], [ckpt], [resume], [extra_tags], packed=False)
    results: list[RunResult] = []
    noise = [resume["noise"]] if resume is not None and resume.get("noise") else None
    start = int(resume["step"]) if resume is not None else 0
    bar = None
    if progress and acc.is_main_process:
        from sgdnoise.progress import Progress

        bar = Progress(setup.total, start, cfg.train.batch_size)
    Loop(setup, net, members, start, noise, lambda i, r: results.append(r), bar).run()
    return results[0]


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
        tracker = start_tracking(
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
    finish_tracking(tracker, result)
    return result
