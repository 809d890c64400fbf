"""A sweep run's MLflow calls, timed: its start (create the run with its tags, its params,
config.json) and its end (the buffered curves, the final metrics and tags, the status),
through the training loop's own functions, into a fresh local store.

    python benchmarks/tracking_calls.py                # 40 runs in a temporary project
    python benchmarks/tracking_calls.py --runs 100

Prints the mean wall and CPU milliseconds of each part per run: what every one of a
study's hundreds of short runs pays besides its training.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from sgdnoise.config import load_config
from sgdnoise.loop import start_tracking

REPO = Path(__file__).resolve().parents[1]
CURVE = {"train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.0, "test_accuracy": 0.5,
         "lr": 0.1}  # fmt: skip


def one_run(cfg, root: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, cpu) seconds of a run's start and of its end."""
    t0 = time.perf_counter(), time.process_time()
    tracker = start_tracking(cfg, root, {"derived.pack": 8}, "checksum", "cpu", 1, None, None,
                             auto_flush=False)  # fmt: skip
    t1 = time.perf_counter(), time.process_time()
    for step in range(11):  # the default eval_points: 10 curve points and the final one
        tracker.log_metrics(CURVE, step * 100)
    tracker.finish({f"final_{k}": 1.0 for k in "abcdefgh"}, {"sgdnoise.status": "finished"},
                   "FINISHED")  # fmt: skip
    t2 = time.perf_counter(), time.process_time()
    return (t1[0] - t0[0], t1[1] - t0[1]), (t2[0] - t1[0], t2[1] - t1[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tracking-calls-") as tmp:
        root = Path(tmp)
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        cfg = load_config(root / "params.yaml")
        one_run(cfg, root)  # creates the store and the experiment, not timed
        totals = [[0.0, 0.0], [0.0, 0.0]]
        for _ in range(args.runs):
            for part, (wall, cpu) in zip(totals, one_run(cfg, root), strict=True):
                part[0] += wall
                part[1] += cpu
    for name, (wall, cpu) in zip(("start", "end"), totals, strict=True):
        print(f"{name}: {1e3 * wall / args.runs:.1f} ms wall, {1e3 * cpu / args.runs:.1f} ms CPU "
              "per run")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
