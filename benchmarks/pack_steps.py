"""Packing in one process, without the sweep: runs per second of K members trained as one
pack vs the same runs one by one, for MLPs on MNIST-1D, one thread.

    python benchmarks/pack_steps.py                  # widths 32 and 256 (default), B = 16, 64

32 configurations per case (learning rates 0.01 … 0.32, seeds 0 and 1), 400 steps each, one
evaluation at each end, no tracking: what packing does to the training loop itself. The
sweep-level numbers (claims, MLflow runs, the skip rule) are benchmarks/pack_speed.py's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import projects
import torch

from sgdnoise.config import from_dict
from sgdnoise.pack import train_pack

RUNS = 32
STEPS = 400


def configs(width: int | None, batch_size: int, runs: int = RUNS, steps: int = STEPS) -> list:
    """`runs` momentum runs (learning rates 0.01, 0.02, ...; seeds 0 and 1) of `steps` steps."""
    return [
        from_dict(
            {
                "data": {"name": "mnist1d", "num_samples": 4000},
                "model": {"name": "mlp", "width": width},
                "train": {
                    "optimizer": "momentum",
                    "lr_eff": 0.01 * (k + 1),
                    "seed": k % 2,
                    "batch_size": batch_size,
                    "budget": {"unit": "steps", "value": steps},
                    "eval_points": 1,
                    "threads": 1,
                },
            }
        )  # fmt: skip
        for k in range(runs)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--packs", type=int, nargs="+", default=[4, 8, 16, 32])
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="pack-steps-") as tmp:
        root = Path(tmp)
        projects.write_project(root, {"data": {"name": "mnist1d", "num_samples": 4000}})
        print(f"{'width':>6} {'B':>5} " + " ".join(f"{'K=' + str(k):>7}" for k in args.packs)
              + "   (runs per second vs one by one)")  # fmt: skip
        for width in args.widths:
            for B in args.batch_sizes:
                cfgs = configs(width, B)
                train_pack(cfgs[:2], root=root, track=False)  # warm-up
                rate = {}
                for K in [1, *args.packs]:
                    t0 = time.perf_counter()
                    for i in range(0, RUNS, K):
                        train_pack(cfgs[i : i + K], root=root, track=False)
                    rate[K] = RUNS / (time.perf_counter() - t0)
                print(f"{width:>6} {B:>5} "
                      + " ".join(f"{rate[k] / rate[1]:>6.2f}x" for k in args.packs), flush=True)  # fmt: skip
                # µs per member-step, everything a run does included (set-up, evaluations).
                micro = {k: 1e6 / (rate[k] * STEPS) for k in [1, *args.packs]}
                print(f"{'':>12} µs per member-step: one by one {micro[1]:.0f}; "
                      + "; ".join(f"K={k} {micro[k]:.0f}" for k in args.packs), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
