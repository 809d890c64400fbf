"""Study definitions, bad input, storage URLs and worker liveness (in-process, fast)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from sgdnoise import cli
from sgdnoise.config import ConfigError
from sgdnoise.sweep.liveness import FileLiveness
from sgdnoise.sweep.spec import LR_KEY, load_spec
from sgdnoise.sweep.storage import open_storage

BASE: dict[str, Any] = {
    "data": {"name": "synthetic", "num_samples": 400},
    "model": {"name": "mlp", "width": 16},
    "train": {"budget": {"unit": "steps", "value": 24}, "batch_size": 32},
}


def raw(**study: Any) -> dict[str, Any]:
    body = {"grid": {LR_KEY: [0.5, 1.0]}, **study}
    return {**BASE, "studies": {"s": body}}


def error(r: dict[str, Any], name: str = "s") -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_spec(r, name)
    return e.value


def test_grid_expands_powers_orders_groups_and_hashes_run_keys() -> None:
    spec = load_spec(
        raw(
            grid={
                "train.batch_size": [64, 16],
                LR_KEY: {"base": 2, "min_exp": -1, "max_exp": 1},
                "train.seed": [0, 1],
            },
            fixed={"train.optimizer": "sgd"},
        ),
        "s",
    )
    assert spec.axes[LR_KEY] == [0.5, 1.0, 2.0] and spec.lr_range == (0.5, 2.0)
    assert len(spec.points) == 12 and len({p.run_key for p in spec.points}) == 12
    # Groups in axis order, lrs ascending, seeds adjacent.
    first = [(p.values["train.batch_size"], p.lr, p.seed) for p in spec.points[:4]]
    assert first == [(64, 0.5, 0), (64, 0.5, 1), (64, 1.0, 0), (64, 1.0, 1)]
    assert all(spec.config(p.values).train.optimizer == "sgd" for p in spec.points)
    assert spec.optuna_name == f"s-{spec.grid_hash}"
    # The hash follows what is trained: same runs, same hash; another value, another study.
    again = load_spec(
        raw(
            grid={"train.seed": [1, 0], "train.batch_size": [16, 64], LR_KEY: ["2^-1", 1, 2]},
            fixed={"train.optimizer": "sgd"},
        ),
        "s",
    )
    assert again.grid_hash == spec.grid_hash
    other = load_spec(raw(grid={LR_KEY: [0.5, 1.0]}, fixed={"train.optimizer": "sgd"}), "s")
    assert other.grid_hash != spec.grid_hash


@pytest.mark.parametrize(
    ("study", "key"),
    [
        ({"grid": {"train.lr_eff": [0.5, -1.0]}}, "studies.s.grid.train.lr_eff"),
        ({"grid": {"train.bogus": [1]}}, "studies.s.grid.train.bogus"),
        ({"grid": {LR_KEY: []}}, "studies.s.grid.train.lr_eff"),
        ({"grid": {LR_KEY: [1.0, 1.0]}}, "studies.s.grid.train.lr_eff"),
        ({"grid": {LR_KEY: {"base": 2, "min_exp": 3, "max_exp": 1}}}, "studies.s.grid.train.lr_eff"),
        ({"grid": {LR_KEY: {"base": 2, "min_exp": 0.5, "max_exp": 1}}}, "studies.s.grid.train.lr_eff.min_exp"),
        ({"grid": {"train.batch_size": {"base": 2, "min_exp": 1, "max_exp": 3}}}, "studies.s.grid.train.batch_size"),
        ({"grid": {"train.batch_size": [32, 0]}}, "studies.s.grid.train.batch_size"),
        ({"fixed": {"train.optimizer": "adam"}}, "studies.s.fixed.train.optimizer"),
        ({"fixed": {LR_KEY: 0.1}}, "studies.s.grid.train.lr_eff"),
        ({"metric": {"name": "accuracy"}}, "studies.s.metric.name"),
        ({"metric": {"name": "final_test_accuracy", "direction": "up"}}, "studies.s.metric.direction"),
        ({"edges": {"max_extensions": -1}}, "studies.s.edges.max_extensions"),
        ({"edges": {"extend": "yes"}}, "studies.s.edges.extend"),
        ({"heartbeat": {"interval": 5, "grace_period": 5}}, "studies.s.heartbeat.grace_period"),
        ({"colour": "blue"}, "studies.s.colour"),
        # Both points resolve to the same run (momentum is unused by plain SGD).
        ({"grid": {"train.momentum": [0.5, 0.9]}, "fixed": {"train.optimizer": "sgd"}}, "studies.s.grid"),
    ],
)  # fmt: skip
def test_bad_study_names_the_key(study: dict[str, Any], key: str) -> None:
    r = raw()
    r["studies"]["s"].update(study)
    e = error(r)
    assert e.key == key, str(e)


def test_unknown_study_and_cross_key_errors() -> None:
    e = error(raw(), "nope")
    assert e.key == "studies.nope" and "s" in e.allowed
    # Only a combination is wrong: micro-batches must divide B (names the grid point).
    r = raw(grid={"train.batch_size": [32, 48]}, fixed={"train.micro_batch_size": 32})
    e = error(r)
    assert e.key == "studies.s.fixed.train.micro_batch_size" and "grid point" in e.problem
    assert "48" in e.problem
    r = raw(grid={"train.batch_size": [32, 48]}, fixed={"model.norm": "ghost"})
    r["model"] = {**r["model"], "ghost_batch_size": 32}
    e = error(r)
    assert e.key == "train.micro_batch_size" and "48" in e.problem and "studies.s" in e.problem


def project(tmp_path: Path, study: dict[str, Any]) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**BASE, "studies": {"s": study}}))
    return tmp_path


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["sweep", "s", "-P", "studies.s.grid.train.lr_eff=[0.5, -2]"], "studies.s.grid.train.lr_eff"),
        (["sweep", "missing"], "studies.missing"),
        (["sweep", "s", "--storage", "sqlite:///optuna.db"], "--storage"),
        (["sweep", "s", "--storage", "mysql://u:pw@h/db"], "--storage"),
        (["sweep", "s", "--workers", "0"], "--workers"),
        (["status", "s", "-P", "studies.s.metric.name=acc"], "studies.s.metric.name"),
    ],
)  # fmt: skip
def test_cli_bad_input_exits_2_naming_the_key_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, args: list[str], key: str
) -> None:
    root = project(tmp_path, {"grid": {LR_KEY: [0.5, 1.0]}})
    monkeypatch.chdir(root)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}: "), err
    assert "pw" not in err[0]
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]  # no mlflow.db, optuna/


def test_status_of_a_study_not_started_reads_without_creating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    root = project(tmp_path, {"grid": {LR_KEY: [0.5, 1.0], "train.seed": [0, 1, 2]}})
    monkeypatch.chdir(root)
    assert cli.main(["status", "s"]) == 0
    assert "not started: 6 grid points" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]


def test_storage_urls_and_redaction(tmp_path: Path) -> None:
    pg = open_storage("postgresql://me:hunter2@db.example:5432/optuna", tmp_path, "s-1", None)
    assert "hunter2" not in pg.display and pg.display.startswith("postgresql")
    assert pg.url.startswith(("postgresql+psycopg2://", "postgresql+psycopg://"))
    local = open_storage(None, tmp_path, "s-1", None)
    assert local.display == str(tmp_path / "optuna" / "s-1.log")
    explicit = open_storage(str(tmp_path / "j.log"), tmp_path, "s-1", None)
    assert explicit.display == str(tmp_path / "j.log")


def _hold_and_die(folder: Path, trial_id: int, exit_now) -> None:
    live = FileLiveness(folder, f"host-{os.getpid()}-abc")
    live.start()
    live.before_claim(trial_id)
    exit_now.wait()
    os._exit(0)  # no clean-up, as after kill -9: only the kernel releases the flock


def test_file_liveness_sees_a_dead_worker_exactly(tmp_path: Path) -> None:
    folder = tmp_path / "workers"
    me = FileLiveness(folder, "me-1-aaa")
    me.start()
    me.before_claim(7)
    ctx = multiprocessing.get_context("fork")
    die = ctx.Event()
    other = ctx.Process(target=_hold_and_die, args=(folder, 42, die))
    other.start()
    try:
        import time

        for _ in range(400):  # 20 s at most: a loaded machine can be slow to fork
            if len(list(folder.iterdir())) == 2 and me.live_claims().get(42):
                break
            time.sleep(0.05)
        assert me.live_claims() == {7: "me-1-aaa", 42: f"host-{other.pid}-abc"}
    finally:
        die.set()
        other.join(10)
    assert me.live_claims() == {7: "me-1-aaa"}  # its lock was free: reaped
    assert [p.name for p in folder.iterdir()] == ["me-1-aaa"]
    me.stop()
    assert list(folder.iterdir()) == []


def test_grid_overrides_from_the_command_line_replace_the_file_values() -> None:
    from sgdnoise.config import with_values

    r = raw(grid={LR_KEY: [0.5, 1.0], "train.seed": [0]})
    # What `-P studies.s.grid.train.seed=[1,2]` does to the raw params: a nested key.
    r = with_values(r, {"studies.s.grid.train.seed": [1, 2]})
    spec = load_spec(r, "s")
    assert spec.axes["train.seed"] == [1, 2] and len(spec.points) == 4


def test_unreachable_tracking_store_fails_fast_without_credentials_or_optuna_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from pg import free_port

    root = project(tmp_path, {"grid": {LR_KEY: [0.5, 1.0]}})
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:pw-9xq@127.0.0.1:{free_port()}/")
    assert cli.main(["sweep", "s"]) == 3
    err = capsys.readouterr().err
    assert "error: tracking: cannot use http://***@127.0.0.1" in err and "pw-9xq" not in err
    assert not list(root.glob("optuna/*.log"))  # nothing written to Optuna


def test_a_waiting_worker_wakes_when_the_journal_changes(tmp_path: Path) -> None:
    """A worker with nothing to claim waits for news in the journal (another worker's
    result), not a whole poll: its wait ends soon after another process writes a trial, and
    lasts the poll when nothing is written."""
    import threading
    import time

    import optuna

    store = open_storage(None, tmp_path, "s-1", None)
    study = optuna.create_study(study_name="s-1", storage=store.optuna())
    token = store.version()
    t0 = time.monotonic()
    store.wait(token, 0.3)  # nothing written: the whole poll
    assert time.monotonic() - t0 >= 0.3 and store.version() == token
    writer = threading.Timer(0.2, lambda: study.enqueue_trial({"x": 1.0}))
    writer.start()
    t0 = time.monotonic()
    store.wait(token, 60.0)
    waited = time.monotonic() - t0
    writer.join()
    assert store.version() != token and 0.2 <= waited < 30.0, waited
