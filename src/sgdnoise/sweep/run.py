"""`sgdnoise sweep STUDY [--workers N] [--storage URL]`: run a study's grid, exactly once.

The command validates the whole study, finds or creates the Optuna study and the MLflow
parent run (this also initialises a fresh MLflow database, once, before any worker
starts: concurrent first initialisation races), then forks N worker processes and shows
progress until they are done. Re-running the same command resumes; a finished study
returns at once, having read nothing but Optuna.

Workers are forked after the heavy imports (torch, torchvision, MLflow's SQL store), so
each starts training in milliseconds, not in the ~10 s a fresh interpreter needs here;
every database connection is closed before the fork so that no worker shares one. Each
worker gets cores // N intra-op threads (OMP_NUM_THREADS too): workers x threads <= cores.
This process computes on one thread (see run_sweep).

Under torchrun / accelerate launch (WORLD_SIZE > 1) the command is one worker made of a
process group instead; see group.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Mapping
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from sgdnoise import contract as C
from sgdnoise import tracking
from sgdnoise.config import Config, ConfigError
from sgdnoise.paths import project_root
from sgdnoise.sweep.spec import StudySpec, load_spec
from sgdnoise.sweep.state import GridState
from sgdnoise.sweep.status import Progress, tty_log
from sgdnoise.sweep.storage import open_storage
from sgdnoise.sweep.study import (
    finalize,
    finished_already,
    load_study,
    setup,
    summary_line,
    verify_store,
)
from sgdnoise.sweep.worker import SweepContext, Worker, local_pack_runner, local_runner

EXIT_INCOMPLETE = 1
EXIT_TRACKING = 3  # as `sgdnoise train`: the tracking store could not be reached


def run_sweep(
    raw: Mapping[str, Any], study: str, *, workers: int = 1, storage: str | None = None,
    restart: bool = False,
) -> int:  # fmt: skip
    """`restart`: forget the study's Optuna trials first (not its MLflow runs) and run every
    point again, into the tracking store in use now; a point whose finished run that store
    holds already (under the study's parent run) is adopted, not trained again."""
    import torch

    # One thread here, before any torch operation (checking user models, preparing the
    # data): a multi-threaded one starts OpenMP's thread team, and a forked worker inherits
    # it as threads that no longer exist, so its first multi-threaded operation waits for
    # them forever. Each worker, and a run under torchrun, sets its own count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_sweep(raw, study, workers, storage, restart)
    finally:
        torch.set_num_threads(threads)


def _run_sweep(
    raw: Mapping[str, Any], study: str, workers: int, storage: str | None, restart: bool
) -> int:
    root = project_root()
    spec = load_spec(raw, study)  # every grid point validated before anything is created
    user_models = check_points(spec, root)
    store = open_storage(storage, root, spec.optuna_name, spec.heartbeat)
    cfg0 = spec.config(spec.points[0].values)
    uri = tracking.resolve_uri(cfg0, root)
    if int(os.environ.get("RANK", "0")) == 0:  # in a torchrun group, rank 0 talks to Optuna
        if restart:
            with store.lock(spec.optuna_name):
                store.delete(spec.optuna_name)
        verify_store(spec, store, uri)  # never "complete" with its runs in another store
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if workers != 1:
            raise ConfigError(
                "--workers", f"{workers} under torchrun / accelerate launch",
                "1 (the process group is the worker; start more groups to add workers)",
            )  # fmt: skip
        from sgdnoise.sweep.group import run_group

        return run_group(spec, store, root)

    log = tty_log()
    done = finished_already(spec, store)
    if done is not None:
        log(summary_line(spec, done) + "; already complete, nothing to run")
        return 0
    say_unpackable(user_models, log)

    threads = worker_threads(cfg0, workers)
    log(
        f"sweep {spec.name}: {len(spec.points)} grid points, {workers} worker(s) x "
        f"{threads} thread(s); optuna study {spec.optuna_name} in {store.display}; "
        f"tracking {tracking.redact(uri)}"
    )
    try:
        ctx = setup(spec, store, root, uri, log, threads)
        ctx.workers = workers
    except tracking.TrackingUnavailable as e:
        print(f"error: tracking: {e}", file=sys.stderr)
        return EXIT_TRACKING
    _tag_invocation(ctx)
    _prewarm(root, cfg0)
    # No pooled database connection may cross the fork.
    tracking.release_connections(uri)
    store.release()

    started = time.time()
    try:
        exits = _run_workers(ctx, workers, log)
    except KeyboardInterrupt:
        log(f"study {spec.name}: interrupted; run the same command again to resume")
        return 130
    return _finish(ctx, exits, started, log)


def check_points(spec: StudySpec, root: Path) -> list[tuple[Config, Any]]:
    """Every grid point against its data, before any trial or run exists: B against the
    training set, the metric against the task, and each distinct user model (or a model on
    user data) built and run once (train.preflight). Nothing is written: the data is read
    in memory when it is not prepared yet. Returns the user models checked, each with its
    data's facts (for the packing message)."""
    from sgdnoise.config import check_batch_size
    from sgdnoise.data.store import describe
    from sgdnoise.models.check import check_model
    from sgdnoise.sweep.spec import ACCURACY_METRICS
    from sgdnoise.train import needs_check, task_of
    from sgdnoise.usercode import is_import_path

    facts: dict[str, Any] = {}
    checked: dict[str, tuple[Config, Any]] = {}
    for point in spec.points:
        cfg = spec.config(point.values)
        if cfg.data.name == "nqm":
            continue
        key = repr(cfg.data)
        if key not in facts:
            facts[key] = describe(cfg.data, root)
            if facts[key].task == "reconstruction" and spec.metric.name in ACCURACY_METRICS:
                raise ConfigError(
                    f"{spec.key}.metric.name",
                    f"{spec.metric.name}, but {cfg.data.name} has no labels (reconstruction)",
                    "final_test_loss | final_train_loss",
                )  # fmt: skip
        f = facts[key]
        check_batch_size(cfg, f.n_train)
        model_key = key + repr(cfg.model)
        if needs_check(cfg) and model_key not in checked:
            check_model(cfg.model, f.input_shape, f.num_classes, task_of(cfg, {"task": f.task}))
            checked[model_key] = (cfg, f)
    return [(c, f) for c, f in checked.values() if is_import_path(c.model.name)]


def say_unpackable(models: list[tuple[Config, Any]], log) -> None:
    """Once per sweep, for each user model that packing would apply to but cannot: which,
    and why (its runs then train one by one; sgdnoise.pack)."""
    from sgdnoise.pack import pack_problem

    said: set[str] = set()
    for cfg, facts in models:
        if cfg.train.pack == 1 or repr(cfg.model) in said:
            continue
        said.add(repr(cfg.model))
        problem = pack_problem(cfg, facts.input_shape, facts.num_classes)
        if problem is not None:
            log(f"model {cfg.model.name} cannot be packed ({problem}); its runs train one by one")


def worker_threads(cfg: Config, workers: int) -> int:
    """Each worker's share of the cores; train.threads, when set, is a ceiling."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cores or 1) // workers)
    return min(share, cfg.train.threads) if cfg.train.threads else share


def _tag_invocation(ctx: SweepContext) -> None:
    """Under `mlflow run -e sweep`, MLflow made a run for this command: link it to the
    study's parent run (a different kind, so the analysis never mistakes it for the study)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or run_id == ctx.parent_run_id:
        return
    try:
        tracking.tag_run(
            ctx.tracking_uri, run_id,
            {C.KIND: C.KIND_SWEEP_INVOCATION, C.STUDY: ctx.spec.name,
             C.TAG + "study_run_id": ctx.parent_run_id},
        )  # fmt: skip
    except Exception:  # another tracking store than mlflow run's: nothing to link
        pass


def _prewarm(root: Path, cfg: Config) -> None:
    """Import what a run needs once, here, so forked workers inherit it; prepare the data
    once, so workers neither race to prepare it nor size packs without its shape."""
    import accelerate  # noqa: F401
    import torch  # noqa: F401

    import sgdnoise.data.store  # noqa: F401
    import sgdnoise.models.build  # noqa: F401
    import sgdnoise.train  # noqa: F401

    tracking.git_commit(root)
    tracking.package_versions()
    if cfg.data.name != "nqm":
        sgdnoise.data.store.ensure_prepared(cfg.data, root)


def _run_workers(ctx: SweepContext, n: int, log) -> list[int | None]:
    mp = multiprocessing.get_context("fork")
    procs = [
        mp.Process(target=_worker_main, args=(ctx, i), name=f"sweep-worker-{i}") for i in range(n)
    ]
    for p in procs:
        p.start()
    progress = Progress(ctx.spec, ctx.store)
    reported: set[int] = set()

    def forward(signum: int, frame: Any) -> None:
        # A scheduler's SIGTERM to this process: pass it on; each worker checkpoints (if
        # enabled), hands its point back to the queue and exits 75.
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while any(p.is_alive() for p in procs):
            wait([p.sentinel for p in procs if p.is_alive()], timeout=1.0)
            progress.draw()
            for i, p in enumerate(procs):
                if p.exitcode is not None and p.exitcode < 0 and i not in reported:
                    reported.add(i)
                    progress.close()
                    log(f"worker {i} (pid {p.pid}) was killed by signal {-p.exitcode}")
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the workers too: each hands its run back to the
        # queue and marks its MLflow run KILLED before it exits.
        progress.close()
        log("interrupted: waiting for the workers to hand their runs back ...")
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous)
    for i, p in enumerate(procs):
        if p.exitcode is not None and p.exitcode < 0 and i not in reported:
            log(f"worker {i} (pid {p.pid}) was killed by signal {-p.exitcode}")
    return [p.exitcode for p in procs]


def _worker_main(ctx: SweepContext, index: int) -> None:
    # The parent forwards SIGTERM; until a run installs train()'s own handler (checkpoint,
    # then Preempted) the default applies and the dead-worker recovery takes over.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threads = ctx.threads or 1
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    log = tty_log()
    prefix = f"[worker {index}] "
    worker = Worker(
        ctx, local_runner(ctx), log=lambda line: log(prefix + line),
        pack_runner=local_pack_runner(ctx), from_the_end=index % 2 == 1,
    )  # fmt: skip
    from sgdnoise.train import EXIT_PREEMPTED, Preempted

    try:
        tally = worker.run()
    except KeyboardInterrupt:
        sys.exit(130)
    except Preempted:
        sys.exit(EXIT_PREEMPTED)
    sys.exit(1 if tally.failed else 0)


def _finish(ctx: SweepContext, exits: list[int | None], started: float, log) -> int:
    spec: StudySpec = ctx.spec
    study = load_study(spec, ctx.store)
    state = GridState(spec, study.get_trials(deepcopy=False))
    ran_now = sum(
        1
        for t in state.trials
        if t.datetime_start is not None
        and t.datetime_start.timestamp() >= started - 1
        and t.user_attrs.get("mlflow_run_id")
        and not t.user_attrs.get("adopted")
    )
    if state.complete:
        try:
            c = finalize(ctx, study, state)
        except tracking.TrackingUnavailable as e:
            print(f"error: tracking: {e}; the runs are done, re-run to log the summary",
                  file=sys.stderr)  # fmt: skip
            return EXIT_TRACKING
        log(summary_line(spec, c) + f"; {ran_now} trained now; parent run {ctx.parent_run_id}")
        return 0
    c = state.counts()
    from sgdnoise.train import EXIT_PREEMPTED

    if EXIT_PREEMPTED in exits:
        log(f"study {spec.name}: stopped by SIGTERM; run the same command again to resume")
        return EXIT_PREEMPTED
    reasons = []
    if any(code is not None and code < 0 for code in exits):
        reasons.append("a worker was killed")
    if c["failed"]:
        reasons.append(f"{c['failed']} point(s) failed (see the errors above)")
    remaining = c["waiting"] + c["running"] + c["failed"] + c["missing"]
    log(
        f"study {spec.name}: incomplete, {remaining} point(s) left"
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + "; run the same command again to resume"
    )
    return EXIT_INCOMPLETE
