"""Pull a study's finished child runs from MLflow into one tidy table (one row per run key).

The contract with the training side: a study is a parent run tagged
`sgdnoise.kind=study` and `sgdnoise.study=<name>`; its grid points are child runs
(`mlflow.parentRunId`) tagged `sgdnoise.kind=run`, `sgdnoise.run_key`, `sgdnoise.status`,
with dotted config params (`train.lr_eff`, ...) and `final_*` metrics.

Two readers give the same long-form records: SQL straight from the tracking database
(sqlite/postgresql; `search_runs` loads every param, metric and tag of every run and is
too slow for 10,000 runs) and `MlflowClient.search_runs` for tracking servers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import ViewType

from sgdnoise import contract as C

KIND_TAG = C.KIND
STUDY_TAG = C.STUDY
RUN_KEY_TAG = C.RUN_KEY
STATUS_TAG = C.STATUS
PARENT_TAG = C.PARENT

# Params the tables need, mapped to tidy column names.
PARAMS = {
    "train.optimizer": "optimizer",
    "train.batch_size": "batch_size",
    "train.lr_eff": "lr_eff",
    "train.seed": "seed",
    "train.budget.unit": "budget_unit",
    "train.budget.value": "budget_value",
    "train.micro_batch_size": "micro_batch_size",
    "derived.total_steps": "total_steps",
}
METRICS = (
    C.FINAL_TRAIN_LOSS,
    C.FINAL_TEST_LOSS,
    C.FINAL_TEST_ACCURACY,
    C.GRAD_NOISE_SCALE,
    C.DIVERGED,
    C.STEPS,
    C.EPOCHS,
    C.EXAMPLES_PER_SECOND,
)
TAGS = (KIND_TAG, RUN_KEY_TAG, STATUS_TAG)
CORE = ["run_key", "optimizer", "batch_size", "lr_eff", "seed", "budget_unit", "budget_value"]
SORT = ["optimizer", "budget_unit", "budget_value", "batch_size", "lr_eff", "seed", "run_key"]

Method = Literal["auto", "sql", "client"]


@dataclass
class StudyRuns:
    """A study's finished child runs, deduplicated, plus what was done to get them."""

    study: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    table: pd.DataFrame
    source: str  # "sql" or "client": which reader produced the table
    n_duplicates: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class _Raw:
    """Long-form records, identical whichever reader produced them."""

    runs: pd.DataFrame  # run_id, status, start_time, end_time
    tags: pd.DataFrame  # run_id, key, value
    params: pd.DataFrame  # run_id, key, value
    metrics: pd.DataFrame  # run_id, key, value (latest value; NaN where MLflow stored NaN)


def load_study(
    study: str,
    *,
    tracking_uri: str,
    experiment: str = "sgdnoise",
    metrics: tuple[str, ...] = (),
    method: Method = "auto",
) -> StudyRuns:
    """Return the study's finished child runs as a tidy table.

    `metrics` adds metric keys beyond the standard ones (a custom selection metric).
    `method` forces a reader; "auto" uses SQL for sqlite/postgresql URIs.
    Raises LookupError when the experiment, the study or its finished runs are missing.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        raise LookupError(
            f"study {study!r}: experiment {experiment!r} not found at tracking URI {tracking_uri}"
        )
    notes: list[str] = []
    parent_id = _find_parent(client, exp.experiment_id, study, experiment, notes)

    metric_keys = tuple(dict.fromkeys((*METRICS, *metrics)))
    if method == "auto":
        method = "sql" if _is_sql_uri(tracking_uri) else "client"
    if method == "sql":
        raw = _read_sql(tracking_uri, exp.experiment_id, parent_id, metric_keys)
    else:
        raw = _read_client(client, exp.experiment_id, parent_id, metric_keys)

    table, n_dup = _tidy(raw, metric_keys, notes)
    if table.empty:
        raise LookupError(
            f"study {study!r} in experiment {experiment!r} has no finished runs "
            f"(parent run {parent_id})"
        )
    return StudyRuns(
        study=study,
        experiment=experiment,
        experiment_id=exp.experiment_id,
        parent_run_id=parent_id,
        table=table,
        source=method,
        n_duplicates=n_dup,
        notes=notes,
    )


def _is_sql_uri(uri: str) -> bool:
    scheme = uri.split(":", 1)[0].lower()
    return scheme.split("+", 1)[0] in ("sqlite", "postgresql", "postgres")


def _find_parent(
    client: MlflowClient, experiment_id: str, study: str, experiment: str, notes: list[str]
) -> str:
    # Filter on the kind tag only and match the study name in Python: names may hold
    # quotes that MLflow's filter grammar cannot escape. Parent runs are few.
    parents = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = '{C.KIND_STUDY}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        parents += [r for r in page if r.data.tags.get(STUDY_TAG) == study]
        token = page.token
        if not token:
            break
    if not parents:
        raise LookupError(
            f"study {study!r} not found in experiment {experiment!r}: no parent run tagged "
            f"{KIND_TAG}=study, {STUDY_TAG}={study}"
        )
    parents.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id), reverse=True)
    if len(parents) > 1:
        notes.append(
            f"{len(parents)} parent runs found for study {study!r}; using the most recently "
            f"started one ({parents[0].info.run_id})"
        )
    return parents[0].info.run_id


def _read_sql(uri: str, experiment_id: str, parent_id: str, metric_keys: tuple[str, ...]) -> _Raw:
    import sqlalchemy as sa

    # The child set, as a join: a list of 10,000 run ids would exceed bind-parameter limits.
    children = (
        "FROM runs r JOIN tags p ON p.run_uuid = r.run_uuid "
        "WHERE r.experiment_id = :eid AND r.lifecycle_stage = 'active' "
        "AND p.key = :parent_key AND p.value = :pid"
    )
    binds = {"eid": int(experiment_id), "parent_key": PARENT_TAG, "pid": parent_id}
    engine = sa.create_engine(uri)
    try:
        with engine.connect() as conn:

            def frame(sql: str, columns: list[str], **extra: object) -> pd.DataFrame:
                stmt = sa.text(sql)
                for name in extra:
                    stmt = stmt.bindparams(sa.bindparam(name, expanding=True))
                rows = conn.execute(stmt, {**binds, **extra}).fetchall()
                # Column-wise: pandas probes every Row object for namedtuple fields,
                # which costs more than the query itself at 100,000 rows.
                cols = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
                return pd.DataFrame(dict(zip(columns, cols, strict=True)))

            runs = frame(
                f"SELECT r.run_uuid, r.status, r.start_time, r.end_time {children}",
                ["run_id", "status", "start_time", "end_time"],
            )

            def long(table: str, keys: tuple[str, ...], cols: str = "") -> pd.DataFrame:
                return frame(
                    f"SELECT t.run_uuid, t.key, t.value{cols} FROM {table} t "
                    f"WHERE t.key IN :keys AND t.run_uuid IN (SELECT r.run_uuid {children})",
                    ["run_id", "key", "value"] + (["is_nan"] if cols else []),
                    keys=list(keys),
                )

            tags = long("tags", TAGS)
            params = long("params", tuple(PARAMS))
            metrics = long("latest_metrics", metric_keys, ", t.is_nan")
    finally:
        engine.dispose()
    # MLflow stores NaN as value 0 with is_nan set.
    values = metrics["value"].astype(float)
    metrics["value"] = values.where(~metrics["is_nan"].astype(bool), np.nan)
    return _Raw(runs, tags, params, metrics.drop(columns="is_nan"))


def _read_client(
    client: MlflowClient, experiment_id: str, parent_id: str, metric_keys: tuple[str, ...]
) -> _Raw:
    runs, tags, params, metrics = [], [], [], []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=10_000,
            page_token=token,
        )
        for run in page:
            rid = run.info.run_id
            runs.append((rid, run.info.status, run.info.start_time, run.info.end_time))
            tags += [(rid, k, v) for k, v in run.data.tags.items() if k in TAGS]
            params += [(rid, k, v) for k, v in run.data.params.items() if k in PARAMS]
            metrics += [(rid, k, v) for k, v in run.data.metrics.items() if k in metric_keys]
        token = page.token
        if not token:
            break
    kv = ["run_id", "key", "value"]
    return _Raw(
        pd.DataFrame(runs, columns=["run_id", "status", "start_time", "end_time"]),
        pd.DataFrame(tags, columns=kv),
        pd.DataFrame(params, columns=kv),
        pd.DataFrame(metrics, columns=kv),
    )


def _wide(long: pd.DataFrame, keys: list[str] | tuple[str, ...], ids: pd.Index) -> pd.DataFrame:
    wide = long.pivot(index="run_id", columns="key", values="value")
    return wide.reindex(index=ids, columns=list(keys))


def _tidy(raw: _Raw, metric_keys: tuple[str, ...], notes: list[str]) -> tuple[pd.DataFrame, int]:
    runs = raw.runs.set_index("run_id")
    ignored = runs["status"][runs["status"] != "FINISHED"].value_counts()
    if len(ignored):
        counts = ", ".join(f"{n} {s}" for s, n in sorted(ignored.items()))
        notes.append(f"ignored child runs that did not finish: {counts}")
    runs = runs[runs["status"] == "FINISHED"]
    ids = runs.index

    tags = _wide(raw.tags, TAGS, ids)
    params = _wide(raw.params, tuple(PARAMS), ids).rename(columns=PARAMS)
    metrics = _wide(raw.metrics, metric_keys, ids).astype(float)

    not_run = tags[KIND_TAG] != C.KIND_RUN
    if not_run.any():
        notes.append(f"ignored {int(not_run.sum())} child run(s) not tagged {KIND_TAG}=run")
    df = pd.DataFrame(index=ids)
    df["run_key"] = tags[RUN_KEY_TAG]
    df = df.join(params)
    df["batch_size"] = pd.to_numeric(df["batch_size"], errors="coerce")
    df["lr_eff"] = pd.to_numeric(df["lr_eff"], errors="coerce")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce")
    df["budget_value"] = pd.to_numeric(df["budget_value"], errors="coerce")
    for col in ("micro_batch_size", "total_steps"):  # null in runs before these were logged
        df[col] = pd.to_numeric(df[col], errors="coerce")
    diverged = (tags[STATUS_TAG] == C.STATUS_DIVERGED) | (metrics[C.DIVERGED] == 1.0)
    df["status"] = tags[STATUS_TAG].fillna(
        diverged.map({True: C.STATUS_DIVERGED, False: C.STATUS_FINISHED})
    )
    df["diverged"] = diverged.astype(bool)
    df = df.join(metrics.drop(columns="diverged"))
    df["_end"] = runs["end_time"].astype(float)
    df["_start"] = runs["start_time"].astype(float)
    df = df[~not_run]

    bad = df[CORE].isna().any(axis=1)
    if bad.any():
        notes.append(
            f"ignored {int(bad.sum())} run(s) missing or with unreadable {', '.join(CORE)}"
        )
        df = df[~bad]

    # Duplicates (a crash between a run's end and the sweep's bookkeeping can rerun a
    # key): keep the earliest-finished run so reruns never change the table.
    df = df.rename_axis("run_id").reset_index()
    df = df.sort_values(["_end", "_start", "run_id"], na_position="last", kind="mergesort")
    dup = df.duplicated("run_key", keep="first")
    n_dup = int(dup.sum())
    if n_dup:
        keys = sorted(df.loc[dup, "run_key"].unique())
        shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
        notes.append(
            f"dropped {n_dup} duplicate run(s) of {len(keys)} run key(s), keeping the "
            f"earliest-finished run of each: {shown}"
        )
    df = df[~dup].drop(columns=["_end", "_start"])

    df = df.astype({"batch_size": int, "seed": int, "lr_eff": float, "budget_value": float})
    df = df.sort_values(SORT, kind="mergesort").reset_index(drop=True)
    columns = ["run_id", *CORE[:1], *CORE[1:], "status", "diverged"]
    columns += [m for m in metric_keys if m != "diverged"]
    columns += ["micro_batch_size", "total_steps"]
    return df[columns], n_dup


def metric_history(tracking_uri: str, run_ids: list[str], key: str) -> pd.DataFrame:
    """The logged values of metric `key` for the runs, one per step: columns run_id, step,
    value (NaN where MLflow stored NaN), sorted by run and step. SQL for database URIs, else the
    client's per-run history."""
    if not run_ids:
        return pd.DataFrame({"run_id": [], "step": [], "value": []})
    if _is_sql_uri(tracking_uri):
        import sqlalchemy as sa

        stmt = sa.text(
            "SELECT run_uuid, step, value, is_nan FROM metrics "
            "WHERE key = :key AND run_uuid IN :ids"
        ).bindparams(sa.bindparam("ids", expanding=True))
        engine = sa.create_engine(tracking_uri)
        try:
            with engine.connect() as conn:
                rows = conn.execute(stmt, {"key": key, "ids": list(run_ids)}).fetchall()
        finally:
            engine.dispose()
        df = pd.DataFrame(rows, columns=["run_id", "step", "value", "is_nan"])
        df["value"] = df["value"].astype(float).where(~df["is_nan"].astype(bool), np.nan)
        df = df.drop(columns="is_nan")
    else:
        client = MlflowClient(tracking_uri=tracking_uri)
        df = pd.DataFrame(
            [
                (rid, m.step, m.value)
                for rid in run_ids
                for m in client.get_metric_history(rid, key)
            ],
            columns=["run_id", "step", "value"],
        )
    df = df.astype({"step": int, "value": float})
    # One value per run and step: a store written before sgdnoise stopped re-logging
    # grad_noise_scale with the final metrics holds some final steps twice (same value).
    df = df.drop_duplicates(["run_id", "step"], keep="last")
    return df.sort_values(["run_id", "step"], kind="mergesort").reset_index(drop=True)
