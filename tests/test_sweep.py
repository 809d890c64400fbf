"""End-to-end sweeps: the real CLI in subprocesses, real Optuna and MLflow stores in
temporary project directories (each its own params.yaml, mlflow.db, optuna/, data/).

Runs are tiny (a synthetic teacher-student task, a 16-unit MLP, a few dozen steps) so the
tests measure the sweep machinery, not training. Exactly-once is checked in both stores:
one COMPLETE trial per grid point in Optuna, one FINISHED child run per point in MLflow,
cross-referenced both ways, and nothing left RUNNING.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from pg import free_port, throwaway_postgres

from sgdnoise.data.sources import SYNTHETIC_CLASSES, SYNTHETIC_DIM

BASE: dict[str, Any] = {
    "data": {"name": "synthetic", "num_samples": 400},
    "model": {"name": "mlp", "width": 16},
    "train": {
        "budget": {"unit": "steps", "value": 24},
        "batch_size": 32,
        "schedule": "constant",
        "eval_points": 2,
        # One thread: the machine's cores are shared, and a 2-thread OpenMP team whose
        # second thread is descheduled can run a tiny model 50x slower.
        "threads": 1,
    },
}
CORES = len(os.sched_getaffinity(0))


def make_project(root: Path, studies: dict[str, Any], **base: Any) -> Path:
    params = json.loads(json.dumps(BASE))
    for section, values in base.items():
        params[section].update(values)
    params["studies"] = studies
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SGDNOISE_"))}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        out.pop(k, None)
    out["PYTHONUNBUFFERED"] = "1"
    return out


def cli(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sgdnoise.cli", *args],
        cwd=root, env=env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def start(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sgdnoise.cli", *args],
        cwd=root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def status(root: Path, study: str, *extra: str) -> dict[str, Any]:
    proc = cli(root, "status", study, "--json", *extra)
    ok(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- reading the stores ----


def optuna_trials(root: Path, optuna_study: str, storage: str | None = None) -> list[Any]:
    import optuna

    if storage is None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        store = JournalStorage(JournalFileBackend(str(root / "optuna" / f"{optuna_study}.log")))
    else:
        store = optuna.storages.RDBStorage(
            storage.replace("postgresql://", "postgresql+psycopg2://")
        )
    trials = optuna.load_study(study_name=optuna_study, storage=store).get_trials(deepcopy=False)
    if storage is not None:
        store.engine.dispose()
    return trials


def mlflow_runs(root: Path) -> list[dict[str, Any]]:
    """Every run with its tags and params, straight from the sqlite store (no MLflow import).
    One read transaction: a sweep creating runs meanwhile cannot add tags of a run this read
    did not see."""
    with sqlite3.connect(root / "mlflow.db", isolation_level=None) as db:
        db.execute("BEGIN")
        runs = {
            r: {"run_id": r, "status": s, "name": n, "lifecycle": life, "tags": {}, "params": {}}
            for r, s, n, life in db.execute(
                "SELECT run_uuid, status, name, lifecycle_stage FROM runs"
            )
        }
        for r, k, v in db.execute("SELECT run_uuid, key, value FROM tags"):
            runs[r]["tags"][k] = v
        for r, k, v in db.execute("SELECT run_uuid, key, value FROM params"):
            runs[r]["params"][k] = v
        db.execute("COMMIT")
    return list(runs.values())


def check_exactly_once(
    root: Path, study: str, storage: str | None = None
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Every point of the study: one COMPLETE (or skipped) trial and one FINISHED MLflow
    child run, cross-referenced; nothing RUNNING anywhere. Returns (trials, child runs)."""
    st = status(root, study, *(("--storage", storage) if storage else ()))
    assert st["done"] and st["remaining"] == 0, st
    trials = optuna_trials(root, st["optuna_study"], storage)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    skipped = [t for t in trials if t.state.name == "PRUNED"]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    keys = Counter(t.user_attrs["run_key"] for t in done + skipped)
    assert all(n == 1 for n in keys.values()), f"a point has two trials: {keys}"
    assert len(keys) == st["points"]

    runs = mlflow_runs(root)
    parents = [
        r for r in runs
        if r["tags"].get("sgdnoise.kind") == "study" and r["tags"].get("sgdnoise.study") == study
    ]  # fmt: skip
    assert len(parents) == 1 and parents[0]["run_id"] == st["parent_run_id"]
    parent = parents[0]
    assert parent["status"] == "FINISHED"
    assert parent["tags"]["sgdnoise.optuna_study"] == st["optuna_study"]
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["run_id"]]
    assert not [r for r in children if r["status"] == "RUNNING"]
    finished = [r for r in children if r["status"] == "FINISHED"]
    fkeys = Counter(r["tags"]["sgdnoise.run_key"] for r in finished)
    assert all(n == 1 for n in fkeys.values()), f"a point has two finished runs: {fkeys}"
    assert set(fkeys) == {t.user_attrs["run_key"] for t in done}
    by_id = {r["run_id"]: r for r in finished}
    for t in done:  # trial -> run and run -> trial
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run["tags"]["sgdnoise.run_key"] == t.user_attrs["run_key"]
        assert run["tags"]["sgdnoise.trial_number"] == str(t.number)
        assert run["tags"]["sgdnoise.study"] == study
        assert run["tags"]["sgdnoise.kind"] == "run"
        assert run["tags"]["sgdnoise.status"] == t.user_attrs["status"]
    return trials, children


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"sweep exited ({proc.returncode}) before {what}:\n"
                                 + (proc.stdout.read() if proc.stdout else ""))  # fmt: skip
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def running_child(root: Path) -> dict[str, Any] | None:
    """A RUNNING MLflow child run (the moment a worker is mid-run)."""
    if not (root / "mlflow.db").exists():
        return None
    try:
        runs = mlflow_runs(root)
    except sqlite3.Error:
        return None
    live = [r for r in runs if r["status"] == "RUNNING" and r["tags"].get("sgdnoise.kind") == "run"]
    return live[0] if live else None


def pid_of(worker_id: str) -> int:
    return int(worker_id.rsplit("-", 2)[1])  # <host>-<pid>-<nonce>


# ---- two workers, then a re-run ----

GRID = {
    "grid": {
        "train.batch_size": [16, 32],
        "train.lr_eff": {"base": 2, "min_exp": -2, "max_exp": 0},
        "train.seed": [0],
    },
    "fixed": {"train.budget.value": 300},
    "metric": {"name": "final_test_accuracy", "direction": "maximize"},
    "edges": {"extend": False},
}


@pytest.fixture(scope="module")
def two_worker_project(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    # threads unset: the sweep divides the cores among the workers.
    root = make_project(tmp_path_factory.mktemp("two"), {"grid6": GRID}, train={"threads": None})
    return root, cli(root, "sweep", "grid6", "--workers", "2")


def test_two_workers_complete_the_grid_with_no_duplicates(two_worker_project) -> None:
    root, proc = two_worker_project
    out = ok(proc)
    trials, children = check_exactly_once(root, "grid6")
    assert len(trials) == 6 and len(children) == 6  # not one extra trial or run
    # Both workers took part, each with its share of the cores.
    assert len({t.user_attrs["worker"] for t in trials}) == 2, out
    assert {r["params"]["train.threads"] for r in children} == {str(max(1, CORES // 2))}
    assert "6 trained now" in out


def test_rerunning_a_finished_sweep_trains_nothing_and_is_fast(two_worker_project) -> None:
    root, _ = two_worker_project
    before = mlflow_runs(root)
    t0 = time.monotonic()
    out = ok(cli(root, "sweep", "grid6", "--workers", "2"))
    elapsed = time.monotonic() - t0
    assert "nothing to run" in out
    assert elapsed < 10, f"a finished re-run took {elapsed:.1f} s"
    assert len(mlflow_runs(root)) == len(before)
    st = status(root, "grid6")
    assert st["done"] and st["finished"] == 6 and st["running"] == [] and st["eta_s"] == 0
    text = ok(cli(root, "status", "grid6"))
    assert "6/6 points" in text and "complete" in text


def test_the_efficiency_benchmark_reads_a_finished_study(two_worker_project) -> None:
    """benchmarks/study_efficiency.py (issue: the study near the CPU's arithmetic limit) on
    the finished 6-run study: it must keep working; its numbers are not judged here."""
    root, _ = two_worker_project
    script = Path(__file__).parents[1] / "benchmarks" / "study_efficiency.py"

    def bench(*args: str) -> str:
        res = subprocess.run([sys.executable, str(script), "grid6", "--root", str(root), *args],
                             env=env(), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout

    e = json.loads(bench("--json"))
    g = e["grid6"]
    assert g["runs"] == 6 and e["all"]["studies"] == ["grid6"]
    assert [r["batch_size"] for r in g["per_batch_size"]] == [16, 32]
    assert all(r["runs"] == 3 and r["worker_s"] > 0 for r in g["per_batch_size"])
    # Per run, 300 steps of B examples at 3 forward passes' FLOPs; evaluations on top.
    d, k = SYNTHETIC_DIM, SYNTHETIC_CLASSES
    fwd = 2 * (d * 16 + 16 * 16 + 16 * k)  # the 16-unit MLP's multiply-adds
    assert g["train_tflop"] * 1e12 == pytest.approx(3 * 3 * fwd * 300 * (16 + 32))
    assert 0 < g["eval_share"] < 1 and g["ratio"] > 0 and g["ratio_to_gemm"] >= g["ratio"]
    # Time in no run, per worker: between its runs and at the study's two ends; with the
    # workers' busy time, at most the study's wall time on each.
    idle = g["idle"]
    assert idle["between_runs_s"] >= 0 and idle["start_and_end_s"] >= 0
    busy = sum(r["worker_s"] for r in g["per_batch_size"])
    assert busy + idle["between_runs_s"] + idle["start_and_end_s"] <= 2 * g["wall_s"] + 1e-6
    # The peak: the larger of torch's product and the native multiply-add loop, both measured.
    gemm, fma = e["gemm_gflops_one_thread"], e["fma_gflops_one_thread"]
    assert gemm > 0 and fma > 0 and e["peak_gflops_one_thread"] == max(gemm, fma)
    assert 0 < e["fma_median_gflops_one_thread"] <= fma
    assert e["all"]["ratio_to_median_read"] >= e["all"]["ratio"]
    text = bench()
    assert "grid6: 6 runs" in text and "step/peak" in text and "ratio" in text.splitlines()[-1]


def test_the_study_ab_benchmark_sweeps_both_revisions_from_scratch(tmp_path) -> None:
    """benchmarks/study_ab.py alternates the base revision's code (git's src/) and the working
    tree's on one study, each sweep from scratch into a fresh store: at toy size, each of
    them trains all 6 points and is read by the efficiency benchmark (numbers not judged)."""
    root = make_project(tmp_path / "project", {"grid6": GRID})
    script = Path(__file__).parents[1] / "benchmarks" / "study_ab.py"
    res = subprocess.run([sys.executable, str(script), "--base", "HEAD", "--study", "grid6",
                          "--rounds", "1", "--root", str(root), "--json"], env=env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    [row] = out["rounds"]
    assert set(row) == {"HEAD", "working tree"}
    for e in row.values():
        assert e["runs"] == 6 and e["wall_s"] > 0 and e["ratio"] > 0 and e["peak_gflops"] > 0
    assert len(out["wall_ratios"]) == 1 and out["wall_ratios"][0] > 0
    assert not (root / "mlflow.db").exists()  # the project itself is left as it was


# ---- which points a worker claims first, and how much of them ----

BUDGETS = {
    "grid": {
        "train.budget.value": [48, 480],
        "train.lr_eff": [0.125, 0.25, 0.5, 1.0],
        "train.seed": [0],
    },
    "edges": {"extend": False},
}


def packs_by_budget(root: Path) -> dict[int, list[int]]:
    """The pack size of each child run, by its budget (steps), sorted."""
    out: dict[int, list[int]] = {}
    for r in check_exactly_once(root, "budgets")[1]:
        budget = int(float(r["params"]["train.budget.value"]))
        out.setdefault(budget, []).append(int(r["params"].get("derived.pack", "1")))
    return {b: sorted(sizes) for b, sizes in out.items()}


def test_a_worker_claims_the_most_work_first(tmp_path: Path) -> None:
    """The grid lists the 48-step points first; one worker trains the 480-step ones first
    (the longest runs start early, the short ones fill the end)."""
    root = make_project(tmp_path, {"budgets": BUDGETS})
    ok(cli(root, "sweep", "budgets"))
    children = check_exactly_once(root, "budgets")[1]
    with sqlite3.connect(root / "mlflow.db") as db:
        start_ms = dict(db.execute("SELECT run_uuid, start_time FROM runs"))
    first = min(children, key=lambda r: start_ms[r["run_id"]])
    assert float(first["params"]["train.budget.value"]) == 480
    # One worker: a fair share is all the work, so each budget trains as one pack.
    assert packs_by_budget(root) == {48: [4] * 4, 480: [4] * 4}


def test_two_workers_share_the_largest_budget(tmp_path: Path) -> None:
    """A pack takes about a fair share of the work free when it is claimed (to the nearest
    member): of the four 480-step points (4 x 480 + 4 x 48 steps free, half of it is 2.2
    points' work), the first pack takes 2; the other worker's claim then finds 1.2 points'
    share (480 + 480 + 4 x 48 free, halved) and takes 1, and the last is a pack of its own,
    not one worker all four (or three) while the other trains the short runs and then
    waits."""
    root = make_project(tmp_path, {"budgets": BUDGETS})
    ok(cli(root, "sweep", "budgets", "--workers", "2"))
    assert packs_by_budget(root)[480] == [1, 1, 2, 2]


def test_a_restart_into_the_same_store_adopts_its_finished_runs(tmp_path: Path) -> None:
    """--restart forgets the Optuna trials; the runs the tracking store holds are adopted
    (the same keys, the same code path), not trained a second time."""
    study = {"grid": {"train.lr_eff": [0.25, 0.5], "train.seed": [0]}, "edges": {"extend": False}}
    root = make_project(tmp_path, {"again": study})
    ok(cli(root, "sweep", "again"))
    before = {r["run_id"] for r in check_exactly_once(root, "again")[1]}
    out = ok(cli(root, "sweep", "again", "--restart"))
    assert out.count("adopted finished run") == 2 and "0 trained now" in out, out
    trials, children = check_exactly_once(root, "again")
    assert {r["run_id"] for r in children} == before
    assert sorted(t.user_attrs["adopted"] for t in trials) == [True, True]


def test_only_a_point_tried_before_is_looked_up_in_the_store(tmp_path: Path) -> None:
    """A worker adopts a point's FINISHED run (left by a worker that died after the run
    finished, before Optuna heard) instead of training it again. In a sweep whose store held
    no runs of the study when the worker started, only a point with an earlier trial (as
    recover() queues a dead worker's point again) can have one; the store is searched for
    those points alone (each search costs milliseconds, eight between two packs)."""
    from mlflow.tracking import MlflowClient

    from sgdnoise import contract as C
    from sgdnoise import tracking
    from sgdnoise.config import raw_params
    from sgdnoise.paths import default_tracking_uri
    from sgdnoise.sweep.spec import load_spec
    from sgdnoise.sweep.storage import open_storage
    from sgdnoise.sweep.study import setup
    from sgdnoise.sweep.trials import enqueue, load_study
    from sgdnoise.sweep.worker import Worker

    study = {"grid": {"train.lr_eff": [0.5], "train.seed": [0]}, "edges": {"extend": False}}
    root = make_project(tmp_path, {"once": study})
    spec = load_spec(raw_params(root / "params.yaml"), "once")
    store = open_storage(None, root, spec.optuna_name, spec.heartbeat)
    uri = default_tracking_uri(root)
    ctx = setup(spec, store, root, uri, lambda line: None)
    worker = Worker(ctx, lambda values, tags: None)
    worker.study = load_study(spec, store)
    assert not tracking.has_children(uri, ctx.parent_run_id)
    worker._runs_at_start = False  # what run() finds in this fresh store
    (trial,) = worker.study.get_trials(deepcopy=False)
    # The run a dead worker left: finished, never told to Optuna.
    mlf = MlflowClient(uri)
    tags = {C.PARENT: ctx.parent_run_id, C.RUN_KEY: trial.user_attrs["run_key"]}
    run = mlf.create_run(mlf.get_run(ctx.parent_run_id).info.experiment_id, tags=tags)
    mlf.set_terminated(run.info.run_id, "FINISHED")
    assert worker._finished_runs([trial]) == [None]  # one trial of the point: never tried
    enqueue(worker.study, spec, spec.point(json.loads(trial.user_attrs["point"])), "grid")
    (found,) = worker._finished_runs([trial])
    assert found is not None and found[0] == run.info.run_id
    # A worker started now finds the study's runs in the store, and looks every point up.
    assert tracking.has_children(uri, ctx.parent_run_id)


# ---- kill -9 of a worker mid-run, then a restart ----


def test_kill9_worker_mid_run_then_restart_runs_every_point_once(tmp_path: Path) -> None:
    study = {
        "grid": {"train.lr_eff": [0.25, 0.5], "train.seed": [0]},
        # Long enough (seconds, even on a fast machine) to be killed mid-run.
        "fixed": {"train.budget.value": 8000},
        "edges": {"extend": False},
    }
    root = make_project(tmp_path, {"slow": study}, train={"pack": 1})  # one run at a time
    proc = start(root, "sweep", "slow")
    victim = wait_for(lambda: running_child(root), 120, "a run to start", proc)
    workers = wait_for(lambda: list((root / "optuna").glob(".slow-*.workers/*")), 10, "a worker")
    os.kill(pid_of(workers[0].name), signal.SIGKILL)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    assert "killed by signal 9" in out and "run the same command again" in out

    out = ok(cli(root, "sweep", "slow"))
    assert "is dead; point queued again" in out
    trials, children = check_exactly_once(root, "slow")
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1  # the killed attempt, retried as a new trial
    killed = [r for r in children if r["status"] == "KILLED"]
    assert [r["run_id"] for r in killed] == [victim["run_id"]]
    assert killed[0]["tags"]["sgdnoise.trial_number"] == str(failed[0].number)
    # Superseded: on record, out of the runs table (deleted state), its id on the retry.
    assert killed[0]["lifecycle"] == "deleted"
    assert all(r["lifecycle"] == "active" for r in children if r["status"] == "FINISHED")
    retry = [t for t in trials if t.user_attrs.get("superseded_runs")]
    assert [t.user_attrs["superseded_runs"] for t in retry] == [[victim["run_id"]]]
    assert retry[0].state.name == "COMPLETE"
    assert retry[0].user_attrs["run_key"] == failed[0].user_attrs["run_key"]


def test_kill9_of_a_worker_training_a_pack_then_restart_runs_every_point_once(
    tmp_path: Path,
) -> None:
    """A pack is claimed atomically and released as a whole when its worker dies; a member
    that diverged before the kill stays done."""
    study = {
        "grid": {"train.lr_eff": [0.25, 0.5, 1024.0], "train.seed": [0]},
        # The two members left after the third diverges train for seconds: time to kill.
        # (Through the C kernel this tiny model takes about 20 µs a member-step: 15,000 steps
        # had left 0.6 s.)
        "fixed": {"train.budget.value": 90_000},
        "edges": {"extend": False},
    }
    root = make_project(tmp_path, {"packed": study}, train={"pack": 3})
    proc = start(root, "sweep", "packed")

    def diverged_member() -> bool:  # the pack is mid-run: one member done, two RUNNING
        if running_child(root) is None:  # also: no store yet
            return False
        runs = [r for r in mlflow_runs(root) if r["tags"].get("sgdnoise.kind") == "run"]
        return sorted(r["status"] for r in runs) == ["FINISHED", "RUNNING", "RUNNING"]

    wait_for(diverged_member, 120, "a member to diverge", proc)
    workers = wait_for(lambda: list((root / "optuna").glob(".packed-*.workers/*")), 10, "a worker")
    claimed = workers[0].read_text().split()
    assert len(claimed) == 3  # the worker's liveness file names the whole pack
    victims = {
        r["run_id"] for r in mlflow_runs(root)
        if r["status"] == "RUNNING" and r["tags"].get("sgdnoise.kind") == "run"
    }  # fmt: skip
    os.kill(pid_of(workers[0].name), signal.SIGKILL)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out
    assert "pack of 3" in out

    out = ok(cli(root, "sweep", "packed"))
    requeued = out.count("is dead; point queued again")
    # The kill can land between the diverged member's MLflow run finishing and its trial
    # being told to Optuna (seen under load): that point is then queued too, and its
    # finished run adopted instead of trained again.
    assert requeued == 2 or (requeued == 3 and "adopted finished run" in out), out
    assert "pack of 2" in out, out
    trials, children = check_exactly_once(root, "packed")
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == requeued and len(trials) == 3 + requeued
    assert {r["run_id"] for r in children if r["status"] == "KILLED"} == victims
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["status"] for t in done) == ["diverged", "finished", "finished"]
    assert all(r["params"]["derived.pack"] in ("2", "3") for r in children)


# ---- PostgreSQL: two workers, one killed; heartbeat recovery; credentials stay hidden ----


def test_postgres_two_workers_exactly_once_with_heartbeat_recovery(tmp_path: Path) -> None:
    secret = "pw-s3cret-9f2c"
    study = {
        "grid": {"train.lr_eff": [0.125, 0.25, 0.5], "train.seed": [0]},
        # Seconds per pack (through the C kernel: 8,000 steps took 0.5 s): time to kill its
        # worker.
        "fixed": {"train.budget.value": 48_000},
        "edges": {"extend": False},
        "heartbeat": {"interval": 1, "grace_period": 3},
    }
    root = make_project(tmp_path, {"pg": study})
    with throwaway_postgres(password=secret) as url:
        name = status(root, "pg", "--storage", url)["optuna_study"]  # not started yet
        proc = start(root, "sweep", "pg", "--workers", "2", "--storage", url)

        def victim() -> dict[str, Any] | None:
            # The three points are one group: the first worker packs two of them (leaving the
            # other worker its share), the second trains the third. The victim is the pack's
            # worker, once its runs are RUNNING (inside training).
            if running_child(root) is None:
                return None
            held: dict[str, list[int]] = {}
            for t in optuna_trials(root, name, url):
                if t.state.name == "RUNNING":
                    held.setdefault(t.user_attrs["worker"], []).append(t.number)
            for worker, numbers in held.items():
                if len(numbers) == 2:
                    return {"trials": sorted(numbers), "worker": worker}
            return None

        run = wait_for(victim, 120, "a running trial", proc)
        os.kill(pid_of(run["worker"]), signal.SIGKILL)
        out = proc.communicate(timeout=180)[0]
        # The surviving worker noticed the silence and ran the point again.
        assert proc.returncode == 0, out
        assert "killed by signal 9" in out and "is dead; point queued again" in out
        trials, children = check_exactly_once(root, "pg", storage=url)
        # The dead worker's whole pack was failed and run again: the heartbeat covered each
        # of its trials.
        failed = [t for t in trials if t.state.name == "FAIL"]
        assert sorted(t.number for t in failed) == run["trials"]
        assert [r["status"] for r in children].count("KILLED") == 2
        assert len({t.user_attrs["worker"] for t in trials}) == 2
        text = out + ok(cli(root, "status", "pg", "--storage", url))

    assert secret not in text and "***@127.0.0.1" in text
    for r in mlflow_runs(root):
        assert secret not in json.dumps(r)
    assert not (root / "optuna").exists()  # everything Optuna went to PostgreSQL


# ---- grid edges on a synthetic task ----


def test_grid_edges_extend_past_the_optimum_and_skip_above_all_diverged(tmp_path: Path) -> None:
    # On this task (24 steps, constant lr) every seed diverges at 2^9; the train-loss
    # optimum lies far below the initial grid 2^9..2^11.
    study = {
        "grid": {"train.lr_eff": {"base": 2, "min_exp": 9, "max_exp": 11}, "train.seed": [0, 1]},
        "metric": {"name": "final_train_loss", "direction": "minimize"},
        "edges": {"extend": True, "max_extensions": 12, "skip_diverged": True},
    }
    root = make_project(tmp_path, {"edgy": study})
    out = ok(cli(root, "sweep", "edgy"))
    trials, children = check_exactly_once(root, "edgy")
    st = status(root, "edgy")

    by_lr: dict[float, list[Any]] = {}
    for t in trials:
        by_lr.setdefault(t.params["train.lr_eff"], []).append(t)
    diverged_all = [
        lr for lr, ts in by_lr.items()
        if lr > 1 and all(t.user_attrs.get("status") == "diverged" for t in ts)
    ]  # fmt: skip
    assert diverged_all, "the task should diverge for every seed somewhere above 1"
    lowest = min(diverged_all)
    # Skipping: nothing above the lowest all-diverged lr ran, and it is counted as saved.
    above = [t for lr, ts in by_lr.items() if lr > lowest for t in ts]
    assert above and all(t.state.name == "PRUNED" for t in above)
    assert st["skipped"] == len(above) and f"saved {len(above)}" in out
    assert not [r for r in children if float(r["params"]["train.lr_eff"]) > lowest]
    # Extension: powers of two below the grid, for both seeds, until the optimum is interior.
    added = sorted({t.params["train.lr_eff"] for t in trials if t.user_attrs["origin"] == "edge"})
    assert added and max(added) == 2.0**8
    assert added == [2.0**e for e in range(8 - len(added) + 1, 9)]
    assert st["added_by_edges"] == 2 * len(added) and f"added {2 * len(added)} runs" in out
    mean = {
        lr: sum(t.user_attrs["metrics"]["final_train_loss"] for t in ts) / len(ts)
        for lr, ts in by_lr.items()
        if all(t.state.name == "COMPLETE" and t.user_attrs["status"] == "finished" for t in ts)
    }
    best = min(mean, key=mean.get)
    assert min(by_lr) < best < max(mean), f"optimum {best} is not interior: {mean}"
    # Each seed's own optimum is interior too (the analysis reports them), found before
    # the bound.
    for seed in (0, 1):
        own = {
            lr: t.user_attrs["metrics"]["final_train_loss"]
            for lr, ts in by_lr.items()
            for t in ts
            if t.params["train.seed"] == seed and lr in mean
        }
        assert min(by_lr) < min(own, key=own.get) < max(mean), (seed, own)
    assert len(added) < 12


# ---- a worker made of two processes (torchrun, gloo, CPU) ----


def test_torchrun_two_process_worker_runs_a_sweep(tmp_path: Path) -> None:
    study = {
        "grid": {"train.lr_eff": [0.25, 0.5], "train.seed": [0]},
        "edges": {"extend": False},
    }
    root = make_project(tmp_path, {"ddp": study}, train={"device": "cpu"})
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "sgdnoise.cli", "sweep", "ddp"],
        cwd=root, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = ok(proc)
    assert "one worker of 2 processes" in out
    trials, children = check_exactly_once(root, "ddp")
    assert len(trials) == 2 and len(children) == 2
    assert {r["tags"]["sgdnoise.processes"] for r in children} == {"2"}
    assert {r["params"]["derived.processes"] for r in children} == {"2"}


# ---- a dead worker's trial resumes from its checkpoint, in the same MLflow run ----


def test_a_lone_point_steps_through_the_c_kernel_as_a_pack_of_one(tmp_path: Path) -> None:
    """A plain MLP's point without pack mates trains as a pack of one, through the C kernel
    (faster than torch's unpacked step); `train.pack: 1` keeps it out of packs."""
    from sgdnoise.models import native_mlp

    study = {"grid": {"train.lr_eff": [0.25], "train.seed": [0]}, "edges": {"extend": False}}
    for pack, expected in ((None, "1"), (1, None)):
        root = make_project(tmp_path / str(pack), {"one": study}, train={"pack": pack})
        out = ok(cli(root, "sweep", "one"))
        (child,) = check_exactly_once(root, "one")[1]
        native = native_mlp.library() is not None
        if pack is None and native:
            assert "pack of 1" in out, out
            assert child["params"]["derived.pack"] == expected
            assert child["params"]["derived.step_kernel"] == "native"
        else:
            assert "pack of" not in out and "derived.pack" not in child["params"], out


def test_a_worker_of_several_threads_runs_after_the_sweep_prepared_the_data(
    tmp_path: Path,
) -> None:
    """The sweep prepares unprepared data before it forks its workers. A multi-threaded
    torch operation there starts OpenMP's thread team, which a forked worker inherits as
    threads that no longer exist: its first multi-threaded operation (copying the default
    MLP's 256 x 256 weights into a pack) then waited forever. Sized so that both sides run
    such operations: 20,000 x 20 inputs to prepare, 65,536 weights to copy, 2 threads."""
    study = {"grid": {"train.lr_eff": [0.25], "train.seed": [0]}, "edges": {"extend": False}}
    root = make_project(
        tmp_path, {"one": study},
        data={"num_samples": 20000}, model={"width": 256}, train={"threads": 2},
    )  # fmt: skip
    assert not (root / "data").exists()
    out = ok(cli(root, "sweep", "one", timeout=120))
    (child,) = check_exactly_once(root, "one")[1]
    assert child["status"] == "FINISHED", out
    assert child["params"]["train.threads"] == "2"


def test_rerun_of_a_dead_workers_trial_resumes_its_checkpoint(tmp_path: Path) -> None:
    # Long enough to be killed mid-run: through the C kernel this tiny model takes about
    # 20 µs a step, so 3,000 steps (0.2 s) could end between two polls.
    study = {
        "grid": {"train.lr_eff": [0.25], "train.seed": [0]},
        "fixed": {
            "train.budget.value": 100_000,
            "train.checkpoint_every.unit": "steps",
            "train.checkpoint_every.value": 1000,
        },
        "edges": {"extend": False},
    }
    root = make_project(tmp_path, {"long": study})
    proc = start(root, "sweep", "long")
    victim = wait_for(lambda: running_child(root), 120, "a run to start", proc)
    wait_for(lambda: list(root.glob("checkpoints/*/step-*.pt")), 120, "a checkpoint", proc)
    workers = wait_for(lambda: list((root / "optuna").glob(".long-*.workers/*")), 10, "a worker")
    os.kill(pid_of(workers[0].name), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == 1

    out = ok(cli(root, "sweep", "long"))
    assert "resuming" in out, out
    trials, children = check_exactly_once(root, "long")
    assert len([t for t in trials if t.state.name == "FAIL"]) == 1
    finished = [r for r in children if r["status"] == "FINISHED"]
    # The same MLflow run, continued from the checkpoint: not a second run.
    assert [r["run_id"] for r in finished] == [victim["run_id"]]
    assert len(children) == 1
    assert not list(root.glob("checkpoints/*/step-*.pt"))  # cleared once finished
