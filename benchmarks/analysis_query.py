"""How fast does the analysis read a big study? Builds a 10,000-run store once, times the query.

    python benchmarks/analysis_query.py [--cache-dir /tmp] [--runs 10000] [--client]

The store is cached as <cache-dir>/sgdnoise_analysis_bench_<runs>.db and reused. Creating
10,000 runs through MlflowClient costs ~3 calls and ~60-100 ms per run on a 2-core
machine (15+ minutes), so the experiment and the parent run are created through MLflow
(which also creates the schema) and the child runs are bulk-inserted through MLflow's
own SQLAlchemy table definitions: the same rows `log_batch` writes, in one transaction.
Each run carries a realistic load: ~30 params, ~12 tags, final metrics plus 10-point
histories, so readers that load everything pay what they would in a real study.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

EXPERIMENT = "bench"
STUDY = "bench"
OPTIMIZERS = ("sgd", "momentum")
HISTORY = ("train_loss", "test_loss", "test_accuracy", "lr")


def grid(n_runs: int) -> list[dict]:
    """optimizer x B x lr x seed, 20 lrs and 10 batch sizes; seeds fill up to n_runs."""
    batch = [2**k for k in range(4, 14)]
    lrs = [2.0**k for k in range(-12, 8)]
    per_seed = len(OPTIMIZERS) * len(batch) * len(lrs)
    seeds = range(-(-n_runs // per_seed))
    points = [
        {"optimizer": o, "batch_size": b, "lr_eff": lr, "seed": s}
        for s in seeds
        for o in OPTIMIZERS
        for b in batch
        for lr in lrs
    ]
    return points[:n_runs]


def build(uri: str, artifacts: Path, n_runs: int) -> None:
    import sqlalchemy as sa
    from mlflow import MlflowClient
    from mlflow.store.tracking.dbmodels.models import (
        SqlLatestMetric,
        SqlMetric,
        SqlParam,
        SqlRun,
        SqlTag,
    )

    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(EXPERIMENT, artifact_location=str(artifacts))
    parent = client.create_run(
        eid,
        tags={"sgdnoise.kind": "study", "sgdnoise.study": STUDY, "sgdnoise.grid_hash": "bench"},
    ).info.run_id

    rng = np.random.default_rng(0)
    t0 = 1_700_000_000_000
    runs, tags, params, latest, history = [], [], [], [], []
    for i, p in enumerate(grid(n_runs)):
        rid = uuid.uuid4().hex
        key = hashlib.sha256(repr(sorted(p.items())).encode()).hexdigest()[:16]
        start, end = t0 + 10 * i, t0 + 10 * i + 5
        x = np.log2(p["lr_eff"]) - np.log2(p["batch_size"] / 256)
        diverged = x > 6
        acc = float("nan") if diverged else 0.9 - 0.01 * x**2 + rng.normal(0, 0.002)
        runs.append(
            {
                "run_uuid": rid,
                "name": f"run-{i}",
                "source_type": "LOCAL",
                "source_name": "sgdnoise",
                "user_id": "bench",
                "status": "FINISHED",
                "start_time": start,
                "end_time": end,
                "lifecycle_stage": "active",
                "artifact_uri": f"{artifacts}/{rid}/artifacts",
                "experiment_id": int(eid),
            }
        )
        run_tags = {
            "mlflow.parentRunId": parent,
            "mlflow.runName": f"run-{i}",
            "mlflow.user": "bench",
            "mlflow.source.name": "sgdnoise",
            "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": "0" * 40,
            "sgdnoise.kind": "run",
            "sgdnoise.study": STUDY,
            "sgdnoise.run_key": key,
            "sgdnoise.status": "diverged" if diverged else "finished",
            "sgdnoise.data_checksum": "f" * 32,
            "sgdnoise.hardware": "cpu x2",
        }
        tags += [{"run_uuid": rid, "key": k, "value": v} for k, v in run_tags.items()]
        run_params = {
            "train.optimizer": p["optimizer"],
            "train.batch_size": str(p["batch_size"]),
            "train.lr_eff": repr(p["lr_eff"]),
            "train.seed": str(p["seed"]),
            "train.budget.unit": "epochs",
            "train.budget.value": "20.0",
            "train.momentum": "0.9" if p["optimizer"] == "momentum" else "0.0",
            "model.name": "mlp",
            "data.name": "mnist1d",
            # The rest of a resolved config: noise a real store also holds.
            **{f"extra.option_{j}": str(j) for j in range(21)},
        }
        params += [{"run_uuid": rid, "key": k, "value": v} for k, v in run_params.items()]
        final = {
            "final_train_loss": 0.1 + 0.01 * x**2,
            "final_test_loss": 0.3 + 0.01 * x**2,
            "final_test_accuracy": acc,
            "diverged": float(diverged),
            "steps": 1000.0,
            "epochs": 20.0,
            "examples_per_second": 5e4,
            "grad_noise_scale": 300.0,
        }
        for k, v in final.items():
            nan = bool(np.isnan(v))
            row = {"run_uuid": rid, "key": k, "value": 0.0 if nan else v, "timestamp": end}
            latest.append({**row, "step": 0, "is_nan": nan})
            history.append({**row, "step": 0, "is_nan": nan})
        for k in HISTORY:
            for step in range(10):
                row = {"run_uuid": rid, "key": k, "value": 1.0 / (step + 1), "timestamp": end}
                history.append({**row, "step": step, "is_nan": False})
            latest.append({**row, "step": 9, "is_nan": False})

    engine = sa.create_engine(uri)
    with engine.begin() as conn:
        for model, rows in (
            (SqlRun, runs),
            (SqlTag, tags),
            (SqlParam, params),
            (SqlLatestMetric, latest),
            (SqlMetric, history),
        ):
            conn.execute(sa.insert(model.__table__), rows)
    engine.dispose()
    client.set_terminated(parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--client", action="store_true", help="also time MlflowClient.search_runs")
    args = ap.parse_args()

    from analysis.query import load_study

    db = (args.cache_dir / f"sgdnoise_analysis_bench_{args.runs}.db").resolve()
    uri = f"sqlite:///{db}"
    if not db.exists():
        t = time.perf_counter()
        try:
            build(uri, args.cache_dir.resolve() / f"sgdnoise_analysis_bench_{args.runs}", args.runs)
        except BaseException:
            db.unlink(missing_ok=True)  # never leave a half-built cache behind
            raise
        print(f"built {args.runs} runs into {db} in {time.perf_counter() - t:.1f} s")

    methods = ["sql"] + (["client"] if args.client else [])
    rows, tables = [], {}
    for method in methods:
        times = []
        for _ in range(args.repeats if method == "sql" else 1):
            t = time.perf_counter()
            tables[method] = load_study(
                STUDY, tracking_uri=uri, experiment=EXPERIMENT, method=method
            ).table
            times.append(time.perf_counter() - t)
        rows.append((method, len(tables[method]), statistics.median(times)))
    if len(tables) == 2:
        # The two readers must agree on a big store too, not only on the tests' small one.
        pd.testing.assert_frame_equal(tables["sql"], tables["client"])

    print(f"\nanalysis query (median of {args.repeats} for sql; 1 for client)")
    print(f"| {'reader':<7} | {'runs':>6} | {'seconds':>8} | {'runs/s':>8} |")
    print(f"|{'-' * 9}|{'-' * 8}|{'-' * 10}|{'-' * 10}|")
    for method, n, s in rows:
        print(f"| {method:<7} | {n:>6} | {s:>8.2f} | {n / s:>8.0f} |")


if __name__ == "__main__":
    main()
