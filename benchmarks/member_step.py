"""What one run's optimizer step costs, one by one and packed, against the CPU's peak.

    python benchmarks/member_step.py                          # B = 4, 16, 64, 128; K = 4 … 32
    python benchmarks/member_step.py --batch-sizes 4 --packs 8 16
    python benchmarks/member_step.py --kernel torch           # packs: the torch path
    python benchmarks/member_step.py --compare                # torch path / autograd
    python benchmarks/member_step.py --compare-native         # C kernel / torch path
    python benchmarks/member_step.py --kernel-only            # the C kernel's call alone

The default MLP (40-256-256-10) on MNIST-1D-shaped data, one thread, the training step only
(batch gather, forward, loss, backward, update; no evaluation, no tracking): µs per member
step unpacked (the model and `HeavyBall`, as `train()` runs it) and packed (`StackedNet`,
as a pack runs it: by default the kernel a sweep picks, the C kernel of
sgdnoise.models.native_mlp (the hand-written torch step of sgdnoise.models.packed_mlp where
the kernel cannot be built); `--kernel` picks one, `autograd` the packed model through
autograd), and each as a multiple of the time its FLOPs (6 per parameter per example) take
at the fp32 matrix-multiply peak of one thread, measured here. The comparisons interleave
the two kernels and give the median of 5 rounds' time ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import time

import study_efficiency
import torch
import torch.nn.functional as F

from sgdnoise.allocator import keep_freed_memory
from sgdnoise.config import from_dict
from sgdnoise.models.build import build_model
from sgdnoise.nets import StackedNet
from sgdnoise.optim import make_optimizer

N = 8000
PARAMS = 40 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10  # the default MLP


def timed(step, n: int) -> float:
    for _ in range(max(10, n // 10)):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def unpacked(B: int, X: torch.Tensor, Y: torch.Tensor, n: int) -> float:
    cfg = from_dict({"train": {"batch_size": B}})
    model = build_model(cfg.model, (40,), 10)
    opt = make_optimizer(model, cfg)

    def step() -> None:
        idx = torch.randint(0, N, (B,))
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        opt.zero_grad()

    return timed(step, n)


def packed_step(B: int, K: int, X: torch.Tensor, Y: torch.Tensor, kernel: str):
    """One pack step through `kernel`: native, torch, autograd, or auto (as a sweep)."""
    cfg = from_dict({})
    template = build_model(cfg.model, (40,), 10)
    states = [build_model(cfg.model, (40,), 10).state_dict() for _ in range(K)]
    native = kernel in ("native", "auto")
    net = StackedNet(template, states, [None] * K, 0.9, 5e-4, "classification", 2048,
                     native=native)  # fmt: skip
    if kernel == "native" and net.kernel != "native":
        raise SystemExit("the C kernel could not be built here")
    if kernel == "autograd":
        net.by_hand = None
    lrs = [0.01 * (1 + k // 2) for k in range(K)]  # two seeds per learning rate

    def step() -> None:
        idx = torch.randint(0, N, (K * B,))
        net.backward(net.losses(X[idx], Y[idx], contextlib.nullcontext), 1)
        net.step(lrs)

    return step


def kernel_only(B: int, K: int, X: torch.Tensor, Y: torch.Tensor, n: int) -> float:
    """Seconds per member-step of the C kernel's call alone, on one fixed batch."""
    cfg = from_dict({})
    template = build_model(cfg.model, (40,), 10)
    states = [build_model(cfg.model, (40,), 10).state_dict() for _ in range(K)]
    net = StackedNet(template, states, [None] * K, 0.9, 5e-4, "classification", 2048,
                     native=True)  # fmt: skip
    if net.native is None:
        raise SystemExit("the C kernel could not be built here")
    idx = torch.randint(0, N, (K * B,))
    x, y, lrs, losses = X[idx], Y[idx], [1e-3] * K, torch.empty(K)  # alive while timed
    net.losses(x, y, contextlib.nullcontext)
    net.step(lrs)  # momentum buffers, pointer arrays, workspace
    nat, opt = net.native, net.optimizer
    buffers = {id(p): b for p, b in zip(opt.params, opt.momentum_buffers, strict=True)}
    args = (
        K,
        B,
        nat.L,
        nat._dims,
        *nat._params(buffers, 0.9),
        x.data_ptr(),
        y.data_ptr(),
        nat._ws.data_ptr(),
        (ctypes.c_float * K)(*lrs),
        0.9,
        5e-4,
        losses.data_ptr(),
    )
    return timed(lambda: nat.lib.sgdn_mlp_step(*args), n) / K


def packed(B: int, K: int, X: torch.Tensor, Y: torch.Tensor, n: int, kernel: str) -> float:
    return timed(packed_step(B, K, X, Y, kernel), n) / K


def compare(B: int, K: int, X: torch.Tensor, Y: torch.Tensor, n: int, kernels: tuple[str, str],
            rounds: int = 5) -> float:  # fmt: skip
    """Median over interleaved rounds of the step time of kernels[0] / kernels[1]: the
    machine's noise hits both alike."""
    a, b = (packed_step(B, K, X, Y, k) for k in kernels)
    ratios = sorted(timed(a, n) / timed(b, n) for _ in range(rounds))
    return ratios[len(ratios) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64, 128])
    ap.add_argument("--packs", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--kernel", choices=["auto", "native", "torch", "autograd"], default="auto",
                    help="what packs step through (auto: as a sweep picks)")  # fmt: skip
    ap.add_argument("--kernel-only", action="store_true",
                    help="packs: the C kernel's call alone, without gather and Python")  # fmt: skip
    ap.add_argument("--compare", action="store_true",
                    help="packs: step time through the torch path / autograd")  # fmt: skip
    ap.add_argument("--compare-native", action="store_true",
                    help="packs: step time through the C kernel / the torch path")  # fmt: skip
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    peak = study_efficiency.gemm_peak()
    X, Y = torch.randn(N, 40), torch.randint(0, 10, (N,))
    if args.kernel_only:
        print(f"the C kernel's call alone, one batch (its weights stay cached): µs per "
              f"member-step (x its FLOPs at peak, {peak / 1e9:.0f} GFLOP/s)")  # fmt: skip
        print(f"{'B':>5} " + " ".join(f"{'K=' + str(k):>16}" for k in args.packs))
        for B in args.batch_sizes:
            at_peak = 6 * PARAMS * B / peak
            cells = [kernel_only(B, k, X, Y, max(50, 20_000 // B) // 4) for k in args.packs]
            print(f"{B:>5} " + " ".join(f"{t * 1e6:>8.0f} ({t / at_peak:>4.1f}x)" for t in cells),
                  flush=True)  # fmt: skip
        return
    if args.compare or args.compare_native:
        kernels = ("native", "torch") if args.compare_native else ("torch", "autograd")
        print(f"packed step time, {kernels[0]} / {kernels[1]} (median of 5 interleaved rounds)")
        print(f"{'B':>5} " + " ".join(f"{'K=' + str(k):>6}" for k in args.packs))
        for B in args.batch_sizes:
            n = max(20, 4_000 // B)
            cells = [compare(B, k, X, Y, n, kernels) for k in args.packs]
            print(f"{B:>5} " + " ".join(f"{r:>6.2f}" for r in cells), flush=True)
        return
    print(f"fp32 GEMM peak, one thread: {peak / 1e9:.0f} GFLOP/s; µs per member-step "
          f"(x its FLOPs at peak)")  # fmt: skip
    print(f"{'B':>5} {'unpacked':>16} " + " ".join(f"{'K=' + str(k):>16}" for k in args.packs))
    for B in args.batch_sizes:
        n = max(50, 20_000 // B)
        at_peak = 6 * PARAMS * B / peak
        cells = [unpacked(B, X, Y, n)] + [
            packed(B, k, X, Y, n // 4, args.kernel) for k in args.packs
        ]
        print(f"{B:>5} " + " ".join(f"{t * 1e6:>8.0f} ({t / at_peak:>4.1f}x)" for t in cells),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
