"""GPU throughput of the paper's main model, ghost norm's cost, and packing's gain.

    python benchmarks/gpu_bench.py --out results.json          # on a GPU (benchmarks/gpu.sh)
    python benchmarks/gpu_bench.py --device cpu --smoke         # a seconds-long check

Synthetic CIFAR-shaped tensors on the device (no files): what is measured is the model and
the loop, not data loading. Three measurements, each timed with the device synchronised,
after warm-up steps:
1. WRN-16-4 training throughput (images/s) at several B: fp32 vs bf16 autocast, and bf16
   with channels_last.
2. Ghost batch norm (ghost batches of 64) vs plain batch norm, same B, bf16.
3. Packed vs unpacked at small B: K runs of WRN-16-4 (ghost norm) as one pack
   (sgdnoise.models.packed.StackedModel + optim.StackedSGD) vs K runs one after another: optimizer steps
   per second summed over runs, i.e. runs per minute at a fixed run length.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sgdnoise.config import ModelConfig
from sgdnoise.models.build import build_model
from sgdnoise.models.packed import StackedModel
from sgdnoise.optim import HeavyBall, StackedSGD

SHAPE, CLASSES = (3, 32, 32), 10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Calls per second of `step`, after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return iters / (time.perf_counter() - t0)


# WRN-16-4, or in --smoke mode WRN-10-1: the same layers and code paths, a fraction of the
# arithmetic (a CPU without bf16 arithmetic runs bf16 convolutions ~20x slower than fp32).
SIZE = {"depth": 16, "width": 4}


def wrn(norm: str, device: torch.device, channels_last: bool = False) -> torch.nn.Module:
    cfg = ModelConfig(name="wrn", norm=norm, ghost_batch_size=64, **SIZE)
    model = build_model(cfg, SHAPE, CLASSES).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def single_step(model, device, B: int, bf16: bool, channels_last: bool = False):
    opt = HeavyBall(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(B, *SHAPE, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (B,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def packed_step(K: int, device, B: int, bf16: bool):
    models = [wrn("ghost", device) for _ in range(K)]
    net = StackedModel(models[0], [m.state_dict() for m in models])
    opt = StackedSGD(net.params, 0.9, 5e-4)
    x = torch.randn(K, B, *SHAPE, device=device)
    y = torch.randint(0, CLASSES, (K * B,), device=device)
    lrs = [0.01 * (k + 1) for k in range(K)]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        ce = F.cross_entropy(out.float().flatten(0, 1), y, reduction="none")
        ce.view(K, -1).mean(1).sum().backward()
        opt.step(lrs)
        for p in net.params:
            p.grad = None

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    smoke = args.smoke
    if smoke:
        SIZE.update(depth=10, width=1)
    warmup, iters = (1, 1) if smoke else (5, 20)
    sizes = [8] if smoke else [64, 128, 256, 512, 1024]
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }

    def log(line: str) -> None:
        print(line, flush=True)

    tput = []
    for B in sizes:
        row = {"B": B}
        for name, bf16, cl in (("fp32", False, False), ("bf16", True, False),
                               ("bf16_channels_last", True, True)):  # fmt: skip
            model = wrn("batch", device, cl)
            row[name] = B * rate(single_step(model, device, B, bf16, cl), device, warmup, iters)
        tput.append(row)
        log(
            f"WRN-{SIZE['depth']}-{SIZE['width']} B={B}: "
            + ", ".join(f"{k} {v:.0f} img/s" for k, v in row.items() if k != "B")
        )
    out["throughput_images_per_s"] = tput

    ghost = []
    for B in sizes:
        r_bn = rate(single_step(wrn("batch", device), device, B, True), device, warmup, iters)
        r_gn = rate(single_step(wrn("ghost", device), device, B, True), device, warmup, iters)
        ghost.append({"B": B, "ghost_over_batch_time": r_bn / r_gn})
        log(f"ghost norm (64) vs batch norm at B={B}: {r_bn / r_gn:.2f}x the step time")
    out["ghost_norm_cost"] = ghost

    packing = []
    for B in [8] if smoke else [32, 64, 128]:
        for K in [2] if smoke else [4, 8, 16]:
            one = rate(single_step(wrn("ghost", device), device, B, True), device, warmup, iters)
            pack = rate(packed_step(K, device, B, True), device, warmup, iters)
            packing.append({"B": B, "K": K, "unpacked_steps_per_s": one,
                            "packed_member_steps_per_s": K * pack, "speedup": K * pack / one})  # fmt: skip
            log(f"packed K={K} at B={B}: {K * pack / one:.2f}x the runs per minute of unpacked")
    out["packing"] = packing
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
