"""`sgdnoise dashboard STUDY`: optuna-dashboard over a study's own Optuna storage.

The storage is the sweep's (the study's journal under optuna/, or `--storage` for a
PostgreSQL one), served on 127.0.0.1 only: the dashboard has no authentication. Its trials
are the grid points, with their states (waiting, running, complete, pruned for the points
the edge rules skipped), values and the attributes the sweep records (MLflow run id, status,
metrics, worker, pack).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sgdnoise.config import ConfigError
from sgdnoise.paths import project_root
from sgdnoise.sweep.spec import load_spec
from sgdnoise.sweep.storage import open_storage


def serve(raw: Mapping[str, Any], study: str, *, storage: str | None, port: int) -> None:
    """Serve until interrupted. ConfigError when the study has no trials in that storage."""
    spec = load_spec(raw, study)
    store = open_storage(storage, project_root(), spec.optuna_name, spec.heartbeat)
    if not store.exists(spec.optuna_name):
        raise ConfigError(
            "study", f"{study!r} has no Optuna study {spec.optuna_name} in {store.display}",
            f"a study swept into that storage (`sgdnoise sweep {study}` first)",
        )  # fmt: skip
    from optuna_dashboard import run_server

    study_id = store.optuna().get_study_id_from_name(spec.optuna_name)
    print(f"optuna-dashboard for {spec.optuna_name}: "
          f"http://127.0.0.1:{port}/dashboard/studies/{study_id} (Ctrl-C stops it)",
          flush=True)  # fmt: skip
    run_server(store.optuna(), host="127.0.0.1", port=port)
