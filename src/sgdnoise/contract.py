"""The names training, sweeps and analysis agree on: MLflow tags, run kinds, statuses and
metrics. Dependency-free, so that the read-only analysis can import it and nothing else
from the training side.

A study is an MLflow parent run tagged kind=study and study=<name>; its grid points are
child runs (mlflow.parentRunId) tagged kind=run, run_key and status, with the resolved
config as dotted params (`train.lr_eff`, ...) and the final metrics below.
"""

from __future__ import annotations

TAG = "sgdnoise."  # every tag of ours starts with this

# Tags
KIND = TAG + "kind"  # what a run is: KIND_RUN, KIND_STUDY or KIND_SWEEP_INVOCATION
STUDY = TAG + "study"  # the study name (parent runs and their children)
RUN_KEY = TAG + "run_key"  # the hash of what was trained (config.Config.run_key)
STATUS = TAG + "status"  # STATUS_FINISHED or STATUS_DIVERGED
STATE_SHA256 = TAG + "state_sha256"  # the final parameters and buffers
TRIAL_NUMBER = TAG + "trial_number"  # the Optuna trial that owns a child run
WORKER = TAG + "worker"  # the sweep worker that trained it
GRID_HASH = TAG + "grid_hash"  # the study's grid (its points' run keys)
MODEL_SOURCE = TAG + "model_source_sha256"  # a user model's module source (model.name)
PARENT = "mlflow.parentRunId"  # MLflow's own parent link

# Values
KIND_RUN, KIND_STUDY, KIND_SWEEP_INVOCATION = "run", "study", "sweep_invocation"
STATUS_FINISHED, STATUS_DIVERGED = "finished", "diverged"

# Metrics every finished run logs (accuracies only for classifiers).
FINAL_TRAIN_LOSS = "final_train_loss"
FINAL_TEST_LOSS = "final_test_loss"
FINAL_TEST_ACCURACY = "final_test_accuracy"
FINAL_TRAIN_ACCURACY = "final_train_accuracy"
DIVERGED = "diverged"  # 1.0 or 0.0
STEPS = "steps"  # optimizer steps taken (fewer when diverged)
EPOCHS = "epochs"
EXAMPLES_PER_SECOND = "examples_per_second"
GRAD_NOISE_SCALE = "grad_noise_scale"  # B_simple, where accumulation measured it
STEPS_TO_TARGET = "steps_to_target"  # the NQM with nqm.target set


def study_experiment(base: str, study: str) -> str:
    """The MLflow experiment of a study: `<tracking.experiment>/<study>`, so that each
    study's grid is one click from the experiments page (single runs stay in `base`)."""
    return f"{base}/{study}"
