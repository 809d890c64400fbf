"""Packed vs unpacked sweeps: runs per minute of the default study's grid, per batch size.

    python benchmarks/pack_speed.py                    # constant_epochs, pack 1 vs auto
    python benchmarks/pack_speed.py --width 32         # a small MLP: where packing pays most
    python benchmarks/pack_speed.py --modes 1 auto 8 --batch-sizes 16 64

A study of params.yaml (default `constant_epochs`: MNIST-1D, the default MLP, 10 epochs,
SGD and momentum, its B, learning-rate and seed grids, edges as configured but without
extension) is swept by the real CLI with 2 workers on a fresh project, once per packing
mode (`1` = off, `auto` = the default for the device, model and B, or a fixed K).

Per batch size the table gives runs per worker-minute: a worker trains a pack's members in
the time from its claim to its last member's completion (Optuna timestamps), so each
member costs that time / members; a run trained alone costs its own duration. This does not
depend on how the sweep happened to schedule the groups. The last line gives the whole
study's steady wall-clock runs per minute (first claim to last completion). Target
(issue 8): packed >= 4x unpacked at B <= 128 on CPU. The machine is shared: compare ratios
from one invocation.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import projects
import yaml

REPO = Path(__file__).resolve().parents[1]


def project(root: Path, study: str, width: int | None, batch_sizes: list[int] | None) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if width is not None:
        params["model"]["width"] = width
    spec = dict(params["studies"][study])
    spec["edges"] = {**spec.get("edges", {}), "extend": False}
    if batch_sizes:
        spec["grid"] = {**spec["grid"], "train.batch_size": batch_sizes}
    params["studies"] = {study: spec}
    projects.write_project(root, params)


def sweep(root: Path, study: str, mode: str, workers: int) -> dict:
    pack = [] if mode == "auto" else ["--pack", mode]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sgdnoise.cli", "sweep", study, "--workers", str(workers), *pack],
        cwd=root, env=projects.clean_env(), capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    trials = [t for t in _trials(root, study) if t.state.name == "COMPLETE"]
    # Worker-seconds per run, by B: a pack's span shared by its members.
    packs: dict[object, list] = defaultdict(list)
    for t in trials:
        packs[t.user_attrs.get("pack", f"alone-{t.number}")].append(t)
    cost: dict[int, list[float]] = defaultdict(list)
    for members in packs.values():
        start = min(t.datetime_start.timestamp() for t in members)
        end = max(t.datetime_complete.timestamp() for t in members)
        for t in members:
            cost[int(t.params["train.batch_size"])].append((end - start) / len(members))
    start = min(t.datetime_start.timestamp() for t in trials)
    end = max(t.datetime_complete.timestamp() for t in trials)
    return {"runs": len(trials), "span": end - start, "wall": time.monotonic() - t0,
            "cost": cost, "packs": sum(1 for m in packs.values() if len(m) > 1)}  # fmt: skip


def _trials(root: Path, study: str) -> list:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    (log,) = (root / "optuna").glob(f"{study}-*.log")
    storage = JournalStorage(JournalFileBackend(str(log)))
    return optuna.load_study(study_name=log.stem, storage=storage).get_trials()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="constant_epochs")
    ap.add_argument("--modes", nargs="+", default=["1", "auto"], help="1 | auto | K")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--width", type=int, default=None, help="model.width (default: params.yaml)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                    help="restrict the study's B grid")  # fmt: skip
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    results = {}
    with tempfile.TemporaryDirectory(prefix="pack-bench-") as tmp:
        for mode in args.modes:
            root = Path(tmp) / f"pack-{mode}"
            project(root, args.study, args.width, args.batch_sizes)
            results[mode] = r = sweep(root, args.study, mode, args.workers)
            print(f"  pack {mode}: {r['runs']} runs in {r['span']:.1f} s steady, "
                  f"{r['packs']} packs", file=sys.stderr)  # fmt: skip
    width = args.width or "default"
    print(f"\npacked vs unpacked: study {args.study} (model.width {width}), {args.workers} "
          f"workers, {cores} cores; runs per worker-minute")  # fmt: skip
    modes = args.modes
    print(f"{'B':>6} " + " ".join(f"{'pack ' + m:>10}" for m in modes) + "  "
          + " ".join(f"{m + ' vs 1':>10}" for m in modes[1:]))  # fmt: skip
    for B in sorted(results[modes[0]]["cost"]):
        rates = [60 / (sum(c) / len(c)) for c in (results[m]["cost"][B] for m in modes)]
        print(f"{B:>6} " + " ".join(f"{x:>10.1f}" for x in rates) + "  "
              + " ".join(f"{x / rates[0]:>9.2f}x" for x in rates[1:]))  # fmt: skip
    whole = [60 * results[m]["runs"] / results[m]["span"] for m in modes]
    print(f"{'study':>6} " + " ".join(f"{x:>10.1f}" for x in whole) + "  "
          + " ".join(f"{x / whole[0]:>9.2f}x" for x in whole[1:])
          + "   (wall-clock runs per minute, both workers)")  # fmt: skip


if __name__ == "__main__":
    main()
