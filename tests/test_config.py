"""Bad input fails before any work: one line naming the key, exit 2, nothing created."""

from pathlib import Path

import pytest

from sgdnoise.config import ConfigError, load_config

from helpers import SMALL, cli, write_project

BAD = [
    (["-P", "train.lr=0.1"], "train.lr"),
    (["-P", "train.lr_eff=-1"], "train.lr_eff"),
    (["-P", "train.lr_eff=abc"], "train.lr_eff"),
    (["-P", "train.lr_eff=.inf"], "train.lr_eff"),
    (["-P", "train.batch_size=12.5"], "train.batch_size"),
    (["-P", "train.batch_size=0"], "train.batch_size"),
    (["-P", "train.momentum=1.0"], "train.momentum"),
    (["-P", "train.optimizer=adam"], "train.optimizer"),
    (["-P", "train.schedule=linear"], "train.schedule"),
    (["-P", "data.name=imagenet21k"], "data.name"),
    (["-P", "data.image_size=4"], "data.image_size"),
    (["-P", "train.pack=0"], "train.pack"),
    (["-P", "data.image_size=224.5"], "data.image_size"),
    (["-P", "model.name=vit"], "model.name"),
    (["-P", "model.norm=layer"], "model.norm"),
    (["-P", "train.budget.value=0"], "train.budget.value"),
    (["-P", "train.budget.unit=hours"], "train.budget.unit"),
    (["-P", "train.budget.unit=steps", "-P", "train.budget.value=10.5"], "train.budget.value"),
    (["-P", "train.batch_size=100", "-P", "train.micro_batch_size=32"], "train.micro_batch_size"),
    (
        ["-P", "model.norm=ghost", "-P", "train.batch_size=128", "-P", "train.micro_batch_size=32"],
        "train.micro_batch_size",
    ),
    (["-P", "model.name=cnn1d", "-P", "data.name=digits"], "model.name"),
    (["-P", "model.name=wrn", "-P", "model.norm=none", "-P", "data.name=digits"], "model.norm"),
    (["-P", "bogus.key=1"], "bogus"),
    (["-P", "train.weight_decay=-1"], "train.weight_decay"),
    (["-P", "train.seed=-3"], "train.seed"),
    (["-P", "train.eval_points=0"], "train.eval_points"),
    (["-P", "train.eval_subset=0"], "train.eval_subset"),
    # SMALL's 600 MNIST-1D examples hold 480 for training: B = 481 is no batch of them.
    (["-P", "train.batch_size=481"], "train.batch_size"),
    (["-P", "train.batch_size=4096", "-P", "train.micro_batch_size=64"], "train.batch_size"),
    (["-P", "train.precision=fp8"], "train.precision"),
    (
        [
            "-P",
            "model.name=wrn",
            "-P",
            "model.norm=batch",
            "-P",
            "model.depth=15",
            "-P",
            "data.name=digits",
        ],
        "model.depth",
    ),
    (["-P", "noequals"], "-P noequals"),
    (["--params", "missing.yaml"], "--params"),
    (["-P", "train.budget=5"], "train.budget"),
    (["-P", "data.name=cifar10", "-P", "model.name=wrn", "-P", "model.norm=batch"], "data.root"),
    (
        ["-P", "data.name=imagenet", "-P", "model.name=resnet50", "-P", "model.norm=batch"],
        "data.root",
    ),
]


@pytest.mark.parametrize(("args", "key"), BAD, ids=[k + str(i) for i, (_, k) in enumerate(BAD)])
def test_bad_input_exits_2_naming_the_key_and_creates_nothing(
    tmp_path: Path, args: list[str], key: str
) -> None:
    root = write_project(tmp_path / "proj", SMALL)
    res = cli(root, "train", *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {key}: "), lines[0]
    assert "; allowed: " in lines[0]
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]  # no mlflow.db, no data/


def test_malformed_params_file(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text("train: {lr_eff: [1, 2\n")
    res = cli(root, "prepare")
    assert res.returncode == 2 and res.stderr.startswith("error: --params: ")
    (root / "params.yaml").write_text("- just\n- a list\n")
    res = cli(root, "train")
    assert res.returncode == 2 and "does not hold a mapping" in res.stderr
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]


def test_resolution_derives_micro_batch_momentum_and_model_size() -> None:
    cfg = load_config(None, ["train.optimizer=sgd", "train.batch_size=128", "train.lr_eff=2^3"])
    assert cfg.train.micro_batch_size == 128
    assert cfg.train.momentum == 0.0 and cfg.lr == 8.0
    assert (cfg.model.depth, cfg.model.width) == (2, 256)
    mom = load_config(None, ["train.lr_eff=1.0", "train.momentum=0.9"])
    assert mom.lr == pytest.approx(0.1)  # ε = ε_eff (1 − m)


def test_run_key_ignores_how_a_batch_is_split_but_not_what_is_trained() -> None:
    base = load_config(None, ["train.batch_size=128"])
    split = load_config(None, ["train.batch_size=128", "train.micro_batch_size=32"])
    assert base.run_key == split.run_key
    assert base.run_key != load_config(None, ["train.batch_size=128", "train.seed=1"]).run_key
    assert base.run_key == load_config(None, ["train.batch_size=128", "train.threads=2"]).run_key


def test_processes_must_divide_the_batch() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.batch_size=30"], num_processes=4)
    assert e.value.key == "train.batch_size"
    cfg = load_config(None, ["train.batch_size=64", "train.micro_batch_size=16"], num_processes=2)
    assert cfg.train.micro_batch_size == 16


def test_image_size_is_part_of_what_is_trained() -> None:
    base = load_config(None, ["data.name=imagenet", "model.name=resnet50", "model.norm=batch"])
    assert base.data.image_size is None  # 224, the usual ImageNet crop, when prepared
    assert base.flat()["data.image_size"] is None  # recorded with the run's params
    small = load_config(
        None,
        ["data.name=imagenet", "model.name=resnet50", "model.norm=batch", "data.image_size=128"],
    )
    assert small.run_key != base.run_key
    # Unset, it leaves run keys as they were before the key existed.
    assert "image_size" not in base.identity()["data"]
    assert "image_size" in small.identity()["data"]


def test_a_sweep_with_a_batch_larger_than_the_training_set_creates_nothing(
    tmp_path: Path,
) -> None:
    study = {
        "fixed": {"train.budget.unit": "steps", "train.budget.value": 2},
        "grid": {"train.batch_size": [32, 480, 960], "train.lr_eff": [0.1], "train.seed": [0]},
        "metric": {"name": "final_test_accuracy", "direction": "maximize"},
    }
    root = write_project(tmp_path / "proj", {**SMALL, "studies": {"too_big": study}})
    res = cli(root, "sweep", "too_big")
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: train.batch_size: B=960 is larger than the training set "
                           "(480 examples); allowed: an integer from 1 to 480"), line  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]  # no optuna/, no store
