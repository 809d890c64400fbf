"""sgdnoise from Python (a notebook): a study's runs and tables as pandas DataFrames, read
from the tracking store, and `analyze`, which the CLI's `analyze` command is built on.

    import sgdnoise
    runs = sgdnoise.load_runs("own_cnn")    # one row per finished run of the study
    table = sgdnoise.load_table("own_cnn")  # the study's table (results/<study>/table.csv)

Where the store is and which experiment the study lives in come from the project's
params.yaml (the folder holding it, or a parent of the working directory, is the project
root; `params=` names another file, `overrides=` takes `key=value` strings as `-P` does),
unless `tracking_uri` / `experiment` are given. Reading never writes: no store is created.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["analyze", "load_runs", "load_table"]


def _store(
    study: str, params: str | Path | None, overrides: Iterable[str], tracking_uri: str | None,
    experiment: str | None,
) -> tuple[str, str, dict[str, Any]]:  # fmt: skip
    """(tracking URI, the study's experiment, studies) from the params: reading needs
    nothing else."""
    from sgdnoise.config import raw_params, store_config
    from sgdnoise.tracking import resolve_uri

    raw = raw_params(params, list(overrides))
    cfg = store_config(raw)
    uri = tracking_uri or resolve_uri(cfg)
    return uri, experiment or study_experiment(raw, cfg, study), dict(cfg.studies)


def study_experiment(raw: dict[str, Any], cfg: Any, study: str) -> str:
    """The MLflow experiment a study's sweep records into (contract.study_experiment of
    its base experiment, which the study's fixed keys may change); for a study not in
    the params, that of the default base."""
    from sgdnoise import contract
    from sgdnoise.config import ConfigError
    from sgdnoise.sweep.spec import load_spec

    try:
        return load_spec(raw, study).experiment
    except ConfigError:
        return contract.study_experiment(cfg.tracking.experiment, study)


def load_runs(
    study: str,
    *,
    params: str | Path | None = None,
    overrides: Iterable[str] = (),
    tracking_uri: str | None = None,
    experiment: str | None = None,
):
    """The study's finished runs, one row per grid point (run key): run_id, optimizer,
    batch_size, lr_eff, seed, budget, final metrics, status. Raises LookupError when the
    study has no finished runs in the store."""
    from analysis import load_study

    uri, exp, _ = _store(study, params, overrides, tracking_uri, experiment)
    if not _exists(uri):
        raise LookupError(f"study {study!r}: no tracking store at {uri}")
    return load_study(study, tracking_uri=uri, experiment=exp).table


def load_table(
    study: str,
    *,
    selection: str = "per_seed",
    metric: str | None = None,
    direction: str | None = None,
    params: str | Path | None = None,
    overrides: Iterable[str] = (),
    tracking_uri: str | None = None,
    experiment: str | None = None,
):
    """The study's table, as `sgdnoise analyze` writes it to table.csv: per group (e.g.
    optimizer and B) the best metric over seeds, the optimal lr_eff and its range, edges and
    regimes. `metric`/`direction` default to the study's selection metric in params."""
    return analyze(
        study, out=None, selection=selection, metric=metric, direction=direction,
        params=params, overrides=overrides, tracking_uri=tracking_uri, experiment=experiment,
    )["table"]  # fmt: skip


def analyze(
    study: str,
    *,
    out: str | Path | None = None,
    selection: str = "per_seed",
    metric: str | None = None,
    direction: str | None = None,
    params: str | Path | None = None,
    overrides: Iterable[str] = (),
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Analyze a study: {"table", "runs" (DataFrames), "markdown", "summary", "files",
    "tracking_uri"}, with table.md/csv, summary.json and the figures written under `out`
    (None: nothing written). Raises LookupError when the study has no finished runs."""
    from analysis import analyze as run_analysis

    uri, exp, studies = _store(study, params, overrides, tracking_uri, experiment)
    if not _exists(uri):
        raise LookupError(f"study {study!r}: no tracking store at {uri}")
    spec = studies.get(study) or {}
    declared = (spec.get("metric") or {}) if isinstance(spec, dict) else {}
    res = run_analysis(
        study, tracking_uri=uri, experiment=exp, out_dir=Path(out) if out is not None else None,
        selection=selection, metric=metric or declared.get("name"),
        direction=direction or (None if metric else declared.get("direction")),
    )  # fmt: skip
    return {**res, "tracking_uri": uri}


def _exists(uri: str) -> bool:
    """False for a local SQLite store that is not there (MLflow would create an empty one)."""
    from sgdnoise.tracking import sqlite_file

    path = sqlite_file(uri)
    return path is None or path.is_file()
