"""The paper-scale presets and the shipped studies are valid as given: every grid point of
every study resolves to a config (this is what `sgdnoise sweep` checks before any work)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgdnoise.config import raw_params
from sgdnoise.sweep.spec import load_spec

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
