"""Shared test set-up: one intra-op thread (2-core machines; oversubscription is slow)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
