"""Time per optimizer step: `sgdnoise train` against a bare PyTorch loop, and where
Accelerate's default wrappers spend their time.

Same model (the default MLP), data (MNIST-1D, on the device), batch order and optimizer in
every variant; one thread; each variant timed in rounds, interleaved, median taken, so the
ratios hold on a noisy shared machine. Usage:

    python benchmarks/step_time.py [--batch-sizes 32 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sgdnoise.config import from_dict
from sgdnoise.data.order import BatchOrder, derived_seed
from sgdnoise.data.store import load
from sgdnoise.models.build import build_model
from sgdnoise.train import train


def _setup(cfg, root: Path):
    data = load(cfg.data, "cpu", root)
    torch.manual_seed(derived_seed("init", cfg.train.seed))
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    # The baselines use torch's own SGD (what a plain PyTorch loop would); sgdnoise's
    # HeavyBall does the same arithmetic (tests/test_optim.py).
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.train.weight_decay, foreach=True)  # fmt: skip
    return data, model, opt, BatchOrder(data.n_train, cfg.train.batch_size, 0)


def bare(cfg, root: Path, steps: int) -> float:
    data, model, opt, order = _setup(cfg, root)
    t0 = time.perf_counter()
    for s in range(steps):
        idx = order.global_batch(s)
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def accelerate_default(cfg, root: Path, steps: int, level: int) -> float:
    """level 1: prepare(model); 2: + prepared optimizer; 3: + accumulate() and backward()."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    data, model, opt, order = _setup(cfg, root)
    model = acc.prepare_model(model)
    if level >= 2:
        opt = acc.prepare_optimizer(opt)
    t0 = time.perf_counter()
    for s in range(steps):
        idx = order.global_batch(s)
        x, y = data.train_x[idx], data.train_y[idx]
        if level >= 3:
            with acc.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
        else:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def ours(cfg, root: Path, steps: int) -> float:
    res = train(cfg, root=root, track=False)
    return cfg.train.batch_size / res.metrics["examples_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1024])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="steps per timing (default by B)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="sgdnoise-bench-"))
    variants = {
        "bare": bare,
        "sgdnoise train": ours,
        "acc: prepare(model)": lambda c, r, n: accelerate_default(c, r, n, 1),
        "acc: + optimizer": lambda c, r, n: accelerate_default(c, r, n, 2),
        "acc: + accumulate/backward": lambda c, r, n: accelerate_default(c, r, n, 3),
    }
    print(f"{'B':>6} | {'variant':<28} | {'ms/step':>8} | {'bare/this':>9}")
    for B in args.batch_sizes:
        steps = args.steps or (3000 if B <= 64 else 400)
        raw = {
            "data": {"name": "mnist1d"},
            "train": {
                "batch_size": B,
                "budget": {"unit": "steps", "value": steps},
                "eval_points": 1,
                "threads": 1,
                "schedule": "constant",
            },
        }
        cfg = from_dict(raw, num_processes=1)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(fn(cfg, root, steps))
        base = statistics.median(times["bare"])
        for name, ts in times.items():
            t = statistics.median(ts)
            print(f"{B:>6} | {name:<28} | {t * 1e3:>8.3f} | {base / t:>9.3f}")


if __name__ == "__main__":
    main()
