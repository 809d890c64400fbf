"""How close a finished study comes to the CPU's own arithmetic limit.

    python benchmarks/study_efficiency.py constant_epochs            # one study
    python benchmarks/study_efficiency.py --all                      # every study but the NQM
    python benchmarks/study_efficiency.py constant_epochs --json     # the numbers as JSON

Reads the study's finished runs from the project's tracking store (the project at the
current directory, or --root) and counts, per run:

- training FLOPs: 3 × forward FLOPs per example × examples trained (steps × B); forward +
  backward is three forward passes' worth of multiply-adds (the weight and input gradients);
- evaluation FLOPs: forward FLOPs × examples evaluated: each curve evaluation on
  `train.eval_subset` examples of each split (or the full sets), the final one on the full
  sets, counted from the evaluations the run logged.

Forward FLOPs per example are those of `sgdnoise.pack.forward_flops` (2 per multiply-add of
the linear and convolution layers). The study's wall time runs from its first run's start to
its last run's end; a worker's time at a batch size is the union of its runs' intervals
there (packed runs share theirs). The peak is the CPU's fp32 limit for one thread, measured in
this process: the larger of torch's matrix-multiply rate (1024³) and the rate of independent
fused multiply-adds on the widest vectors the native kernels are built for
(sgdnoise/native/peak.c), the best of its reads (their median, the rate the machine
sustains, is printed beside it). The two differ where the BLAS does not use the CPU's widest
vectors (on AMD's Zen 5, torch's product reads about 100 GFLOP/s a core, the rate of
vectors of 8, and the units run vectors of 16 at about 240). The ratio is achieved
FLOP/s / (peak × workers), overall and per B (beside it, the ratio to torch's product
alone), and each batch size's worker time is split into what its arithmetic would take at
the peak, the rest of its training loop (Python, dispatch, memory traffic), and the time
outside the training loop (evaluation, tracking, set-up). Per study, the time workers spent
in no run: between their runs, and at the start and end (one waiting while another ends).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from sgdnoise.config import load_config, raw_params
from sgdnoise.data.prepare import read_meta
from sgdnoise.pack import forward_flops
from sgdnoise.paths import prepared_dir
from sgdnoise.sweep.spec import load_spec
from sgdnoise.tracking import TAG, client, resolve_uri

# The keys that decide a run's forward FLOPs per example.
MODEL_KEYS = ("data.name", "model.name", "model.norm", "model.depth", "model.width",
              "model.ghost_batch_size")  # fmt: skip


def gemm_peak(n: int = 1024, seconds: float = 3.0) -> float:
    """fp32 FLOP/s of one thread multiplying n × n matrices: the best try in `seconds`
    (a shared machine's speed drifts from second to second, and a low peak would flatter
    the ratio: over 1 s this read 73-88 GFLOP/s within minutes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    return best


def fma_peak(seconds: float = 2.0) -> tuple[float, float]:
    """fp32 FLOP/s of one thread's fused multiply-adds on the widest vectors that the native
    kernels' build targets (sgdnoise/native/peak.c): the best try in `seconds` (the peak)
    and the median try (what this machine sustains: on a shared machine it runs several
    per cent below its best moments, and so does any work that lasts minutes); zeros
    without a C compiler."""
    from sgdnoise.native import library

    lib = library("peak")
    if lib is None:
        return 0.0, 0.0
    iters = 2_000_000
    flops = iters * 12 * 2 * lib.sgdn_fma_lanes()
    lib.sgdn_fma_loop(iters)
    reads = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        lib.sgdn_fma_loop(iters)
        reads.append(flops / (time.perf_counter() - t0))
    return max(reads), statistics.median(reads)


def study_runs(uri: str, experiment: str, study: str) -> list[Any]:
    """The study's FINISHED child runs (the most recent parent run of that name)."""
    mlf = client(uri)
    exp = mlf.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"experiment {experiment!r} not found at {uri}")
    parents = mlf.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG}kind` = 'study' and tags.`{TAG}study` = '{study}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise SystemExit(f"study {study!r} has no parent run in experiment {experiment!r}")
    parent = parents[0].info.run_id
    runs, token = [], None
    while True:
        page = mlf.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = "
            "'FINISHED'",
            max_results=10_000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


class FlopCounter:
    """Forward FLOPs per example and the split sizes, per model and dataset (cached)."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[tuple[str, ...], tuple[float, int, int]] = {}

    def __call__(self, params: dict[str, str]) -> tuple[float, int, int]:
        key = tuple(params.get(k, "null") for k in MODEL_KEYS)
        if key not in self._cache:
            cfg = load_config(None, [f"{k}={v}" for k, v in zip(MODEL_KEYS, key, strict=True)])
            meta = read_meta(prepared_dir(cfg.data.name, self.root))
            if meta is None:
                raise SystemExit(f"data/prepared/{cfg.data.name} is missing: run the study first")
            shape, classes = tuple(meta["input_shape"]), int(meta["num_classes"])
            self._cache[key] = (
                forward_flops(cfg, shape, classes),
                int(meta["n_train"]),
                int(meta["n_test"]),
            )
        return self._cache[key]


def run_record(run: Any, flops: FlopCounter, uri: str) -> dict[str, Any] | None:
    p, m = run.data.params, run.data.metrics
    if p.get("data.name") == "nqm" or "steps" not in m:
        return None  # the NQM is exact theory, not training: no FLOPs to count
    fwd, n_train, n_test = flops(p)
    B, steps = int(p["train.batch_size"]), float(m["steps"])
    subset = p.get("train.eval_subset", "None")
    subset = None if subset in ("None", "null") else int(subset)
    curve = (min(subset, n_train) + min(subset, n_test)) if subset else n_train + n_test
    evals = len(client(uri).get_metric_history(run.info.run_id, "test_loss"))
    eval_examples = max(0, evals - 1) * curve + (n_train + n_test)
    train_time = steps * B / m["examples_per_second"] if m.get("examples_per_second") else 0.0
    return {
        "batch_size": B,
        "worker": run.data.tags.get(TAG + "worker", "?"),
        "start": run.info.start_time / 1000,
        "end": run.info.end_time / 1000,
        "pack": int(p.get("derived.pack", 1)),
        "train_flops": 3 * fwd * steps * B,
        "eval_flops": fwd * eval_examples,
        "train_time": train_time,
    }


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _intervals_by_worker(records: list[dict[str, Any]]) -> list[list[tuple[float, float]]]:
    """Each worker's runs as (start, end) intervals."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        out[r["worker"]].append((r["start"], r["end"]))
    return list(out.values())


def idle(records: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds the workers spent in no run of the study, summed over workers: between two of
    their runs (claiming, reporting, setting up the next pack) and before their first run or
    after their last while another worker was still busy (waiting out the end)."""
    start = min(r["start"] for r in records)
    end = max(r["end"] for r in records)
    between = edges = 0.0
    for intervals in _intervals_by_worker(records):
        first = min(a for a, _ in intervals)
        last = max(b for _, b in intervals)
        between += (last - first) - _union(intervals)
        edges += (first - start) + (end - last)
    return {"between_runs_s": between, "start_and_end_s": edges}


def efficiency(records: list[dict[str, Any]], peak: float, workers: int) -> dict[str, Any]:
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    train = sum(r["train_flops"] for r in records)
    evals = sum(r["eval_flops"] for r in records)
    out: dict[str, Any] = {
        "runs": len(records),
        "wall_s": wall,
        "train_tflop": train / 1e12,
        "eval_tflop": evals / 1e12,
        "eval_share": evals / (train + evals),
        "achieved_gflops": (train + evals) / wall / 1e9,
        "ratio": (train + evals) / wall / (peak * workers),
        "idle": idle(records),
        "per_batch_size": [],
    }
    by_b: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_b[r["batch_size"]].append(r)
    for b in sorted(by_b):
        rs = by_b[b]
        busy = sum(_union(iv) for iv in _intervals_by_worker(rs))
        flops = sum(r["train_flops"] + r["eval_flops"] for r in rs)
        # Training-loop time shared by a pack's members: each member's loop time / members.
        loop = sum(r["train_time"] / r["pack"] for r in rs)
        at_peak = flops / peak
        out["per_batch_size"].append({
            "batch_size": b,
            "runs": len(rs),
            "worker_s": busy,
            "ratio": flops / busy / peak if busy else 0.0,
            "arithmetic_at_peak_s": at_peak,
            "rest_of_training_loop_s": max(0.0, loop - at_peak),
            "outside_training_loop_s": max(0.0, busy - loop),
            "member_step_over_peak": (loop / sum(r["train_flops"] for r in rs) * peak
                                      if loop else 0.0),
        })  # fmt: skip
    return out


def print_table(study: str, e: dict[str, Any], peak: float, workers: int) -> None:
    print(f"\n{study}: {e['runs']} runs in {e['wall_s']:.0f} s on {workers} worker(s); "
          f"{e['train_tflop']:.2f} TFLOP training + {e['eval_tflop']:.2f} evaluation "
          f"({100 * e['eval_share']:.1f} %); {e['achieved_gflops']:.1f} GFLOP/s = "
          f"{e['ratio']:.2f} of {workers} × {peak / 1e9:.0f} GFLOP/s "
          f"({e['ratio_to_gemm']:.2f} of torch's product)")  # fmt: skip
    print(f"workers in no run: {e['idle']['between_runs_s']:.1f} s between runs, "
          f"{e['idle']['start_and_end_s']:.1f} s at the start and end")  # fmt: skip
    print(f"{'B':>6} {'runs':>5} {'worker s':>9} {'ratio':>6} {'at peak s':>10} "
          f"{'rest of loop s':>15} {'outside loop s':>15} {'step/peak':>10}")  # fmt: skip
    for r in e["per_batch_size"]:
        print(f"{r['batch_size']:>6} {r['runs']:>5} {r['worker_s']:>9.1f} {r['ratio']:>6.2f} "
              f"{r['arithmetic_at_peak_s']:>10.1f} {r['rest_of_training_loop_s']:>15.1f} "
              f"{r['outside_training_loop_s']:>15.1f} {r['member_step_over_peak']:>9.1f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="*", help="study names (default with --all: every study)")
    ap.add_argument("--all", action="store_true", help="every study in params.yaml but the NQM")
    ap.add_argument("--root", type=Path, default=Path.cwd(), help="the project (default: cwd)")
    ap.add_argument("--workers", type=int, default=2, help="workers the sweeps ran with")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    cfg = load_config(root / "params.yaml")
    raw = raw_params(root / "params.yaml")
    names = args.studies or (list(cfg.studies) if args.all else [])
    if not names:
        ap.error("name a study or pass --all")
    uri = resolve_uri(cfg, root)
    gemm, (fma, fma_median) = gemm_peak(), fma_peak()
    peak = max(gemm, fma)
    flops = FlopCounter(root)
    result: dict[str, Any] = {
        "peak_gflops_one_thread": peak / 1e9,
        "gemm_gflops_one_thread": gemm / 1e9,
        "fma_gflops_one_thread": fma / 1e9,
        "fma_median_gflops_one_thread": fma_median / 1e9,
        "workers": args.workers,
    }
    if not args.json:
        print(
            f"peak of one thread: {peak / 1e9:.0f} GFLOP/s (torch's 1024³ product "
            f"{gemm / 1e9:.0f}, multiply-adds on vectors of the native build {fma / 1e9:.0f}; "
            f"their median read {fma_median / 1e9:.0f})"
        )
    everything: list[dict[str, Any]] = []
    for study in names:
        records = [
            r for run in study_runs(uri, load_spec(raw, study).experiment, study)
            if (r := run_record(run, flops, uri)) is not None
        ]  # fmt: skip
        if not records:
            continue
        everything += records
        result[study] = efficiency(records, peak, args.workers)
        result[study]["ratio_to_gemm"] = result[study]["ratio"] * peak / gemm
        if not args.json:
            print_table(study, result[study], peak, args.workers)
    if not everything:
        print("no finished training runs in those studies", file=sys.stderr)
        return 1
    studies = [s for s in names if s in result]
    total_wall = sum(result[s]["wall_s"] for s in studies)
    total = sum(r["train_flops"] + r["eval_flops"] for r in everything)
    result["all"] = {
        "studies": studies,
        "wall_s": total_wall,
        "tflop": total / 1e12,
        "eval_share": sum(r["eval_flops"] for r in everything) / total,
        "ratio": total / total_wall / (peak * args.workers),
        "ratio_to_gemm": total / total_wall / (gemm * args.workers),
        # Against the sustained rate (the median read), not the best moment: context only.
        "ratio_to_median_read": total / total_wall / (max(gemm, fma_median) * args.workers),
    }
    if args.json:
        print(json.dumps(result))
    else:
        a = result["all"]
        print(f"\nall ({', '.join(studies)}): {a['tflop']:.2f} TFLOP in {a['wall_s']:.0f} s of "
              f"sweeps; evaluation {100 * a['eval_share']:.1f} %; "
              f"ratio to torch's product {a['ratio_to_gemm']:.2f}; to the median read "
              f"{a['ratio_to_median_read']:.2f}; ratio {a['ratio']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
