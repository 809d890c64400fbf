"""One sweep worker made of a process group: `torchrun --nproc_per_node P -m sgdnoise.cli
sweep STUDY` (or `accelerate launch` of `sgdnoise sweep`).

Rank 0 is the worker as far as Optuna and MLflow know: it claims trials, holds the
liveness record and logs the runs. For each claimed point it broadcasts the grid values
to the other ranks (broadcast_object_list on a gloo group of its own, with a long timeout:
rank 0 may wait minutes for other workers' trials at the end of a sweep), and every rank
calls train() with the same config, which makes them one data-parallel run. A "stop"
message ends the other ranks. If rank 0 dies, torchrun ends the group, and the group's
trial is recovered like any dead worker's.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from pathlib import Path
from typing import Any

from sgdnoise import tracking
from sgdnoise.sweep.spec import StudySpec
from sgdnoise.sweep.state import GridState
from sgdnoise.sweep.status import tty_log
from sgdnoise.sweep.storage import SweepStorage
from sgdnoise.sweep.study import finalize, finished_already, load_study, setup, summary_line
from sgdnoise.sweep.worker import Worker

GROUP_TIMEOUT = timedelta(days=7)


def run_group(spec: StudySpec, store: SweepStorage, root: Path) -> int:
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    cfg0 = spec.config(spec.points[0].values)
    device = cfg0.train.device
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    state = PartialState(cpu=not want_cuda)  # sets up the process group train() will use
    group = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)

    def bcast(message: Any = None) -> Any:
        box = [message]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    from sgdnoise.train import EXIT_PREEMPTED, Preempted, train

    if state.process_index != 0:
        while True:
            message = bcast()
            if message[0] == "stop":
                return int(message[1])
            try:
                train(spec.config(message[1]), root=root)  # MLflow is rank 0's business
            except Preempted:
                return EXIT_PREEMPTED  # every rank stops at the same step

    try:
        code = _rank0(spec, store, root, bcast, state.num_processes)
    except Preempted:
        return EXIT_PREEMPTED  # the other ranks stopped with it; nobody listens any more
    except BaseException:
        with contextlib.suppress(Exception):
            bcast(("stop", 1))
        raise
    bcast(("stop", code))
    return code


def _rank0(spec: StudySpec, store: SweepStorage, root: Path, bcast, processes: int) -> int:
    from sgdnoise.train import train

    log = tty_log()
    done = finished_already(spec, store)
    if done is not None:
        log(summary_line(spec, done) + "; already complete, nothing to run")
        return 0
    uri = tracking.resolve_uri(spec.config(spec.points[0].values), root)
    log(
        f"sweep {spec.name}: one worker of {processes} processes; optuna study "
        f"{spec.optuna_name} in {store.display}; tracking {tracking.redact(uri)}"
    )
    ctx = setup(spec, store, root, uri, log)

    def runner(values: dict[str, Any], tags: dict[str, str]) -> Any:
        bcast(("run", values))
        cfg = spec.config(values)
        return train(cfg, root=root, parent_run_id=ctx.parent_run_id, extra_tags=tags)

    tally = Worker(ctx, runner, log=lambda line: log("[group] " + line)).run()
    study = load_study(spec, store)
    state = GridState(spec, study.get_trials(deepcopy=False))
    if state.complete:
        c = finalize(ctx, study, state)
        log(
            summary_line(spec, c) + f"; {tally.trained} trained now; parent run {ctx.parent_run_id}"
        )
        return 0
    log(f"study {spec.name}: incomplete; run the same command again to resume")
    return 1
