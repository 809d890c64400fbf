"""The paper-scale presets and the shipped studies are valid as given: every grid point of
every study resolves to a config (this is what `sgdnoise sweep` checks before any work);
the ImageNet preset also trains a few steps on a tiny fake copy in its on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sgdnoise.config import raw_params
from sgdnoise.sweep.spec import load_spec

from fakes import write_fake_imagefolder
from helpers import cli, tracking_uri

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "presets").glob("*.yaml")) + [REPO / "params.yaml"]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_study_of_every_preset_validates(path: Path) -> None:
    raw = raw_params(path)
    assert raw["studies"], f"{path.name} defines no study"
    for name in raw["studies"]:
        spec = load_spec(raw, name)
        assert len(spec.points) > 0
        keys = {p.run_key for p in spec.points}
        assert len(keys) == len(spec.points)  # every grid point is a distinct run


def test_paper_scale_presets_hold_the_three_studies() -> None:
    for name in ("wrn_cifar10_ghost.yaml", "wrn_cifar10_skipinit.yaml"):
        raw = raw_params(REPO / "presets" / name)
        assert set(raw["studies"]) == {"constant_epochs", "constant_steps", "epoch_budgets"}
        steps = raw["studies"]["constant_steps"]["fixed"]["train.budget.value"]
        assert steps == 9765  # 200 epochs at B = 1024 on 50,000 images


def test_imagenet_preset_trains_a_few_steps_on_a_tiny_imagefolder(project: Path) -> None:
    """The ResNet-50 preset as given, shrunk by -P overrides to a tiny fake ImageFolder on CPU
    (16 px images, ghost batch 4, B = 8 in two micro-batches), through the real CLI."""
    write_fake_imagefolder(project / "data" / "raw", ["n02", "n01", "n03"], n_train=4, n_test=2)
    tiny = {
        "data.image_size": 16,
        "model.ghost_batch_size": 4,
        "train.batch_size": 8,
        "train.micro_batch_size": 4,
        "train.budget.unit": "steps",
        "train.budget.value": 3,
        "train.eval_points": 1,
        "train.eval_batch_size": 16,
        "train.device": "cpu",
        "train.threads": 1,
    }
    preset = REPO / "presets" / "resnet50_imagenet.yaml"
    args = [a for k, v in tiny.items() for a in ("-P", f"{k}={v}")]
    res = cli(project, "train", "--params", str(preset), *args, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == "finished" and out["steps"] == 3.0

    mlf = MlflowClient(tracking_uri(project))
    run = mlf.get_run(out["run_id"])
    assert mlf.get_experiment(run.info.experiment_id).name == "resnet50_imagenet"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["data.name"], params["model.name"], params["model.norm"]) == (
        "imagenet", "resnet50", "ghost",
    )  # fmt: skip
    assert params["train.precision"] == "bf16" and params["derived.accumulation"] == "2"
    meta = json.loads((project / "data/prepared/imagenet/meta.json").read_text())
    assert run.data.tags["sgdnoise.data_checksum"] == meta["checksum"]
    assert 0.0 <= run.data.metrics["final_test_accuracy"] <= 1.0
