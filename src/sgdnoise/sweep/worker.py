"""A sweep worker: claim a waiting grid point, train it, report it; until none remain.

Exactly once, by construction rather than by clean-up:
- Every grid point is enqueued once as a WAITING trial (study.py, under the study lock).
  Workers never call `study.ask()`, so GridSampler never draws a point itself (with
  several workers it would repeat points).
- A claim is the atomic WAITING -> RUNNING transition of the storage
  (`set_trial_state_values` returns False to all but one claimer), taken under the study
  lock together with the liveness record that says who holds it.
- A dead worker's RUNNING trial is failed and its point enqueued again, both under the
  lock, so a point never has two live trials. Its RUNNING MLflow run is marked KILLED.
- Before training, the worker looks for a FINISHED MLflow child run of the point (a
  worker killed between finishing its run and telling Optuna leaves one) and adopts it.
- A trial that a storage failed behind a worker's back (a heartbeat that went stale while
  the worker still lived) cannot be completed; that worker marks its own run KILLED.

Results: a diverged run is a COMPLETE trial (it is data, not a failure). Optuna cannot
store NaN, so a trial's value is its metric when finite, else the worst finite value for
the study's direction (-/+ sys.float_info.max); the real metrics, NaN as null, are in the
trial's `metrics` user attribute and in MLflow. A training error FAILs the trial; its
point is tried again on the next start of the sweep (not in a loop within one).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial

from sgdnoise import contract as C
from sgdnoise import tracking
from sgdnoise.sweep import edges
from sgdnoise.sweep.spec import Point
from sgdnoise.sweep.state import GridState
from sgdnoise.sweep.study import SweepContext, enqueue, extend, recover
from sgdnoise.sweep.trials import Trials, load_study, trial_id

T = C.TAG
WAIT, AGAIN, DONE = "wait", "again", "done"
POLL_SECONDS = 1.0
# Metrics copied onto the trial (user attribute `metrics`).
TRIAL_METRICS = (
    C.FINAL_TEST_ACCURACY, C.FINAL_TRAIN_ACCURACY, C.FINAL_TEST_LOSS, C.FINAL_TRAIN_LOSS,
    C.DIVERGED, C.STEPS, C.STEPS_TO_TARGET,
)  # fmt: skip


@dataclass
class Tally:
    trained: int = 0
    adopted: int = 0
    skipped: int = 0
    failed: int = 0
    recovered: int = 0
    added: int = 0
    errors: list[str] = field(default_factory=list)


# (grid values, extra MLflow tags) -> the train() result
Runner = Callable[[dict[str, Any], dict[str, str]], Any]
# (grid values per member, tags per member, on_done(i, result)) -> results: a pack
PackRunner = Callable[
    [list[dict[str, Any]], list[dict[str, str]], Callable[[int, Any], None]], list[Any]
]


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def local_runner(ctx: SweepContext) -> Runner:
    """Train in this process, through the same code path as `sgdnoise train`."""

    def run(values: dict[str, Any], tags: dict[str, str]) -> Any:
        from sgdnoise.train import train

        cfg = ctx.spec.config(values, threads=ctx.threads)
        return train(cfg, root=ctx.root, parent_run_id=ctx.parent_run_id, extra_tags=tags)

    return run


def local_pack_runner(ctx: SweepContext) -> PackRunner:
    """Train a pack in this process (sgdnoise.pack: one packed model, a run per member)."""

    def run(values: list[dict[str, Any]], tags: list[dict[str, str]], on_done) -> list[Any]:
        from sgdnoise.pack import train_pack

        cfgs = [ctx.spec.config(v, threads=ctx.threads) for v in values]
        return train_pack(cfgs, root=ctx.root, parent_run_id=ctx.parent_run_id,
                          extra_tags=tags, on_done=on_done)  # fmt: skip

    return run


def stderr_log(prefix: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        print(f"{prefix}{line}", file=sys.stderr, flush=True)

    return log


class Worker:
    def __init__(
        self,
        ctx: SweepContext,
        runner: Runner,
        *,
        worker_id: str | None = None,
        log: Callable[[str], None] | None = None,
        poll_seconds: float = POLL_SECONDS,
        pack_runner: PackRunner | None = None,
        from_the_end: bool = False,
    ):
        """Without `pack_runner` every trial trains on its own (train.pack is ignored).
        Workers claim the waiting point with the most training FLOPs first. Among equal
        ones, `from_the_end` claims the last waiting point first (the grid's largest B), so
        that two local workers train different ends of the grid at once: small batches are
        bound by memory traffic, large ones by arithmetic, and one of each shares a
        machine's memory bandwidth better than two of either."""
        self.ctx, self.spec, self.store = ctx, ctx.spec, ctx.store
        self.runner, self.log, self.poll = runner, log or stderr_log(""), poll_seconds
        self.pack_runner = pack_runner
        self.from_the_end = from_the_end
        self._pack_sizes: dict[str, int] = {}
        self._solo: dict[str, bool] = {}
        self._works: dict[str, float] = {}  # by group
        self._work_of: dict[int, float] = {}  # by trial number
        self.worker_id = worker_id or new_worker_id()
        self.tally = Tally()
        self.study: Any = None
        self.live: Any = None
        self._runs_at_start = True  # whether the store held this study's runs at run()

    # ---- the loop ----
    def run(self) -> Tally:
        self.study = load_study(self.spec, self.store)
        self.trials = Trials(self.study)
        self._runs_at_start = tracking.has_children(self.ctx.tracking_uri, self.ctx.parent_run_id)
        self.live = self.store.liveness(self.spec.optuna_name, self.worker_id)
        self.live.start()
        try:
            while True:
                token = self.store.version()
                step = self._next()
                if step == DONE:
                    break
                if step == WAIT:
                    self.store.wait(token, self.poll)
                elif step != AGAIN:
                    alone = len(step) == 1 and not self._pack_of_one(step[0])
                    group = self._execute(step) if alone else self._execute_pack(step)
                    if group is not None:
                        self._extend(group)
        finally:
            self.live.stop()
        return self.tally

    def _state(self) -> GridState:
        return GridState(self.spec, self.study.get_trials(deepcopy=False))

    def _next(self) -> list[FrozenTrial] | str:
        with self.store.lock(self.spec.optuna_name):
            state = self._state()
            n = recover(self.ctx, self.study, self.live, state, self.log)
            if n:
                self.tally.recovered += n
                state = self._state()
            if state.missing():  # a crash while enqueueing; harmless to finish here
                for p in state.missing():
                    enqueue(self.study, self.spec, p, "grid")
                return AGAIN
            waiting = state.waiting()
            if self.from_the_end:
                waiting = waiting[::-1]
            # The most work first (a stable sort: equal work keeps the order above), so that
            # the longest runs start early and the short ones fill the workers' last minutes.
            for t in sorted(waiting, key=self._work, reverse=True):
                decision = state.skip_decision(t)
                if decision == edges.BLOCKED:
                    continue  # waits for a smaller learning rate to finish
                if not self._claim(t):
                    continue
                if decision == edges.SKIP:
                    self._skip(t)
                    return AGAIN
                pack = [t] + self._pack_mates(state, t)
                return [self.trials.get(x) for x in pack]
            if state.waiting() or state.running():
                return WAIT
            if self._extend_locked(state, None):
                return AGAIN
            return DONE

    def _claim(self, t: FrozenTrial, add: bool = False) -> bool:
        """WAITING -> RUNNING, atomically; under the study lock."""
        self.live.before_claim(trial_id(t), add=add)
        claimed = self.trials.claim(t)
        if claimed:
            self.trials.set_attr(t, "worker", self.worker_id)
        return claimed

    def _work(self, t: FrozenTrial) -> float:
        """A waiting trial's training FLOPs (the same for its whole group)."""
        from sgdnoise.pack import training_flops

        if t.number not in self._work_of:
            group = _group(t)
            if group not in self._works:
                cfg = self.spec.config(json.loads(t.user_attrs["point"]))
                self._works[group] = training_flops(cfg, self.ctx.root)
            self._work_of[t.number] = self._works[group]
        return self._work_of[t.number]

    def _pack_of_one(self, t: FrozenTrial) -> bool:
        """Whether a trial without pack mates still trains through the pack runner: its
        runs step through the C kernel there, faster than alone (sgdnoise.pack.native_mlp_runs)."""
        if self.pack_runner is None:
            return False
        from sgdnoise.pack import native_mlp_runs, pack_key

        cfg = self.spec.config(json.loads(t.user_attrs["point"]))
        key = pack_key(cfg)
        if key not in self._solo:
            self._solo[key] = cfg.train.pack != 1 and native_mlp_runs(cfg)
        return self._solo[key]

    def _pack_mates(self, state: GridState, first: FrozenTrial) -> list[FrozenTrial]:
        """Claim up to pack size - 1 more waiting trials that can train with `first`: the
        same group (every grid key but lr and seed equal, so the same model, B and budget).
        Under the study lock."""
        if self.pack_runner is None:
            return []
        from sgdnoise.pack import pack_key, pack_size

        cfg = self.spec.config(json.loads(first.user_attrs["point"]))
        key = pack_key(cfg)
        if key not in self._pack_sizes:
            self._pack_sizes[key] = pack_size(cfg, self.ctx.root)
        size = self._pack_sizes[key]
        if size == 1:
            return []
        # Only points free to run now: a pack never runs a point the edge rules would skip,
        # so packing changes when points train, never which.
        free = [
            t for t in state.waiting()
            if trial_id(t) != trial_id(first) and state.skip_decision(t) == edges.RUN
        ]  # fmt: skip
        group = _group(first)
        mates = [t for t in free if _group(t) == group]
        if len(free) - len(mates) < self.ctx.workers - 1:
            # No other group for every other worker: leave them their share of this one.
            size = min(size, -(-(len(mates) + 1) // self.ctx.workers))
        # A pack's work about a fair share of the work free now (to the nearest member), so
        # that one worker does not train most of a study's largest budget while the others
        # run out of work. Rounded up, a study's last two long runs (an edge point's seeds,
        # added when its neighbours finished) went to one worker whenever a few short runs
        # were still free: the other waited out the pair (epoch_budgets: 7 s of 31).
        fair = (self._work(first) + sum(self._work(t) for t in free)) / self.ctx.workers
        size = min(size, max(1, math.floor(fair / self._work(first) + 0.5)))
        pack = [first]
        for t in mates:
            if len(pack) >= size:
                break
            if self._claim(t, add=True):
                pack.append(t)
        if len(pack) > 1:  # which trials trained together (benchmarks, status, provenance)
            for t in pack:
                self.trials.set_attr(t, "pack", first.number)
        return pack[1:]

    # ---- one trial ----
    def _execute(self, trials: list[FrozenTrial]) -> str | None:
        """Train (or adopt) the claimed trial; return its group when it completed."""
        (t,) = trials
        values = json.loads(t.user_attrs["point"])
        point = self.spec.point(values)
        (found,) = self._finished_runs([t])
        if found is not None and self._adopt(t, found):
            self.log(f"trial {t.number} {point.run_name}: adopted finished run {found[0]}")
            return point.group
        t0 = time.monotonic()
        with self.live.running([trial_id(t)]):
            try:
                result = self.runner(values, self._tags(t))
            except BaseException as e:
                interrupted = _interruption(e)
                self._fail(t, e, interrupted)
                if interrupted:
                    raise  # stop this worker: Ctrl-C or SIGTERM
                return None
        return point.group if self._report(t, result, t0) else None

    def _finished_runs(
        self, trials: list[FrozenTrial]
    ) -> list[tuple[str, dict[str, float], str] | None]:
        """The FINISHED run of each trial's point in the tracking store, if there is one
        (adopted, not trained again). Only a point tried before can have one: the store held
        runs of this study when this worker started (an earlier sweep, --restart, other
        machines' workers), or the journal holds an earlier trial of the point (of a worker
        that died or was stopped after its run finished, before Optuna heard). Otherwise the
        store's search is left out: a few ms a point, 8 of them between two packs."""
        keys = [t.user_attrs["run_key"] for t in trials]
        if self._runs_at_start:
            tried = set(keys)
        else:
            seen = Counter(
                x.user_attrs.get("run_key") for x in self.study.get_trials(deepcopy=False)
            )
            tried = {k for k in keys if seen[k] > 1}
        return [
            tracking.finished_child(self.ctx.tracking_uri, self.ctx.parent_run_id, k)
            if k in tried else None
            for k in keys
        ]  # fmt: skip

    def _execute_pack(self, trials: list[FrozenTrial]) -> str | None:
        """Adopt what finished already, train the rest as one pack; each member is reported
        as soon as it finishes or diverges. Returns the group when all completed."""
        group = self.spec.point(json.loads(trials[0].user_attrs["point"])).group
        todo = []
        for t, found in zip(trials, self._finished_runs(trials), strict=True):
            if found is not None and self._adopt(t, found):
                self.log(f"trial {t.number} {t.user_attrs.get('run_name', '')}: adopted "
                         f"finished run {found[0]}")  # fmt: skip
            else:
                todo.append(t)
        if not todo:
            return group
        assert self.pack_runner is not None
        t0 = time.monotonic()
        reported: dict[int, bool] = {}

        def on_done(i: int, result: Any) -> None:
            reported[i] = self._report(todo[i], result, t0)

        numbers = " ".join(str(t.number) for t in todo)
        self.log(f"pack of {len(todo)}: trials {numbers}")
        values = [json.loads(t.user_attrs["point"]) for t in todo]
        with self.live.running([trial_id(t) for t in todo]):
            try:
                self.pack_runner(values, [self._tags(t) for t in todo], on_done)
            except BaseException as e:
                interrupted = _interruption(e)
                for i, t in enumerate(todo):
                    if i not in reported:  # members that finished before stay finished
                        self._fail(t, e, interrupted)
                if interrupted:
                    raise
                return None
        return group if all(reported.get(i) for i in range(len(todo))) else None

    def _tags(self, t: FrozenTrial) -> dict[str, str]:
        return {
            C.STUDY: self.spec.name,
            C.TRIAL_NUMBER: str(t.number),
            T + "optuna_study": self.spec.optuna_name,
            C.GRID_HASH: self.spec.grid_hash,
            C.WORKER: self.worker_id,
            T + "origin": t.user_attrs.get("origin", "grid"),
        }

    def _report(self, t: FrozenTrial, result: Any, t0: float) -> bool:
        """Complete the trial with a run's result; True when it counted."""
        if result.run_id is None:  # a rank other than 0 never reaches here
            raise RuntimeError("train() returned no MLflow run id on the main process")
        done = self._complete(t, result.run_id, result.status, result.metrics)
        if done:
            self.tally.trained += 1
            m = self.spec.metric.name
            value = result.metrics.get(m, math.nan)
            name = self.spec.point(json.loads(t.user_attrs["point"])).run_name
            self.log(
                f"trial {t.number} {name}: {result.status}, {m}={value:.4g} "
                f"({time.monotonic() - t0:.1f} s)"
            )
        return done

    def _adopt(self, t: FrozenTrial, found: tuple[str, dict[str, float], str]) -> bool:
        """Take over the FINISHED run a dead (or presumed dead) attempt left behind."""
        run_id, metrics, status = found
        uri = self.ctx.tracking_uri
        # run -> trial: the adopted run now names this attempt, and this worker.
        tracking.tag_run(uri, run_id, {C.TRIAL_NUMBER: str(t.number), C.WORKER: self.worker_id})
        # A presumed-dead worker that still lived marks its run KILLED when it learns its
        # trial was taken over, unless the run was adopted first: look again after tagging.
        if tracking.run_status(uri, run_id) != "FINISHED":
            return False
        self.trials.set_attr(t, "adopted", True)
        self._complete(t, run_id, status, metrics)
        self.tally.adopted += 1
        return True

    def _complete(
        self, t: FrozenTrial, run_id: str, status: str, metrics: dict[str, float]
    ) -> bool:
        """The trial takes the run's result. The run names the trial already (tags trial
        number and worker: set when it was created, with its final metrics when it resumed
        an earlier attempt's checkpoint, or by _adopt)."""
        kept = {k: _finite(metrics.get(k)) for k in TRIAL_METRICS if k in metrics}
        self.trials.set_attr(t, "mlflow_run_id", run_id)
        self.trials.set_attr(t, "status", status)
        self.trials.set_attr(t, "metrics", kept)
        value = _finite(metrics.get(self.spec.metric.name))
        if value is None or status == "diverged" and value is None:
            value = (
                -sys.float_info.max
                if self.spec.metric.direction == "maximize"
                else sys.float_info.max
            )
        ok = self.trials.complete(t, value)
        if not ok:
            # Our trial was declared dead while we still ran (a heartbeat that went stale):
            # the point was handed to another worker, so this run must not count as its
            # finished run, unless that worker adopted it already (it re-tagged the run).
            uri = self.ctx.tracking_uri
            if tracking.run_tags(uri, run_id).get(C.TRIAL_NUMBER) == str(t.number):
                tracking.set_run_status(uri, run_id, "KILLED")
                self.log(f"trial {t.number}: taken over by another worker; run {run_id} KILLED")
        return ok

    def _fail(self, t: FrozenTrial, e: BaseException, interrupted: bool) -> None:
        message = f"{type(e).__name__}: {e}"[:500]
        try:
            self.trials.set_attr(t, "error", message)
            self.trials.fail(t)
            if interrupted:
                # Stopped from outside (Ctrl-C, SIGTERM): the point itself is fine; queue it
                # again now. With checkpoints on, whoever runs it next resumes the run.
                try:
                    killed = tracking.kill_children(
                        self.ctx.tracking_uri, self.ctx.parent_run_id, t.number,
                        ("RUNNING", "FAILED"),
                    )  # fmt: skip
                except Exception:  # the tracking store may be down: requeue all the same
                    killed = []
                with self.store.lock(self.spec.optuna_name):
                    point = self.spec.point(json.loads(t.user_attrs["point"]))
                    enqueue(self.study, self.spec, point, t.user_attrs.get("origin", "grid"),
                            killed)  # fmt: skip
        except Exception:  # keep the original error visible
            pass
        if not interrupted:
            self.tally.failed += 1
            self.tally.errors.append(f"trial {t.number}: {message}")
            self.log(f"trial {t.number} FAILED: {message}")
            self.log("".join(traceback.format_exception(e)).rstrip())

    def _skip(self, t: FrozenTrial) -> None:
        self.trials.set_attr(t, "status", "skipped")
        self.trials.set_attr(
            t, "skip_reason", "a smaller learning rate above 1 diverged for every seed"
        )
        self.trials.prune(t)
        self.tally.skipped += 1
        point = self.spec.point(json.loads(t.user_attrs["point"]))
        self.log(f"trial {t.number} {point.run_name}: skipped (all seeds diverged below it)")

    # ---- grid edges ----
    def _extend(self, group: str) -> None:
        with self.store.lock(self.spec.optuna_name):
            self._extend_locked(self._state(), group)

    def _extend_locked(self, state: GridState, group: str | None) -> int:
        added = extend(self.spec, self.study, state, group, self.log)
        self.tally.added += added
        return added


def _group(t: FrozenTrial) -> str:
    return Point(json.loads(t.user_attrs["point"]), "", "").group


def _interruption(e: BaseException) -> bool:
    """Ctrl-C, SystemExit, or train()'s Preempted (SIGTERM, checkpoint written)."""
    if not isinstance(e, Exception):
        return True
    from sgdnoise.train import Preempted  # imported already: the runner trains

    return isinstance(e, Preempted)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
