"""The C kernel's evaluation (sgdn_mlp_eval) against the CPU's limit: a pack's forward pass
over shared examples, as a run's evaluations make it, in GFLOP/s and as a fraction of the
fp32 multiply-add peak of one thread measured in the same process.

    python benchmarks/eval_speed.py                       # 1,024 and 8,000 examples, packs of 8
    python benchmarks/eval_speed.py --examples 2000 --pack 4

Default MLP (40-256-256-10), one thread, the best of --rounds calls.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import kernel_ab
import torch
from study_efficiency import fma_peak


def eval_seconds(lib, pack: kernel_ab.Pack, n: int, rounds: int) -> float:
    """The best of `rounds` evaluations of every member on the same n random examples."""
    dims = kernel_ab.DIMS
    x, y = torch.randn(n, dims[0]), torch.randint(0, dims[-1], (n,))
    pack.args(lib, 0.9)  # sizes the pack's workspace for the evaluation too
    W, b = pack.ptrs(pack.W), pack.ptrs(pack.b)
    sums = torch.zeros(pack.K, 2, dtype=torch.float64)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        lib.sgdn_mlp_eval(pack.K, n, len(dims) - 1, pack.c_dims, W, b, x.data_ptr(),
                          y.data_ptr(), pack.ws.data_ptr(), sums.data_ptr())  # fmt: skip
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, nargs="+", default=[1024, 8000])
    ap.add_argument("--pack", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    source = (kernel_ab.HERE / "mlp_step.c").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        lib = kernel_ab.build(source, Path(tmp) / "mlp_step.so")
        peak = fma_peak()[0]
        print(f"peak of one thread (multiply-adds): {peak / 1e9:.0f} GFLOP/s")
        dims = kernel_ab.DIMS
        per_example = 2 * sum(i * o for i, o in zip(dims[:-1], dims[1:], strict=True))
        for n in args.examples:
            pack = kernel_ab.Pack(dims, args.pack, 1)
            s = eval_seconds(lib, pack, n, args.rounds)
            rate = args.pack * n * per_example / s
            print(f"{n} examples, pack of {args.pack}: {1e3 * s:.2f} ms, "
                  f"{rate / 1e9:.0f} GFLOP/s = {rate / peak:.2f} of the peak")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
