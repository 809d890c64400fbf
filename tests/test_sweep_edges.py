"""Grid-edge rules on synthetic objectives (pure functions: no training, no stores)."""

from __future__ import annotations

import math

from sgdnoise.sweep import edges
from sgdnoise.sweep.edges import Outcome
from sgdnoise.sweep.spec import EdgeRules, Metric

ACC = Metric("final_test_accuracy", "maximize")
LOSS = Metric("final_train_loss", "minimize")


def rules(**kw) -> EdgeRules:
    return EdgeRules(**{"metrics": (ACC,), **kw})


def simulate(objective, exps: range, seeds: int, r: EdgeRules) -> tuple[dict, int]:
    """Run the extension rule to a fixed point on `objective(lr, seed) -> (value, diverged)`,
    the way the sweep does it: evaluate the group, ask for more, repeat."""
    group: dict[float, list[Outcome]] = {}

    def run(lr: float) -> None:
        outs = []
        for s in range(seeds):
            value, diverged = objective(lr, s)
            outs.append(Outcome(edges.DONE, diverged, {ACC.name: value}, seed=s))
        group[lr] = outs

    for e in exps:
        run(2.0**e)
    initial = (2.0 ** exps[0], 2.0 ** exps[-1])
    added = 0
    while new := edges.extensions(group, initial=initial, ratio=2.0, rules=r):
        for lr in new:
            run(lr)
            added += seeds
    return group, added


def peak_at(exp: float, diverge_above: float = math.inf):
    def objective(lr: float, seed: int) -> tuple[float, bool]:
        if lr > 2.0**diverge_above:
            return math.nan, True
        return 1.0 - 0.01 * (math.log2(lr) - exp) ** 2 + 0.001 * seed, False

    return objective


def test_extends_upward_until_the_optimum_is_interior() -> None:
    group, added = simulate(peak_at(3), range(-2, 1), seeds=2, r=rules(max_extensions=8))
    lrs = sorted(group)
    assert lrs == [2.0**e for e in range(-2, 5)]  # 2^1 .. 2^4 added; 2^3 is now interior
    assert added == 4 * 2
    assert edges.best_lr(group, ACC) == 2.0**3


def test_extends_downward_and_respects_the_bound() -> None:
    group, added = simulate(peak_at(-9), range(-2, 1), seeds=1, r=rules(max_extensions=3))
    assert sorted(group)[0] == 2.0**-5 and added == 3  # stopped by the bound, not the optimum
    assert edges.best_lr(group, ACC) == 2.0**-5


def test_never_grows_past_an_all_diverged_learning_rate() -> None:
    # Optimum beyond the top, but everything above 2^2 diverges: the top ends all-diverged.
    group, added = simulate(peak_at(6, diverge_above=2), range(-1, 2), seeds=2, r=rules())
    assert max(group) == 2.0**3 and edges.all_diverged(group[2.0**3])
    assert edges.best_lr(group, ACC) == 2.0**2 and added == 2 * 2


def test_all_diverged_group_extends_downward() -> None:
    group, added = simulate(peak_at(0, diverge_above=-1), range(2, 4), seeds=1, r=rules())
    assert min(group) == 2.0**-1 and added == 3


def test_off_or_pending_or_failed_means_no_extension() -> None:
    done = [Outcome(edges.DONE, False, {ACC.name: 0.5})]
    better = [Outcome(edges.DONE, False, {ACC.name: 0.9})]
    group = {1.0: done, 2.0: better}
    assert edges.extensions(group, initial=(1.0, 2.0), ratio=2.0, rules=rules()) == [4.0]
    assert edges.extensions(group, initial=(1.0, 2.0), ratio=2.0, rules=rules(extend=False)) == []
    pending = {**group, 2.0: [*better, Outcome(edges.PENDING)]}
    assert edges.extensions(pending, initial=(1.0, 2.0), ratio=2.0, rules=rules()) == []
    failed = {**group, 2.0: [*better, Outcome(edges.FAILED)]}
    assert edges.extensions(failed, initial=(1.0, 2.0), ratio=2.0, rules=rules()) == []


def test_one_seed_best_at_the_edge_extends_though_the_seed_mean_is_interior() -> None:
    # The analysis' per_seed rule reports each seed's optimum: seed 1 peaks at the top lr
    # while the seed-mean peaks inside, so the top is only a bound for that seed.
    def o(*accs: float) -> list[Outcome]:
        return [Outcome(edges.DONE, False, {ACC.name: a}, seed=i) for i, a in enumerate(accs)]

    group = {1.0: o(0.5, 0.5), 2.0: o(0.9, 0.7), 4.0: o(0.6, 0.75)}
    assert edges.best_lr(group, ACC) == 2.0  # seed-mean: 0.8 at 2, 0.675 at 4
    assert edges.seed_bests(group, ACC) == [2.0, 4.0]
    assert edges.extensions(group, initial=(1.0, 4.0), ratio=2.0, rules=rules()) == [8.0]
    agree = {1.0: o(0.5, 0.5), 2.0: o(0.9, 0.8), 4.0: o(0.6, 0.7)}
    assert edges.extensions(agree, initial=(1.0, 4.0), ratio=2.0, rules=rules()) == []
    # Outcomes without a seed (a grid with no seed axis): the seed-mean alone decides.
    anonymous = {
        lr: [Outcome(x.state, x.diverged, x.metrics) for x in v] for lr, v in group.items()
    }
    assert edges.extensions(anonymous, initial=(1.0, 4.0), ratio=2.0, rules=rules()) == []


def test_several_metrics_extend_where_any_optimum_sits_at_an_edge() -> None:
    # Accuracy peaks inside, train loss keeps falling with lr: extend for the loss.
    def o(acc: float, loss: float) -> list[Outcome]:
        return [Outcome(edges.DONE, False, {ACC.name: acc, LOSS.name: loss})]

    group = {1.0: o(0.5, 2.0), 2.0: o(0.9, 1.5), 4.0: o(0.6, 1.0)}
    both = rules(metrics=(ACC, LOSS))
    assert edges.extensions(group, initial=(1.0, 4.0), ratio=2.0, rules=rules()) == []
    assert edges.extensions(group, initial=(1.0, 4.0), ratio=2.0, rules=both) == [8.0]


def test_skip_above_an_all_diverged_learning_rate_above_one() -> None:
    div = [Outcome(edges.DONE, True), Outcome(edges.DONE, True)]
    half = [Outcome(edges.DONE, True), Outcome(edges.DONE, False, {ACC.name: 0.3})]
    fine = [Outcome(edges.DONE, False, {ACC.name: 0.5})] * 2
    r = rules()
    group = {0.5: div, 2.0: half, 4.0: div, 8.0: [], 16.0: []}
    assert edges.skip_decision(1.0, group, r) == edges.RUN  # never at or below one
    assert edges.skip_decision(4.0, group, r) == edges.RUN  # 2 did not diverge for every seed
    assert edges.skip_decision(8.0, group, r) == edges.SKIP
    assert edges.skip_decision(16.0, group, r) == edges.SKIP
    # Below one, divergence does not trigger the rule (0.5 diverged for every seed).
    assert edges.skip_decision(2.0, {0.5: div, 2.0: fine}, r) == edges.RUN
    # Undecided while a smaller lr above one is still pending.
    pending = {2.0: [Outcome(edges.PENDING), *div[:1]], 4.0: []}
    assert edges.skip_decision(4.0, pending, r) == edges.BLOCKED
    assert edges.skip_decision(8.0, group, rules(skip_diverged=False)) == edges.RUN


def test_score_treats_divergence_and_nan_as_worst_and_ties_go_to_the_smaller_lr() -> None:
    nan = [Outcome(edges.DONE, False, {ACC.name: math.nan})]
    div = [Outcome(edges.DONE, True, {ACC.name: 0.99})]
    same = [Outcome(edges.DONE, False, {ACC.name: 0.5})]
    assert edges.score(nan, ACC) == -math.inf and edges.score(div, ACC) == -math.inf
    assert edges.score(same, Metric(ACC.name, "minimize")) == -edges.score(same, ACC) == -0.5
    assert edges.best_lr({1.0: same, 2.0: same, 4.0: div}, ACC) == 1.0
