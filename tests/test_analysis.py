"""Analysis side: MLflow store -> tidy table -> tables, regimes, figures, artifacts.

One temporary sqlite MLflow store per module (a fresh store costs seconds of
migrations), filled through the public MLflow client the way the training side logs:
child runs of a parent study run, with a known optimum per (optimizer, B).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis import analyze, load_study
from analysis.regimes import estimate, fit_b_crit
from analysis.selection import build_cube
from analysis.tables import Objective, batch_size_table, fmt_lr
from sgdnoise.tracking import log_analysis

EXPERIMENT = "exp-analysis"
S = 1 / math.sqrt(2)  # std (ddof=1) of two values is |a - b| / sqrt(2)

# Seed offsets and curvatures: seed 0 peaks 0.004 higher and is half as curved, so
# mean_curve and per_seed disagree where the seeds' optima differ.
PEAK_OFFSET = {0: 0.004, 1: 0.0}
CURVATURE = {0: 0.01, 1: 0.02}
# (optimizer, B) -> peak accuracy, per-seed optimal log2 lr, curvature scale.
BS_GRID = {
    ("sgd", 64): (0.90, (-2, -2), 1.0),  # optimum at the lowest lr: edge
    ("sgd", 256): (0.90, (0, 0), 1.0),
    ("sgd", 1024): (0.88, (0, 1), 1.0),  # seeds disagree
    ("momentum", 64): (0.90, (-1, -1), 1.0),
    ("momentum", 256): (0.91, (1, 1), 0.1),  # flat: mean_curve range spans 3 lrs
    ("momentum", 1024): (0.89, (1, 1), 1.0),  # one diverged run at lr 4
}
BS_LOG2_LRS = range(-2, 3)


def run_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class Writer:
    """Logs runs the way the training side does, with controlled start/end times."""

    def __init__(self, client: MlflowClient, experiment_id: str):
        self.client, self.eid, self.clock = client, experiment_id, 1_700_000_000_000

    def tick(self) -> int:
        self.clock += 1000
        return self.clock

    def parent(self, study: str) -> str:
        tags = {"sgdnoise.kind": "study", "sgdnoise.study": study, "sgdnoise.grid_hash": "abc"}
        return self.client.create_run(self.eid, start_time=self.tick(), tags=tags).info.run_id

    def child(
        self,
        parent: str,
        study: str,
        *,
        optimizer: str,
        batch_size: int,
        log2_lr: float,
        seed: int,
        metrics: dict[str, float | list[float]],
        budget: float = 20.0,
        status: str = "FINISHED",
        key: str | None = None,
    ) -> str:
        config = {
            "train.optimizer": optimizer,
            "train.batch_size": batch_size,
            "train.lr_eff": 2.0**log2_lr,
            "train.seed": seed,
            "train.budget.unit": "epochs",
            "train.budget.value": budget,
            "train.momentum": 0.9 if optimizer == "momentum" else 0.0,
            "model.name": "mlp",
            "data.name": "mnist1d",
        }
        diverged = bool(metrics.get("diverged", 0.0))
        tags = {
            "mlflow.parentRunId": parent,
            "sgdnoise.kind": "run",
            "sgdnoise.study": study,
            "sgdnoise.run_key": key or run_key(config),
            "sgdnoise.status": "diverged" if diverged else "finished",
        }
        run = self.client.create_run(self.eid, start_time=self.tick(), tags=tags)
        ts = self.tick()
        logged = []
        for name, value in metrics.items():
            history = value if isinstance(value, list) else [value]
            logged += [Metric(name, v, ts, step) for step, v in enumerate(history)]
        params = [Param(k, repr(v) if isinstance(v, float) else str(v)) for k, v in config.items()]
        self.client.log_batch(run.info.run_id, metrics=logged, params=params)
        self.client.set_terminated(run.info.run_id, status=status, end_time=self.tick())
        return run.info.run_id


def bs_accuracy(optimizer: str, batch_size: int, x: float, seed: int) -> float:
    peak, optima, scale = BS_GRID[(optimizer, batch_size)]
    return peak + PEAK_OFFSET[seed] - scale * CURVATURE[seed] * (x - optima[seed]) ** 2


def bs_metrics(optimizer: str, batch_size: int, x: float, seed: int) -> dict:
    acc = bs_accuracy(optimizer, batch_size, x, seed)
    out = {
        "final_test_accuracy": acc,
        "final_test_loss": 1.0 - acc,
        "final_train_loss": 0.1 + 0.001 * seed + 0.01 * x**2,
        "diverged": 0.0,
        "steps": 100.0,
        "epochs": 20.0,
        "examples_per_second": 1e4,
    }
    if optimizer == "sgd":
        out["grad_noise_scale"] = [100.0, 300.0]  # history: the last value counts
    return out


NAN_METRICS = {
    "final_test_accuracy": math.nan,
    "final_test_loss": math.nan,
    "final_train_loss": math.nan,
    "diverged": 1.0,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    w = Writer(client, eid)

    # An older parent of the same study with one child: must be ignored.
    old = w.parent("bs")
    w.child(
        old,
        "bs",
        optimizer="sgd",
        batch_size=256,
        log2_lr=2,
        seed=0,
        metrics={**bs_metrics("sgd", 256, 2, 0), "final_test_accuracy": 0.999},
    )
    bs = w.parent("bs")
    for (opt, b), _ in BS_GRID.items():
        for x in BS_LOG2_LRS:
            for seed in (0, 1):
                if (opt, b, x, seed) == ("momentum", 1024, 2, 1):
                    w.child(
                        bs,
                        "bs",
                        optimizer=opt,
                        batch_size=b,
                        log2_lr=x,
                        seed=seed,
                        metrics=NAN_METRICS,
                    )
                    continue
                w.child(
                    bs,
                    "bs",
                    optimizer=opt,
                    batch_size=b,
                    log2_lr=x,
                    seed=seed,
                    metrics=bs_metrics(opt, b, x, seed),
                )
    # A rerun of an existing key that finished later (dropped), and a FAILED run that
    # would otherwise be the best of its group (ignored).
    dup = dict(optimizer="sgd", batch_size=256, log2_lr=0, seed=0)
    dup_key = run_key(
        {
            "train.optimizer": "sgd",
            "train.batch_size": 256,
            "train.lr_eff": 1.0,
            "train.seed": 0,
            "train.budget.unit": "epochs",
            "train.budget.value": 20.0,
            "train.momentum": 0.0,
            "model.name": "mlp",
            "data.name": "mnist1d",
        }
    )
    w.child(bs, "bs", **dup, metrics={**bs_metrics("sgd", 256, 0, 0), "final_test_accuracy": 0.5})
    w.child(
        bs,
        "bs",
        optimizer="sgd",
        batch_size=256,
        log2_lr=2,
        seed=0,
        status="FAILED",
        key="feedfacefeedface",
        metrics={**bs_metrics("sgd", 256, 2, 0), "final_test_accuracy": 0.99},
    )

    # Epoch-budget study at B = 64: the train-optimal lr falls faster than the test one.
    eb = w.parent("eb")
    train_opt = {1.0: 0, 4.0: -1, 16.0: -3}
    test_opt = {1.0: 0, 4.0: 0, 16.0: -1}
    for budget in (1.0, 4.0, 16.0):
        for x in range(-3, 2):
            for seed in (0, 1):
                acc = 0.8 + PEAK_OFFSET[seed] - CURVATURE[seed] * (x - test_opt[budget]) ** 2
                m = {
                    "final_test_accuracy": acc,
                    "final_test_loss": 1.0 - acc,
                    "final_train_loss": 0.01 + 0.001 * seed + 0.05 * (x - train_opt[budget]) ** 2,
                    "diverged": 0.0,
                }
                w.child(
                    eb,
                    "eb",
                    optimizer="momentum",
                    batch_size=64,
                    log2_lr=x,
                    seed=seed,
                    budget=budget,
                    metrics=m,
                )

    # Degenerate: one seed, two batch sizes, every run at B = 128 diverged, no accuracy
    # (a reconstruction task): the analysis must say what it cannot estimate.
    tiny = w.parent("tiny")
    for b in (64, 128):
        for x in (0, 1):
            m = {"final_test_loss": 0.1 + 0.01 * x, "final_train_loss": 0.05, "diverged": 0.0}
            w.child(
                tiny,
                "tiny",
                optimizer="sgd",
                batch_size=b,
                log2_lr=x,
                seed=0,
                metrics=NAN_METRICS if b == 128 else m,
            )
    return {
        "uri": uri,
        "client": client,
        "parents": {"bs": bs, "eb": eb, "tiny": tiny},
        "old": old,
        "dup_key": dup_key,
    }


# ---- query -------------------------------------------------------------------------------


def test_query_reads_one_row_per_run_key_from_the_latest_parent(store):
    runs = load_study("bs", tracking_uri=store["uri"], experiment=EXPERIMENT)
    t = runs.table
    assert runs.source == "sql"
    assert runs.parent_run_id == store["parents"]["bs"]
    assert list(t.columns[:10]) == [
        "run_id",
        "run_key",
        "optimizer",
        "batch_size",
        "lr_eff",
        "seed",
        "budget_unit",
        "budget_value",
        "status",
        "diverged",
    ]
    assert {"final_train_loss", "final_test_loss", "final_test_accuracy"} <= set(t.columns)
    assert len(t) == 60 and t["run_key"].is_unique
    assert t["batch_size"].dtype.kind == "i" and t["seed"].dtype.kind == "i"
    assert t["lr_eff"].dtype.kind == "f" and t["budget_value"].dtype.kind == "f"
    assert sorted(t["lr_eff"].unique()) == [0.25, 0.5, 1.0, 2.0, 4.0]
    # The earliest-finished run of the duplicated key is kept; the FAILED one is ignored.
    kept = t[t["run_key"] == store["dup_key"]]
    assert kept["final_test_accuracy"].item() == pytest.approx(0.904)
    assert runs.n_duplicates == 1
    notes = " | ".join(runs.notes)
    assert "2 parent runs" in notes and store["parents"]["bs"] in notes
    assert "duplicate" in notes and store["dup_key"] in notes
    assert "1 FAILED" in notes
    # The diverged run is a result, with NaN metrics.
    div = t[t["diverged"]]
    assert len(div) == 1 and div["status"].item() == "diverged"
    assert math.isnan(div["final_test_accuracy"].item())
    # grad_noise_scale: the last logged value.
    assert set(t.loc[t["optimizer"] == "sgd", "grad_noise_scale"]) == {300.0}
    assert t.loc[t["optimizer"] == "momentum", "grad_noise_scale"].isna().all()


def test_sql_and_client_readers_give_the_same_table(store):
    sql = load_study("bs", tracking_uri=store["uri"], experiment=EXPERIMENT, method="sql")
    api = load_study("bs", tracking_uri=store["uri"], experiment=EXPERIMENT, method="client")
    assert (sql.source, api.source) == ("sql", "client")
    pd.testing.assert_frame_equal(sql.table, api.table)
    assert sql.notes == api.notes


def test_metric_history_has_one_value_per_run_and_step(tmp_path):
    """A value logged twice at one step (older sgdnoise re-logged grad_noise_scale with the
    final metrics, a millisecond later) counts once: medians over windows must not depend
    on the clock."""
    from analysis.query import metric_history

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment("h", artifact_location=str(tmp_path / "artifacts"))
    rid = client.create_run(eid).info.run_id
    logged = [(0, 9.0, 1), (5, 7.0, 2), (10, 3.0, 3), (10, 3.0, 4)]  # (step, value, ms)
    client.log_batch(rid, metrics=[Metric("grad_noise_scale", v, 1_700_000_000_000 + ms, step)
                                   for step, v, ms in logged])  # fmt: skip
    assert len(client.get_metric_history(rid, "grad_noise_scale")) == 4  # MLflow keeps both
    h = metric_history(uri, [rid], "grad_noise_scale")
    assert list(zip(h["step"], h["value"], strict=True)) == [(0, 9.0), (5, 7.0), (10, 3.0)]


def test_missing_study_or_experiment_raises_lookup_error(store, tmp_path):
    with pytest.raises(LookupError, match="'nope'.*exp-analysis"):
        analyze("nope", tracking_uri=store["uri"], experiment=EXPERIMENT, out_dir=tmp_path)
    with pytest.raises(LookupError, match="'bs'.*'no-such-exp'"):
        load_study("bs", tracking_uri=store["uri"], experiment="no-such-exp")


# ---- tables ------------------------------------------------------------------------------


def _rows(table: pd.DataFrame) -> dict:
    return {
        (r.optimizer, r.batch_size): (
            fmt_lr(r.lr_opt, r.lr_lo, r.lr_hi),
            round(r.metric_mean, 6),
            round(r.metric_std, 6),
            r.n_seeds,
            r.n_diverged,
            r.edge,
        )
        for r in table.itertuples()
    }


def test_batch_size_table_per_seed(store):
    t = batch_size_table(
        load_study("bs", tracking_uri=store["uri"], experiment=EXPERIMENT).table,
        Objective("final_test_accuracy", "maximize"),
        "per_seed",
    )
    s = round(0.004 * S, 6)
    assert _rows(t) == {
        ("momentum", 64): ("2^-1 (2^-1 to 2^-1)", 0.902, s, 2, 0, ""),
        ("momentum", 256): ("2^1 (2^1 to 2^1)", 0.912, s, 2, 0, ""),
        ("momentum", 1024): ("2^1 (2^1 to 2^1)", 0.892, s, 2, 1, ""),
        ("sgd", 64): ("2^-2 (2^-2 to 2^-2)", 0.902, s, 2, 0, "low"),
        ("sgd", 256): ("2^0 (2^0 to 2^0)", 0.902, s, 2, 0, ""),
        # seeds' optima 2^0 and 2^1: median in log2, range min to max
        ("sgd", 1024): ("2^0.5 (2^0 to 2^1)", 0.882, s, 2, 0, ""),
    }
    assert set(t["selection"]) == {"per_seed"}


def test_batch_size_table_mean_curve(store):
    t = batch_size_table(
        load_study("bs", tracking_uri=store["uri"], experiment=EXPERIMENT).table,
        Objective("final_test_accuracy", "maximize"),
        "mean_curve",
    )
    s = round(0.004 * S, 6)
    assert _rows(t) == {
        ("momentum", 64): ("2^-1 (2^-1 to 2^-1)", 0.902, s, 2, 0, ""),
        # flat curve: lrs 2^0 and 2^2 lie within one std of the best mean
        ("momentum", 256): ("2^1 (2^0 to 2^2)", 0.912, s, 2, 0, ""),
        # lr 4 has a diverged seed: its mean is the worst, the run still counts
        ("momentum", 1024): ("2^1 (2^1 to 2^1)", 0.892, s, 2, 1, ""),
        ("sgd", 64): ("2^-2 (2^-2 to 2^-2)", 0.902, s, 2, 0, "low"),
        ("sgd", 256): ("2^0 (2^0 to 2^0)", 0.902, s, 2, 0, ""),
        # mean over seeds: 0.872 at 2^0, 0.877 at 2^1 (seeds 0.874, 0.880)
        ("sgd", 1024): ("2^1 (2^1 to 2^1)", 0.877, round(0.006 * S, 6), 2, 0, ""),
    }
    assert set(t["selection"]) == {"mean_curve"}


@pytest.mark.parametrize("rule", ["per_seed", "mean_curve"])
def test_epoch_budget_study(store, tmp_path, rule):
    out = analyze(
        "eb",
        tracking_uri=store["uri"],
        experiment=EXPERIMENT,
        out_dir=tmp_path,
        selection=rule,
    )
    summary = out["summary"]
    assert summary["kind"] == "epoch_budget" and summary["selection"] == rule
    groups = summary["groups"]
    assert list(groups) == ["momentum/1_epochs", "momentum/4_epochs", "momentum/16_epochs"]
    got = {
        g["budget"]: (g["train_lr_opt"], g["train_lr_ratio"], g["test_lr_opt"], g["test_lr_ratio"])
        for g in groups.values()
    }
    assert got == {
        1.0: (1.0, 1.0, 1.0, 1.0),
        4.0: (0.5, 0.5, 1.0, 1.0),
        16.0: (0.125, 0.125, 0.5, 0.5),
    }
    g16 = groups["momentum/16_epochs"]
    assert (g16["train_edge"], g16["test_edge"]) == ("low", "")
    assert (g16["train_lr_lo"], g16["train_lr_hi"]) == (0.125, 0.125)
    assert g16["train_loss_mean"] == pytest.approx(0.0105)
    assert g16["metric_mean"] == pytest.approx(0.802)
    assert g16["metric_std"] == pytest.approx(0.004 * S)
    assert (g16["n_seeds"], g16["n_diverged"], g16["n_runs"]) == (2, 0, 10)
    md = out["markdown"]
    assert rule in md and "2^-3 (2^-3 to 2^-3)" in md and "0.125" in md
    for name in ("lr_vs_budget", "metric_vs_lr", "train_loss_vs_lr"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert len(pd.read_csv(tmp_path / f"{name}.csv")) > 0


# ---- analyze: files, summary, artifacts --------------------------------------------------


def test_analyze_writes_files_and_the_cli_logs_them(store, tmp_path):
    out = analyze(
        "bs",
        tracking_uri=store["uri"],
        experiment=EXPERIMENT,
        out_dir=tmp_path,
        selection="mean_curve",
    )
    names = {
        "table.md",
        "table.csv",
        "summary.json",
        "metrics.json",
        *(
            f"{f}.{ext}"
            for f in (
                "best_metric_vs_batch",
                "optimal_lr_vs_batch",
                "train_loss_vs_batch",
                "metric_vs_lr",
            )
            for ext in ("png", "csv")
        ),
    }
    assert {p.name for p in out["files"]} == names
    assert {p.name for p in tmp_path.iterdir()} == names
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == out["summary"]
    headline = json.loads((tmp_path / "metrics.json").read_text())
    assert headline["runs"] == summary["n_runs"]
    assert set(headline) == {"runs", *summary["regimes"]}
    assert (summary["kind"], summary["selection"], summary["metric"], summary["direction"]) == (
        "batch_size",
        "mean_curve",
        "final_test_accuracy",
        "maximize",
    )
    assert (summary["n_runs"], summary["n_diverged"], summary["n_duplicates"]) == (60, 1, 1)
    g = summary["groups"]["momentum/B=256"]
    assert (g["lr_opt"], g["lr_lo"], g["lr_hi"], g["edge"]) == (2.0, 1.0, 4.0, "")
    assert summary["groups"]["sgd/B=64"]["edge"] == "low"
    assert summary["regimes"]["sgd"]["b_simple"] == 300.0
    assert summary["regimes"]["momentum"]["b_simple"] is None
    csv = pd.read_csv(tmp_path / "table.csv")
    assert len(csv) == 6 and set(csv["selection"]) == {"mean_curve"}
    md = (tmp_path / "table.md").read_text()
    assert md == out["markdown"] and "mean_curve" in md and "2^1 (2^0 to 2^2)" in md
    fig_csv = pd.read_csv(tmp_path / "optimal_lr_vs_batch.csv")
    assert {"batch_size", "lr_opt", "lr_fit", "series"} <= set(fig_csv.columns)
    grid = pd.read_csv(tmp_path / "metric_vs_lr.csv")
    assert len(grid) == 30 and grid["n_diverged"].sum() == 1
    # The analysis only reads: the CLI logs its files to the study's (latest) parent run,
    # not the old one.
    client = store["client"]
    assert client.list_artifacts(store["parents"]["bs"], "analysis") == []
    log_analysis(store["uri"], out["summary"]["parent_run_id"], out["files"])
    logged = {
        f.path.split("/")[-1] for f in client.list_artifacts(store["parents"]["bs"], "analysis")
    }
    assert logged == names
    assert client.list_artifacts(store["old"], "analysis") == []


def test_degenerate_study_reports_what_it_cannot_estimate(store, tmp_path):
    out = analyze(
        "tiny",
        tracking_uri=store["uri"],
        experiment=EXPERIMENT,
        out_dir=tmp_path,
    )
    summary = out["summary"]
    # No accuracy logged: the default metric is the test loss, minimized.
    assert (summary["metric"], summary["direction"]) == ("final_test_loss", "minimize")
    reg = summary["regimes"]["sgd"]
    assert reg["b_crit"] is None and reg["b_crit_lo"] is None
    assert "B = 128 (all runs diverged)" in reg["message"]
    assert "needs an optimal lr at ≥3 batch sizes, has 1" in reg["message"]
    g128 = summary["groups"]["sgd/B=128"]
    assert g128["lr_opt"] is None and g128["n_diverged"] == 2
    assert summary["groups"]["sgd/B=64"]["lr_opt"] == 1.0
    assert "| sgd | 128 | — | — |" in out["markdown"]
    assert (tmp_path / "optimal_lr_vs_batch.png").exists()


# ---- regimes -----------------------------------------------------------------------------


def synthetic_regime_table(b_crit=512.0, eps_max=4.0, seeds=5, noise=0.3, batch=None):
    """metric = -(log2 lr - log2 ε_opt(B) - δ)^2 on a 2^(1/4) lr grid; δ: per-seed noise."""
    rng = np.random.default_rng(1)
    batch = batch if batch is not None else [2**k for k in range(4, 13)]
    rows = []
    for b in batch:
        target = np.log2(eps_max / (1 + b_crit / b))
        for seed in range(seeds):
            delta = rng.normal(0, noise)
            for k in range(-24, 28):
                x = k / 4
                rows.append(
                    {
                        "optimizer": "sgd",
                        "batch_size": b,
                        "lr_eff": 2.0**x,
                        "seed": seed,
                        "final_test_accuracy": -((x - target - delta) ** 2),
                        "diverged": False,
                    }
                )
    return pd.DataFrame(rows)


def test_fit_recovers_b_crit_on_exact_data():
    b = np.array([2.0**k for k in range(4, 13)])
    fit = fit_b_crit(b, 4.0 / (1 + 512.0 / b))
    assert fit.at_bound == ""
    assert fit.b_crit == pytest.approx(512.0, rel=1e-4)
    assert fit.eps_max == pytest.approx(4.0, rel=1e-4)


@pytest.mark.parametrize("rule", ["per_seed", "mean_curve"])
def test_b_crit_within_bootstrap_interval(rule):
    df = synthetic_regime_table()
    cube = build_cube(df, "batch_size", "final_test_accuracy", "maximize")
    reg = estimate("sgd", cube, rule)
    assert reg.message == ""
    assert reg.b_crit_lo <= 512.0 <= reg.b_crit_hi
    assert reg.b_crit_lo <= reg.b_crit <= reg.b_crit_hi
    assert 256 <= reg.b_crit <= 1024 and reg.b_crit_hi / reg.b_crit_lo < 8
    assert 0.6 < reg.slope_below <= 1.05 and abs(reg.slope_above) < 0.3
    assert reg.regime[256] == "noise" and reg.regime[1024] == "curvature"


def test_regimes_degenerate_cases():
    # A single seed: B_crit fitted, no interval.
    df = synthetic_regime_table(seeds=1)
    reg = estimate(
        "sgd", build_cube(df, "batch_size", "final_test_accuracy", "maximize"), "per_seed"
    )
    assert reg.b_crit is not None and reg.b_crit_lo is None
    assert "a single seed" in reg.message
    # Missing batch sizes and fewer than three of them.
    df = synthetic_regime_table(batch=[16, 32])
    reg = estimate(
        "sgd",
        build_cube(df, "batch_size", "final_test_accuracy", "maximize"),
        "per_seed",
        all_batch_sizes=np.array([16, 32, 64]),
    )
    assert reg.b_crit is None and reg.regime == {}
    assert "no runs at B = 64" in reg.message and "has 2" in reg.message
    # ε_opt ∝ B throughout: B_crit only bounded from below, every B noise-dominated.
    df = synthetic_regime_table(b_crit=1e6, eps_max=1e4, noise=0.0)
    reg = estimate(
        "sgd", build_cube(df, "batch_size", "final_test_accuracy", "maximize"), "per_seed"
    )
    assert reg.b_crit is None and "above the largest batch size" in reg.message
    assert set(reg.regime.values()) == {"noise"}
