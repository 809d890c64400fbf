"""The MLP step's C kernel of a git revision against the working tree's: the same bits, and
how fast.

    python benchmarks/kernel_ab.py --base 048430f                   # B = 4 ... 1024, packs of 8
    python benchmarks/kernel_ab.py --base HEAD~1 --batch-sizes 4 128 --rounds 7

Both sources of src/sgdnoise/native/mlp_step.c (`git show <base>:...` and the file on disk)
are compiled with the flags sgdnoise uses and loaded side by side. First, the bits: a few
steps of heavy ball and of plain SGD, then a call of several steps, then an evaluation, on
several layer shapes and batch sizes (the one-pass backward, the blocked one, chunked
batches, padded rows, output layers of 8 to 15 columns), each output
compared with torch.equal; a kernel change that is meant to keep the arithmetic must print
"same bits" everywhere. Then the speed: sgdn_mlp_steps of a pack of the default MLP
(40-256-256-10), 16 steps a call as the training loop makes them, one thread, the two
kernels alternating round by round (this machine's speed drifts); printed, per B, the best
and the median round of each in µs per example-step and their ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sgdnoise.models.native_mlp import MIN_MICRO
from sgdnoise.native import CONTRACT, FLAGS, HERE, SIGNATURES

SOURCE = "src/sgdnoise/native/mlp_step.c"
DIMS = (40, 256, 256, 10)
# (layer widths, batch sizes): every backward path and buffer layout the kernel has.
SHAPES = [
    (DIMS, (1, 4, 8, 9, 16, 40, 64, 128, 129, 300)),
    ((256, 100, 64, 10), (4, 13, 70, 200)),
    ((784, 96, 7, 3), (5, 40, 257)),
    # Output layers of 8 to 15 columns on inputs that are not whole vectors; one layer alone.
    ((12, 13, 9), (1, 3, 6, 8, 11, 130)),
    ((30, 100, 15), (2, 5, 8, 9, 40)),
    ((50, 8), (4, 7, 20, 300)),
    # Layers of 16 to 31 columns and batches of 16 to 33 rows: with AVX-512, strips of two
    # vectors of 16 that overlap.
    ((20, 24, 17, 10), (4, 17, 33)),
    # A hidden layer of 24 columns (a group of 16 and one of 8) whose input gradient the
    # one-pass backward computes, on partial and whole blocks of 4 rows, in one block of 8.
    ((20, 40, 24, 10), (3, 4, 6, 8)),
]


def build(source: str, out: Path, extra: tuple[str, ...] = ()) -> Any:
    """The kernel of `source` built as sgdnoise builds it (plus `extra` compiler flags)."""
    src = out.with_suffix(".c")
    src.write_text(source)
    cmd = ["cc", *FLAGS, CONTRACT["mlp_step"], *extra, "-o", str(out), str(src), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(out))
    for fn, (argtypes, restype) in SIGNATURES["mlp_step"].items():
        if hasattr(lib, fn):  # an older revision may lack a newer function
            getattr(lib, fn).argtypes, getattr(lib, fn).restype = argtypes, restype
    return lib


class Pack:
    """K members' parameters, momentum and a batch, as the kernel takes them."""

    def __init__(self, dims: tuple[int, ...], K: int, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        pairs = list(zip(dims[:-1], dims[1:], strict=True))
        self.dims, self.K, self.n = dims, K, n
        self.W = [torch.randn(K, i, o, generator=g) / i**0.5 for i, o in pairs]
        self.b = [torch.randn(K, o, generator=g) * 0.1 for _, o in pairs]
        self.V = [torch.zeros_like(w) for w in self.W]
        self.vb = [torch.zeros_like(b) for b in self.b]
        self.x = torch.randn(K * n, dims[0], generator=g)
        self.y = torch.randint(0, dims[-1], (K * n,), generator=g)
        self.lrs = (ctypes.c_float * K)(*[0.05 * (1 + k) for k in range(K)])
        self.losses = torch.empty(K)

    def ptrs(self, ts: list[torch.Tensor]) -> Any:
        return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])

    def args(self, lib: Any, momentum: float) -> tuple:
        L, dims = len(self.dims) - 1, (ctypes.c_int64 * len(self.dims))(*self.dims)
        # Kept on the pack: the call's arguments point into them.
        need = max(lib.sgdn_mlp_ws_floats(self.n, L, dims), lib.sgdn_mlp_eval_ws_floats(L, dims))
        self.c_dims, self.ws = dims, torch.empty(need)
        return (self.K, self.n, L, dims, self.ptrs(self.W), self.ptrs(self.b),
                self.ptrs(self.V), self.ptrs(self.vb), self.x.data_ptr(), self.y.data_ptr(),
                self.ws.data_ptr(), self.lrs, momentum, 5e-4, self.losses.data_ptr())  # fmt: skip


def outputs(lib: Any, dims: tuple[int, ...], n: int, momentum: float,
            accumulated: bool = False) -> list[torch.Tensor]:  # fmt: skip
    """Parameters, momentum and losses after 3 steps, then 4 more in one multi-step call
    (members 0 and 2 share a data order), then an evaluation's sums; with `accumulated`
    (both kernels have sgdn_mlp_accum_step) and n of at least MIN_MICRO rows, then a step in two
    micro-batches of n rows: its losses, squared norms and the parameters after it."""
    p = Pack(dims, 3, n)
    args = p.args(lib, momentum)
    for _ in range(3):
        lib.sgdn_mlp_step(*args)
    T, L = 4, len(dims) - 1
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(0, p.K * n, (T * n,), generator=g) for _ in range(2)]
    xb, yb = torch.empty(p.K * n, dims[0]), torch.empty(p.K * n, dtype=torch.int64)
    lrs, losses = torch.rand(T, p.K, generator=g) * 0.1, torch.empty(T, p.K)
    # args[:8]: K, n, L, the widths and the parameter and momentum pointers, as for a step.
    lib.sgdn_mlp_steps(T, *args[:8], p.x.data_ptr(), p.y.data_ptr(), p.ptrs(idx),
                       (ctypes.c_int64 * 3)(0, 1, 0), xb.data_ptr(), yb.data_ptr(), p.ws.data_ptr(),
                       lrs.data_ptr(), momentum, 5e-4, losses.data_ptr())  # fmt: skip
    sums = torch.zeros(p.K, 2, dtype=torch.float64)
    W, b = p.ptrs(p.W), p.ptrs(p.b)
    lib.sgdn_mlp_eval(p.K, n, L, p.c_dims, W, b, p.x.data_ptr(), p.y.data_ptr(), p.ws.data_ptr(),
                      sums.data_ptr())  # fmt: skip
    out = [*p.W, *p.b, *p.V, *p.vb, p.losses, losses, sums]
    if accumulated and n >= MIN_MICRO:
        J = 2
        x = torch.randn(p.K * J * n, dims[0], generator=g)
        y = torch.randint(0, dims[-1], (p.K * J * n,), generator=g)
        grads = torch.empty(lib.sgdn_mlp_grad_floats(L, p.c_dims))
        acc_losses, sq = torch.empty(p.K), torch.empty(p.K, 2, dtype=torch.float64)
        lib.sgdn_mlp_accum_step(p.K, J, n, *args[2:8], x.data_ptr(), y.data_ptr(),
                                p.ws.data_ptr(), grads.data_ptr(), p.lrs, momentum, 5e-4,
                                acc_losses.data_ptr(), sq.data_ptr())  # fmt: skip
        out += [*p.W, *p.b, *p.V, *p.vb, acc_losses, sq]
    return out


def same_bits(a: Any, b: Any) -> bool:
    ok = True
    accumulated = all(hasattr(lib, "sgdn_mlp_accum_step") for lib in (a, b))
    for dims, ns in SHAPES:
        for n in ns:
            for m in (0.9, 0.0):
                oa, ob = outputs(a, dims, n, m, accumulated), outputs(b, dims, n, m, accumulated)
                if not all(torch.equal(u, v) for u, v in zip(oa, ob, strict=True)):
                    print(f"  differ: widths {dims}, n = {n}, momentum {m}")
                    ok = False
    return ok


def timing(
    libs: list[Any], n: int, K: int, rounds: int, T: int = 16, seconds: float = 0.2
) -> list[list[float]]:
    """Each round of each library, µs per example-step, alternating round by round: calls of
    sgdn_mlp_steps of T steps (the training loop's calls: it checks for divergence every 16
    steps), on batches drawn from 8,000 examples, two data orders for the pack; a round
    makes as many calls as take about `seconds` (at B = 4 a call is 2 ms, and one call's
    time is this machine's best moment, not what it sustains)."""
    N = 8000
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(N, DIMS[0], generator=g), torch.randint(0, DIMS[-1], (N,), generator=g)
    idx = [torch.randint(0, N, (T * n,), generator=g) for _ in range(2)]
    xb, yb = torch.empty(K * n, DIMS[0]), torch.empty(K * n, dtype=torch.int64)
    lrs, losses = torch.full((T, K), 1e-6), torch.empty(T, K)  # the weights barely move
    packs = [Pack(DIMS, K, n) for _ in libs]
    calls = []
    for p, lib in zip(packs, libs, strict=True):
        args = p.args(lib, 0.9)
        calls.append((T, *args[:8], X.data_ptr(), Y.data_ptr(), p.ptrs(idx),
                      (ctypes.c_int64 * K)(*[k % 2 for k in range(K)]), xb.data_ptr(),
                      yb.data_ptr(), p.ws.data_ptr(), lrs.data_ptr(), 0.9, 5e-4, losses.data_ptr()))  # fmt: skip
    t0 = time.perf_counter()
    libs[0].sgdn_mlp_steps(*calls[0])
    reps = max(1, round(seconds / (time.perf_counter() - t0)))
    times: list[list[float]] = [[] for _ in libs]
    for _ in range(rounds):
        for i, lib in enumerate(libs):
            t0 = time.perf_counter()
            for _ in range(reps):
                lib.sgdn_mlp_steps(*calls[i])
            times[i].append((time.perf_counter() - t0) / reps / (n * K * T) * 1e6)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git revision of the kernel to compare with")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 64, 128, 1024])
    ap.add_argument("--pack", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    repo = HERE.parents[2]
    base = subprocess.run(["git", "show", f"{args.base}:{SOURCE}"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kernel-ab-") as tmp:
        a = build(base, Path(tmp) / "base.so")
        b = build((repo / SOURCE).read_text(), Path(tmp) / "tree.so")
        ok = same_bits(a, b)
        print(f"bits: {'same bits' if ok else 'DIFFERENT'} ({args.base} vs the working tree)")
        print(f"µs per example-step, packs of {args.pack}, best (median) of {args.rounds} "
              "rounds of about 0.2 s:")  # fmt: skip
        for n in args.batch_sizes:
            ta, tb = timing([a, b], n, args.pack, args.rounds)
            (ba, ma), (bb, mb) = (min(ta), statistics.median(ta)), (min(tb), statistics.median(tb))
            print(f"  B = {n:5d}: {args.base} {ba:6.2f} ({ma:.2f}), working tree {bb:6.2f} "
                  f"({mb:.2f}); ratio {bb / ba:.2f} ({mb / ma:.2f})")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
