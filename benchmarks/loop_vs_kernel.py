"""What the training loop adds to the C kernel: a pack trained through `train_pack` (no
tracking) against the kernel's multi-step call alone, alternated, µs per example-step.

    python benchmarks/loop_vs_kernel.py                      # B = 4 and 64, packs of 4 and 8
    python benchmarks/loop_vs_kernel.py --batch-sizes 8 --rounds 3

The loop's figure is its own clock (each run's examples per second: the training steps
with the loop's Python between the kernel's calls, its evaluations excluded), divided by
the pack's members; the kernel's is benchmarks/kernel_ab.py's timing of the same source
(packs of 8, calls of 16 steps). Default MLP (40-256-256-10) on MNIST-1D, momentum, one
thread. This machine's speed drifts, so the two alternate and each prints its range.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import kernel_ab
import projects
import torch
from pack_steps import configs

from sgdnoise.config import Config
from sgdnoise.pack import train_pack


def loop_time(root: Path, cfgs: list[Config]) -> float:
    """µs per example-step of one member, by the loop's own clock."""
    run = train_pack(cfgs, root=root, track=False)[0]
    return 1e6 / run.metrics["examples_per_second"] / len(cfgs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 64])
    ap.add_argument("--packs", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    source = (Path(__file__).parents[1] / kernel_ab.SOURCE).read_text()
    with tempfile.TemporaryDirectory(prefix="loop-vs-kernel-") as tmp:
        root = Path(tmp)
        lib = kernel_ab.build(source, root / "kernel.so")
        projects.write_project(root, {"data": {"name": "mnist1d", "num_samples": 4000}})
        for B in args.batch_sizes:
            loops: dict[int, list[float]] = {K: [] for K in args.packs}
            kernel: list[float] = []
            for _ in range(args.rounds):
                kernel += kernel_ab.timing([lib], B, 8, 3)[0]
                for K in args.packs:
                    loops[K].append(loop_time(root, configs(None, B, K, args.steps)))
            print(f"B = {B}: kernel {min(kernel):.2f}–{max(kernel):.2f}; "
                  + "; ".join(f"loop, pack of {K}: {min(v):.2f}–{max(v):.2f}"
                              for K, v in loops.items())
                  + " (µs per example-step)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
