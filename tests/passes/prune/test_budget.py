"""Budget: the cost model is exact, the knapsack reaches its target cheaply, limits hold."""

from __future__ import annotations

import time

import numpy as np
import pytest

from onnxopt.channels import analyse_channels
from onnxopt.channels.surgery import remove_channels
from onnxopt.cost import model_cost
from onnxopt.ir import from_proto
from onnxopt.passes.prune.budget import (
    Limits,
    allocate_knapsack,
    allocate_ratio,
    allocate_uniform,
    group_savings,
    rank_values,
)
from onnxopt.passes.prune.channel_cost import CostModel, CostTerm, macs_model, params_model
from testmodels.structures import STRUCTURES


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_cost_model_predicts_macs_and_params_after_surgery(name: str) -> None:
    model = from_proto(STRUCTURES[name]())
    analysis = analyse_channels(model)
    macs, params = macs_model(analysis), params_model(analysis)
    cost = model_cost(model)
    assert macs.total() == pytest.approx(cost.macs)
    assert params.total() == pytest.approx(cost.params)
    rng = np.random.default_rng(0)
    keep = {}
    for group in analysis.groups:
        if group.prunable and group.size > 1:
            mask = rng.random(group.size) < 0.6
            mask[rng.integers(group.size)] = True
            keep[group.index] = mask
    predicted = (macs.total(keep), params.total(keep))
    for group in analysis.groups:
        if group.index in keep:
            remove_channels(model, group, np.flatnonzero(~keep[group.index]).tolist())
    after = model_cost(model)
    assert predicted == (pytest.approx(after.macs), pytest.approx(after.params))
    savings = group_savings(macs, keep)
    assert sum(savings.values()) == pytest.approx(cost.macs - after.macs)


def test_limits_allowed_widths() -> None:
    assert Limits().allowed(20).tolist() == list(range(20, 1, -1))  # 10% of 20 = 2
    assert Limits(round_to=8).allowed(20).tolist() == [20, 16, 8]
    assert Limits(min_channels=5, round_to=4).allowed(16).tolist() == [16, 12, 8]
    assert Limits(round_to=8).allowed(8).tolist() == [8]  # nothing to remove
    assert Limits(round_to=8).nearest(16, 11.2) == 8
    assert Limits(round_to=8).nearest(16, 12.0) == 16  # ties go to the wider


def _chain(widths: list[int], base: float = 1.0) -> CostModel:
    """Cost of a conv chain: term i ~ w_i * w_{i+1} (group i feeds group i+1)."""
    model = CostModel()
    shares = [np.full(w, 1.0 / w) for w in widths]
    for i in range(len(widths) - 1):
        model.terms.append(CostTerm(base * widths[i] * widths[i + 1],
                                    [(i, shares[i]), (i + 1, shares[i + 1])]))
    model.terms.append(CostTerm(base * widths[0], [(0, shares[0])]))
    return model


def test_knapsack_reaches_the_target_and_prefers_unimportant_channels() -> None:
    widths = [16, 32, 32]
    cost = _chain(widths)
    scores = {0: np.full(16, 10.0), 1: np.linspace(0.01, 1, 32), 2: np.full(32, 10.0)}
    target = 0.6 * cost.total()
    keep = allocate_knapsack(scores, cost, target, Limits())
    assert cost.total(keep) <= target
    assert keep[0].all() and keep[2].all()  # all the pruning where importance is low
    assert not keep[1][:5].any()  # and the least important channels of it go first
    # the last step's overshoot is given back: within one channel's cost of the target
    assert cost.total(keep) > target - 32 * 32 / 32 * 2


def test_knapsack_with_round_to_keeps_multiples() -> None:
    cost = _chain([24, 40, 40])
    scores = {g: np.random.default_rng(g).random(w) for g, w in enumerate([24, 40, 40])}
    keep = allocate_knapsack(scores, cost, 0.5 * cost.total(), Limits(round_to=8), True)
    for mask in keep.values():
        assert mask.sum() % 8 == 0 or mask.all()
    assert cost.total(keep) <= 0.5 * cost.total()


def test_relative_values_spread_the_pruning() -> None:
    """Flat per-layer scores must not empty the costliest group (layer collapse)."""
    cost = _chain([16, 64, 16])
    flat = {0: np.ones(16), 1: np.ones(64), 2: np.ones(16)}
    plain = allocate_knapsack(flat, cost, 0.5 * cost.total(), Limits(min_channels=1))
    spread = allocate_knapsack(flat, cost, 0.5 * cost.total(), Limits(min_channels=1), True)
    assert min(m.sum() for m in plain.values()) == 1  # a layer emptied to its minimum
    assert min(m.mean() for m in spread.values()) > 0.3


def test_uniform_and_ratio() -> None:
    cost = _chain([16, 32, 32])
    scores = {g: np.arange(w, dtype=float) for g, w in enumerate([16, 32, 32])}
    keep = allocate_ratio(scores, 0.25, Limits())
    assert [int(m.sum()) for m in keep.values()] == [12, 24, 24]
    assert not keep[1][:8].any()  # lowest scores removed
    keep = allocate_uniform(scores, cost, 0.5 * cost.total(), Limits())
    assert cost.total(keep) <= 0.5 * cost.total()
    fractions = [m.mean() for m in keep.values()]
    assert max(fractions) - min(fractions) < 0.1
    assert allocate_uniform(scores, cost, cost.total(), Limits())[0].all()


def test_rank_values_keep_order_and_mean() -> None:
    scores = np.array([3.0, 0.1, 5.0, 2.0])
    values = rank_values(scores)
    assert np.argsort(values).tolist() == np.argsort(scores).tolist()
    assert values.mean() == pytest.approx(scores.mean())


def test_knapsack_is_fast_on_a_large_model() -> None:
    widths = [512] * 60
    cost = _chain(widths)
    rng = np.random.default_rng(0)
    scores = {g: rng.random(w) for g, w in enumerate(widths)}
    start = time.perf_counter()
    keep = allocate_knapsack(scores, cost, 0.5 * cost.total(), Limits(round_to=8), True)
    assert time.perf_counter() - start < 5.0
    assert cost.total(keep) <= 0.5 * cost.total()
