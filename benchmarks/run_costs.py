"""Where a short run's time goes: start-up, set-up, MLflow, evaluation and training.

    python benchmarks/run_costs.py                 # a ~10 s run: MNIST-1D, default MLP, B=32
    python benchmarks/run_costs.py --steps 2000    # a shorter one

One tracked run through `train()` (the code path of `sgdnoise train` and of a sweep worker)
in a fresh temporary project with a real sqlite MLflow store, its phases timed by wrapping
the functions that do them. Start-up (interpreter, imports, MLflow client, set-up) is the
wall time of a one-step `sgdnoise train` in a fresh process (a run started from the shell
pays it every time; a sweep worker once for its life). The
sweep's own per-run work (claim, tell) is measured by benchmarks/sweep_speed.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

SPENT: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap owner.name so that its wall time adds to SPENT[label]."""
    fn: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t0
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def fresh_process_time(root: Path) -> float:
    """Wall time of a whole one-step `sgdnoise train` (tracked) in a fresh process: what a
    run started from the shell pays besides its steps and evaluations."""
    cmd = [sys.executable, "-m", "sgdnoise.cli", "train", "-P", "train.budget.value=1",
           "-P", "train.eval_points=1"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=root, capture_output=True, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-points", type=int, default=10)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import accelerate

    import sgdnoise.data.store as store
    import sgdnoise.models.build as build
    from sgdnoise import loop, nets
    from sgdnoise.config import from_dict

    timed(store, "ensure_prepared", "data: prepare check")
    timed(store, "load_prepared", "data: load to device")
    timed(build, "build_model", "model: build")
    timed(accelerate, "Accelerator", "accelerate: set-up")
    timed(loop, "start_tracking", "mlflow: create run, params, tags, config")
    timed(loop, "finish_tracking", "mlflow: metrics, final tags, end run")
    timed(nets.SingleNet, "evaluate", "evaluation (train + test sets)")

    params = {
        "data": {"name": "mnist1d"},
        "model": {"name": "mlp"},
        "train": {
            "batch_size": args.batch_size, "eval_points": args.eval_points, "threads": 1,
            "budget": {"unit": "steps", "value": args.steps}, "lr_eff": 0.25,
        },
        "tracking": {"experiment": "costs"},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="run-costs-") as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        cfg = from_dict(params)
        store.ensure_prepared(cfg.data, root)  # the dataset exists before a run, as in a study
        from sgdnoise import tracking

        tracking.client(tracking.resolve_uri(cfg, root)).search_experiments()  # migrated DB
        startup = min(fresh_process_time(root) for _ in range(2))
        SPENT.clear(), CALLS.clear()
        t0 = time.perf_counter()
        from sgdnoise.train import train

        result = train(cfg, root=root)
        total = time.perf_counter() - t0
    steps = result.metrics["steps"]
    training = steps * args.batch_size / result.metrics["examples_per_second"]
    evaluation = SPENT["evaluation (train + test sets)"]
    rows = [("fresh process: a 1-step `sgdnoise train`", startup, 1)]
    rows += [(k, v, CALLS[k]) for k, v in SPENT.items()]
    rows.append(("training steps (forward, backward, update)", training - 0.0, int(steps)))
    known = sum(v for k, v in SPENT.items()) + training
    rows.append(("other (schedule, data order, hashing, ...)", total - known, 1))
    print(f"one run: {int(steps)} steps of B={args.batch_size}, {args.eval_points} evaluation "
          f"points; train() {total:.2f} s, plus start-up {startup:.2f} s")  # fmt: skip
    whole = total + startup
    print(f"{'phase':<48} {'s':>7} {'% of run':>8} {'calls':>6}")
    for name, sec, n in rows:
        print(f"{name:<48} {sec:>7.3f} {100 * sec / whole:>7.1f}% {n:>6}")
    fixed = whole - training - evaluation
    print(
        f"fixed costs besides evaluation: {fixed:.2f} s ({100 * fixed / whole:.1f}%); "
        f"evaluation {evaluation:.2f} s ({100 * evaluation / whole:.1f}%)"
    )


if __name__ == "__main__":
    main()
