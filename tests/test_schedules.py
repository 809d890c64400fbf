"""Schedules are functions of progress: boundaries land on exact steps for any budget."""

import math

import pytest

from sgdnoise.config import load_config
from sgdnoise.optim import lr_table, smith2020
from sgdnoise.train import total_steps


@pytest.mark.parametrize("total", [200, 1000, 9765])
def test_smith2020_boundaries(total: int) -> None:
    half = total / 2
    assert smith2020(0, total) == 1.0
    assert smith2020(math.ceil(half) - 1, total) == 1.0  # last step of the first half
    assert smith2020(math.ceil(half), total) == 0.5  # first step of the second half
    for k in range(1, 11):
        # The k-th halving holds from N/2 + (k-1) N/20 until N/2 + k N/20.
        start = math.ceil(half + (k - 1) * total / 20)
        end = math.ceil(half + k * total / 20) - 1
        assert smith2020(start, total) == 0.5**k, (k, start)
        assert smith2020(end, total) == 0.5**k, (k, end)
    assert smith2020(total - 1, total) == 0.5**10  # ten halvings by the end


def test_epoch_and_step_budgets_scale_the_same_schedule() -> None:
    # An epoch budget of 20 epochs over 8000 examples at B=64 is 2500 steps; the schedule
    # is then the same function of progress as a 2500-step budget.
    by_epochs = load_config(None, ["train.batch_size=64", "train.budget.value=20"])
    by_steps = load_config(None, ["train.budget.unit=steps", "train.budget.value=2500"])
    n_epochs, n_steps = total_steps(by_epochs, 8000), total_steps(by_steps, 8000)
    assert n_epochs == n_steps == 2500
    a = lr_table("smith2020", 0.1, n_epochs)
    assert a == lr_table("smith2020", 0.1, n_steps)
    assert a[0] == a[1249] == 0.1
    assert a[1250] == 0.05
    assert a[1375] == 0.025  # 1250 + 2500/20
    assert a[-1] == 0.1 / 1024


def test_constant_cosine_step_and_warmup() -> None:
    assert set(lr_table("constant", 0.3, 50)) == {0.3}
    cos = lr_table("cosine", 1.0, 100)
    assert cos[0] == 1.0 and abs(cos[50] - 0.5) < 1e-12 and cos[99] < 0.001
    step = lr_table("step", 1.0, 100)
    assert step[49] == 1.0 and step[50] == 0.1 and step[74] == 0.1 and step[75] == 0.01
    warm = lr_table("constant", 1.0, 100, warmup=0.1)
    assert warm[0] == pytest.approx(0.1) and warm[9] == 1.0 and warm[50] == 1.0
