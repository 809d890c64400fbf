"""Shared fixtures. One intra-op thread everywhere: these machines have 2 cores, and
oversubscription makes small models many times slower."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "SGDNOISE_ROOT"):
    os.environ.pop(var, None)

from helpers import SMALL, write_project  # noqa: E402


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow sqlite store (migrations take seconds; copying is instant)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def project(tmp_path: Path, mlflow_template: Path) -> Path:
    """A temporary project root holding SMALL as params.yaml and an empty MLflow store."""
    return write_project(tmp_path / "proj", SMALL, mlflow_template)
