"""bf16 autocast on the CPU (`train.precision: bf16`): its speed, and how much it moves a table.

    python benchmarks/bf16.py                                  # both parts, defaults below
    python benchmarks/bf16.py --skip-study                     # the step speed only
    python benchmarks/bf16.py --study constant_steps --batch-sizes 512 4096 8000

Part 1, speed: untracked `sgdnoise train` runs of the default MLP on MNIST-1D per B and
precision (a process each: Accelerate fixes the precision per process), one thread, and the
training loop's examples per second (evaluation excluded), fp32 vs bf16. Part 2, the table: the study of params.yaml restricted to the given batch sizes, swept
by the real CLI (2 workers) once in fp32 and once in bf16 on fresh projects, analysed, and
compared row by row: the optimal ε_eff and the best test accuracy per B. bf16 is the default
only if the tables do not move (they do: see the README's numbers).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import projects
import yaml

REPO = Path(__file__).resolve().parents[1]


def step_speed(root: Path, batch_sizes: list[int]) -> None:
    import json

    print(f"{'B':>6} {'fp32 ex/s':>12} {'bf16 ex/s':>12} {'bf16/fp32':>10}")
    for B in batch_sizes:
        steps = max(20, min(2000, 200_000 // B))
        rate = {}
        for precision in ("fp32", "bf16"):  # a process each: Accelerate fixes it per process
            args = [f"train.batch_size={B}", f"train.precision={precision}", "train.threads=1",
                    "train.budget.unit=steps", f"train.budget.value={steps}",
                    "train.eval_points=1"]  # fmt: skip
            cmd = [sys.executable, "-m", "sgdnoise.cli", "train", "--no-track", "--json"]
            cmd += [x for a in args for x in ("-P", a)]
            best = 0.0
            for _ in range(2):  # the better of two: the machine is shared
                out = subprocess.run(cmd, cwd=root, env=projects.clean_env(), check=True,
                                     capture_output=True, text=True).stdout  # fmt: skip
                best = max(best, json.loads(out.strip().splitlines()[-1])["examples_per_second"])
            rate[precision] = best
        print(f"{B:>6} {rate['fp32']:>12.0f} {rate['bf16']:>12.0f} "
              f"{rate['bf16'] / rate['fp32']:>9.2f}x", flush=True)  # fmt: skip


def _with(tree: dict, dotted: str, value: object) -> dict:
    """A copy of the nested mapping `tree` with `dotted` (e.g. train.batch_size) set."""
    out = copy.deepcopy(tree)
    node = out
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def study_table(root: Path, study: str, batch_sizes: list[int], precision: str) -> pd.DataFrame:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    spec = dict(params["studies"][study])
    # Nested, as params.yaml writes them: a nested key wins over a dotted one.
    spec["grid"] = _with(spec["grid"], "train.batch_size", batch_sizes)
    spec["fixed"] = _with(spec.get("fixed", {}), "train.precision", precision)
    params["studies"] = {study: spec}
    projects.write_project(root, params)
    for cmd in (["sweep", study, "--workers", "2"], ["analyze", study, "--no-log"]):
        proc = subprocess.run([sys.executable, "-m", "sgdnoise.cli", *cmd], cwd=root,
                              env=projects.clean_env(), capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    return pd.read_csv(root / "results" / study / "table.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed-batch-sizes", type=int, nargs="+", default=[16, 256, 8000])
    ap.add_argument("--study", default="constant_steps")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096, 8000])
    ap.add_argument("--skip-study", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bf16-") as tmp:
        root = Path(tmp) / "speed"
        projects.write_project(root, {"data": {"name": "mnist1d"}})
        step_speed(root, args.speed_batch_sizes)
        if args.skip_study:
            return
        tables = {p: study_table(Path(tmp) / p, args.study, args.batch_sizes, p)
                  for p in ("fp32", "bf16")}  # fmt: skip
    keys = ["series", "batch_size"]
    both = tables["fp32"].merge(tables["bf16"], on=keys, suffixes=("_fp32", "_bf16"))
    print(f"\n{args.study} in fp32 vs bf16 (per_seed rule):")
    print(f"{'series':>10} {'B':>6} {'lr_opt fp32':>12} {'bf16':>8} "
          f"{'best acc fp32':>14} {'bf16':>8} {'diff (pp)':>10}")  # fmt: skip
    for r in both.itertuples():
        print(f"{r.series:>10} {r.batch_size:>6} {r.lr_opt_fp32:>12.3g} {r.lr_opt_bf16:>8.3g} "
              f"{r.metric_mean_fp32:>14.4f} {r.metric_mean_bf16:>8.4f} "
              f"{100 * (r.metric_mean_bf16 - r.metric_mean_fp32):>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
