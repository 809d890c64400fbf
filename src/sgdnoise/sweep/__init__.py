"""Sweeps: a study's grid, each point run exactly once, resumable, parallel, on one machine
or many. Optuna lives here and nowhere else (DESIGN); MLflow is reached through tracking.

    spec      the study definition: validation, grid expansion, grid hash
    storage   where the Optuna study lives, and the study-wide lock
    liveness  whether the worker holding a RUNNING trial is alive (flock / heartbeat)
    state     the sweep's state as read from Optuna trials
    edges     grid-edge rules (extend past an edge optimum, skip above all-diverged lrs)
    study     create/find the Optuna study and MLflow parent run, enqueue, summarise
    worker    claim, train, report; recover dead workers' trials
    run       `sgdnoise sweep`: validate, set up, fork workers, show progress
    group     a worker made of a torchrun / accelerate process group
    status    `sgdnoise status` and the progress bar
"""

from sgdnoise.sweep.run import run_sweep
from sgdnoise.sweep.status import format_status, study_status

__all__ = ["run_sweep", "study_status", "format_status"]
