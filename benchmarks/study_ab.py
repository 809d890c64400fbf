"""A study swept with another revision's code and with the working tree's, alternated round
by round: each sweep's wall time and ratio to the CPU's peak, so that a change of a few per
cent can be told from this machine's drift.

    python benchmarks/study_ab.py --base 59c05c7                         # constant_epochs
    python benchmarks/study_ab.py --base HEAD~2 --study epoch_budgets --rounds 3

The same code's studies read 0.62 and 0.53 of the peak forty minutes apart on this
project's shared 2-core machine: a study swept once before a change and once after measures
the hour as much as the change. Here the base revision's src/ (from git) and the working
tree's sweep the study from scratch in turn, `--rounds` times each, in scratch copies of the
project (`--root`'s params.yaml; the data prepared once, shared), each into a fresh
tracking store and Optuna journal, with `--workers` workers. Each sweep is then read by the
working tree's benchmarks/study_efficiency.py (both counted alike, each against the peak
read right after it). Printed: each sweep's wall and ratio, and per round the working
tree's wall over the base's. `--json` prints the numbers as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import projects
import yaml

REPO = Path(__file__).resolve().parents[1]
EFFICIENCY = REPO / "benchmarks" / "study_efficiency.py"


def clean_env(src: Path) -> dict[str, str]:
    """A fresh `sgdnoise` process running the code under `src` (projects.clean_env: no
    inherited tracking store, project root or thread count)."""
    return {**projects.clean_env(), "PYTHONPATH": str(src)}


def base_source(rev: str, into: Path) -> Path:
    """`rev`'s src/ written under `into` (git archive); its path."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "src"], cwd=REPO,
                             check=True, capture_output=True).stdout  # fmt: skip
    tar = into / "base.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


def sweep(code: Path, params: Path, data: Path, study: str, workers: int, at: Path) -> float:
    """The study swept from scratch by the code under `code` in a new project at `at` (its
    params.yaml a copy of `params`, its data/ the shared prepared data); seconds."""
    at.mkdir(parents=True)
    shutil.copy(params, at / "params.yaml")
    (at / "data").symlink_to(data, target_is_directory=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sgdnoise.cli", "sweep", study, "--workers",
                           str(workers)], cwd=at, env=clean_env(code), capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"sweep {study} with {code} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def efficiency(at: Path, study: str, workers: int) -> dict[str, Any]:
    """study_efficiency.py's numbers for the sweep in the project at `at`."""
    proc = subprocess.run([sys.executable, str(EFFICIENCY), study, "--root", str(at), "--json",
                           "--workers", str(workers)], env=clean_env(REPO / "src"),
                          capture_output=True, text=True, check=True)  # fmt: skip
    e = json.loads(proc.stdout)
    return {"runs": e[study]["runs"], "wall_s": e[study]["wall_s"], "ratio": e[study]["ratio"],
            "peak_gflops": e["peak_gflops_one_thread"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--study", default="constant_epochs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--root", type=Path, default=REPO, help="the project whose params.yaml holds the study"
    )
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = ap.parse_args(argv)
    params = args.root.resolve() / "params.yaml"
    if not params.is_file():
        ap.error(f"--root: no params.yaml in {args.root}")
    raw = yaml.safe_load(params.read_text()) or {}
    if args.study not in (raw.get("studies") or {}):
        ap.error(f"--study: {args.study!r} is not a study of {params} (its studies: "
                 f"{', '.join(raw.get('studies') or {}) or 'none'})")  # fmt: skip
    out: dict[str, Any] = {"base": args.base, "study": args.study, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="study-ab-") as tmp:
        scratch = Path(tmp)
        try:
            codes = {args.base: base_source(args.base, scratch), "working tree": REPO / "src"}
        except subprocess.CalledProcessError:
            ap.error(f"--base: {args.base!r} is not a revision of this repository")
        # The data, prepared once by the working tree's code, shared by every sweep.
        projects.write_project(scratch / "prepare", raw)
        data = scratch / "prepare" / "data"
        for r in range(args.rounds):
            row = {}
            for tag, (name, code) in zip(("base", "tree"), codes.items(), strict=True):
                at = scratch / f"round{r}-{tag}"
                seconds = sweep(code, params, data, args.study, args.workers, at)
                row[name] = {**efficiency(at, args.study, args.workers), "command_s": seconds}
                shutil.rmtree(at)
                if not args.json:
                    e = row[name]
                    print(f"round {r + 1}, {name}: sweeps {e['wall_s']:.1f} s, ratio "
                          f"{e['ratio']:.3f} (peak read {e['peak_gflops']:.0f} GFLOP/s)",
                          flush=True)  # fmt: skip
            out["rounds"].append(row)
    pairs = [row["working tree"]["wall_s"] / row[args.base]["wall_s"] for row in out["rounds"]]
    out["wall_ratios"] = pairs
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.study}: the working tree's sweep wall over {args.base}'s, round by round: "
              + ", ".join(f"{p:.3f}" for p in pairs) + f" (median {statistics.median(pairs):.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
