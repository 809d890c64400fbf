#!/usr/bin/env bash
# One sgdnoise sweep worker on a machine that shares nothing with the others but two URLs
# and a DVC remote: what tests/test_dvc_remote.py proves (fresh clone, `dvc pull`, then
# `sgdnoise sweep STUDY --workers 1 --storage <postgresql URL>` with MLFLOW_TRACKING_URI).
# The SLURM and Kubernetes recipes beside this file clone the project and exec this script.
#
# Variables (environment):
#   STUDY                a study of the committed params.yaml, e.g. constant_epochs
#   OPTUNA_STORAGE       postgresql://USER:PASSWORD@DB_HOST:5432/optuna (never logged)
#   MLFLOW_TRACKING_URI  http://TRACKING_HOST:5000
#   WORKDIR              node-local disk holding this clone (default: the clone's parent)
#   DVC remote credentials as the remote needs them (e.g. AWS_ACCESS_KEY_ID for s3://)
set -euo pipefail
: "${STUDY:?}" "${OPTUNA_STORAGE:?}" "${MLFLOW_TRACKING_URI:?}"
cd "$(dirname "$0")/.."
WORKDIR="${WORKDIR:-$(dirname "$PWD")}"

# Workers on one node share the clone, its environment and one copy of the data: the
# first sets them up, the others wait on the lock and find them ready.
(
    flock 9
    make setup
    # Hard links from DVC's cache: the prepared data on disk once, not twice.
    .venv/bin/dvc config --local cache.type hardlink,copy
    # The prepare stage's output alone (data/prepared/<dataset>), never the raw files.
    .venv/bin/dvc pull prepare
) 9>"$WORKDIR/.sgdnoise-setup.lock"

# exec: the scheduler's SIGTERM reaches the sweep, which checkpoints (when enabled), hands
# its point back to the queue and exits 75; a later worker resumes it.
exec .venv/bin/sgdnoise sweep "$STUDY" --workers 1 --storage "$OPTUNA_STORAGE"
