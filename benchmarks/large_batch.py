"""Large batches: whole runs through the C kernel (a pack of one) against torch's unpacked step.

    python benchmarks/large_batch.py                      # B = 512, 1024, 2048, 8000
    python benchmarks/large_batch.py --batch-sizes 4096 --rounds 3

The default MLP on MNIST-1D, one thread per process, no tracking; each run trains on 200,000
examples (at least 40 steps) and evaluates as the study's runs do (11 times). Two processes run
the same path at once, as a sweep's two workers do (they share the L3 cache), and the paths
alternate round by round (this machine's speed drifts). Printed: µs per example-step of each
process (everything the run does, evaluations included, over its steps × B), per path and
round: whether the kernel still pays at that B.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import projects

HERE = Path(__file__).parent

# One process: train one run of batch size B through `path` and print µs per example-step.
CHILD = """
import sys, time, torch
from pathlib import Path
from sgdnoise.allocator import keep_freed_memory
from sgdnoise.config import from_dict
import sgdnoise.pack as pack
keep_freed_memory()
torch.set_num_threads(1)
path, B, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
if path == "torch":
    pack.native_step = lambda cfg, on_gpu: False
steps = max(40, 200_000 // B)
cfg = from_dict({"train": {"batch_size": B, "lr_eff": 2.0, "threads": 1,
                           "budget": {"unit": "steps", "value": steps}}})
pack.train_pack([cfg], root=root, track=False)  # warm-up: the kernel's build, the data
t0 = time.perf_counter()
pack.train_pack([cfg], root=root, track=False)
print(f"{(time.perf_counter() - t0) / (steps * B) * 1e6:.2f}")
"""


def pair(path: str, B: int, root: Path) -> list[float]:
    """Two processes training the same run through `path` at once: their µs per example-step."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, path, str(B), str(root)],
            stdout=subprocess.PIPE,
            text=True,
            env=projects.clean_env(),
        )  # fmt: skip
        for _ in range(2)
    ]
    return [float(p.communicate()[0].split()[-1]) for p in procs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 1024, 2048, 8000])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="large-batch-") as tmp:
        root = Path(tmp)
        projects.write_project(root, {})
        print("µs per example-step, two processes at once (kernel: a pack of one through the "
              "C kernel; torch: train()'s unpacked step)")  # fmt: skip
        for B in args.batch_sizes:
            t0 = time.perf_counter()
            cells = []
            for r in range(args.rounds):
                for path in ("kernel", "torch") if r % 2 == 0 else ("torch", "kernel"):
                    cells.append(f"{path} {' '.join(f'{t:.2f}' for t in pair(path, B, root))}")
            print(f"B = {B:>5}: " + "; ".join(cells) + f"  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
