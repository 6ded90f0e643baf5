"""prune(latency=X, batch=1;32): one budget per batch, one plan that meets X at each."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.channels import analyse_channels
from onnxopt.cost import infer_shapes, model_cost
from onnxopt.data import input_specs, random_source
from onnxopt.errors import PipelineError
from onnxopt.ir import from_proto
from onnxopt.pass_base import PassContext, PassResult
from onnxopt.passes.prune import PrunePass
from onnxopt.passes.prune.budget import Limits, allocate_knapsack, allocate_uniform
from onnxopt.passes.prune.candidates import candidates
from onnxopt.passes.prune.latency_batches import LatencyBudgets, mean_cost
from onnxopt.passes.prune.latency_plan import CLOSE, LatencyBudget
from onnxopt.pipeline import parse_pipeline
from onnxopt.session import run_model
from onnxopt.timing import SideBySide
from testmodels.structures import conv_chain, inverted_residual
from tests.helpers import apply_pass, random_feeds
from tests.helpers import macs_timer as _macs_timer


def test_batch_option_takes_a_list_and_checks_each_size() -> None:
    (two,) = parse_pipeline("prune(latency=0.5,batch=1;32)")
    assert two.options.batch == (1, 32) and two.options.batches() == (1, 32)
    (one,) = parse_pipeline("prune(latency=0.5,batch=8)")
    assert one.options.batch == 8 and one.options.batches() == (8,)
    (unset,) = parse_pipeline("prune(latency=0.5)")
    assert unset.options.batches() == (1,)
    assert PrunePass(latency=0.5, batch=(4, 4, 1)).options.batches() == (4, 1)
    for spec in ("prune(latency=0.5,batch=1;0)", "prune(latency=0.5,batch=1;x)",
                 "prune(macs=0.5,batch=1;32)", "prune(latency=0.5,batch=;)"):
        with pytest.raises(PipelineError):
            parse_pipeline(spec)


def test_mean_cost_is_the_mean_of_the_batches_plus_the_excess() -> None:
    proto = inverted_residual()
    model = from_proto(proto)
    analysis = analyse_channels(model)
    groups = candidates(analysis, (), PassResult(modified=False))
    from onnxopt.passes.prune.channel_cost import macs_model, params_model

    a, b = macs_model(analysis), params_model(analysis)
    keep = {g.index: np.arange(g.size) < g.size // 2 for g in groups}
    mean = mean_cost([a, b], 0.25)
    assert mean.total(keep) == pytest.approx(0.5 * (a.total(keep) + b.total(keep)) + 0.25)
    assert mean.total() == pytest.approx(0.5 * (a.total() + b.total()) + 0.25)
    assert mean_cost([a]) is a


def _budgets(proto, curves: dict[int, callable], timed: dict[int, list[float]]):
    """Budgets at each batch of ``curves``, whose whole-model ratio at kept MACs ``m`` is
    ``curves[batch](m)`` (a fake timer per batch: the larger batch gains more)."""
    model = from_proto(proto)
    analysis = analyse_channels(model)
    groups = candidates(analysis, (), PassResult(modified=False))
    full = model_cost(infer_shapes(model)).macs

    def make(batch: int) -> LatencyBudget:
        def compare(original, models, feed, threads):
            assert feed["input"].shape[0] == batch
            kept = model_cost(infer_shapes(from_proto(models[0]))).macs / full
            timed[batch].append(curves[batch](kept))
            return SideBySide(0.1 * batch, [timed[batch][-1]], [0.002], 1.0, 0.002)

        def timer(items):  # the one-node models run at the budget's batch too
            for _, feeds in items:
                assert all(f.shape[0] == batch for f in feeds.values()) and feeds
            return _macs_timer(items)

        return LatencyBudget(model, analysis, groups, {"input": (1, 3, 16, 16)}, batch=batch,
                             threads=1, timer=timer, compare=compare)

    budgets = LatencyBudgets(model, analysis, groups, {"input": (1, 3, 16, 16)},
                             batches=list(curves), threads=1, make=make)
    scores = {g.index: np.arange(g.size, dtype=float) + 1 for g in groups}
    return budgets, scores


def test_a_plan_meets_the_target_at_every_batch_with_a_fake_timer() -> None:
    curves = {1: lambda m: 0.25 + 0.75 * m,  # batch 1: fixed costs, gains less
              4: lambda m: 0.05 + 0.95 * m ** 1.3}
    timed: dict[int, list[float]] = {1: [], 4: []}
    budgets, scores = _budgets(inverted_residual(), curves, timed)
    limits = Limits(None, 1)
    cost = budgets.cost(limits, lambda c, t: allocate_uniform(scores, c, t, limits), 0.5)
    # both calibrated ratios are 1 at full width; the plan's cost adds the excess of the
    # slower batch (1, fixed costs) over the mean at the uniform plan
    assert [c.total() for c in budgets.costs] == pytest.approx([1.0, 1.0])
    at = budgets.budgets[0].uniform_keep
    one, four = (c.total(at) for c in budgets.costs)
    assert one > four and cost.total() == pytest.approx(1.0 + (one - four) / 2)

    def replan(new):
        return allocate_knapsack(scores, new, 0.5, limits)

    final, final_cost = budgets.check(replan(cost), cost, 0.5, replan)
    one, four = budgets.outcomes
    assert (one.batch, four.batch) == (1, 4) and one.original_ms != four.original_ms
    assert len(one.history) == len(four.history) == 1 + one.rounds == 1 + four.rounds
    assert one.history == timed[1][1:] and four.history == timed[4][1:]
    # the kept plan meets 0.5 at both batches; batch 1 is the binding one, near 0.5
    assert one.measured <= 0.5 + one.noise + CLOSE and four.measured < one.measured
    assert one.measured == pytest.approx(0.5, abs=0.03)
    assert budgets.outcome is one
    # each batch's own prediction of the kept plan: the binding one is re-fitted near the
    # target; the other stays on its calibration line, off its convex curve
    assert one.error < 0.05 and four.error < 0.15
    assert final_cost.total(final) <= 0.5 + 1e-9


def test_one_batch_is_the_one_batch_budget() -> None:
    timed: dict[int, list[float]] = {2: []}
    budgets, scores = _budgets(inverted_residual(), {2: lambda m: 0.1 + 0.9 * m}, timed)
    (only,) = budgets.budgets
    limits = Limits(None, 1)
    cost = budgets.cost(limits, lambda c, t: allocate_uniform(scores, c, t, limits), 0.5)
    assert cost is budgets.costs[0]  # no mean, no excess
    keep = allocate_knapsack(scores, cost, 0.5, limits)
    final, _ = budgets.check(keep, cost, 0.5, lambda c: allocate_knapsack(scores, c, 0.5,
                                                                          limits))
    assert budgets.outcomes == [only.outcome] and budgets.outcome is only.outcome
    assert only.outcome.history == timed[2][1:] and only.outcome.measured in timed[2]


def test_latency_budget_at_two_batches_prunes_a_model_onnxruntime_runs() -> None:
    proto = conv_chain()
    ctx = PassContext(calib=random_source(input_specs(from_proto(proto)), 16, seed=1))
    model, result = apply_pass(PrunePass(latency=0.7, batch=(1, 2), round_to=4), proto, ctx)
    assert result.modified
    lat = result.stats["latency"]
    per = lat["per_batch"]
    assert [p["batch"] for p in per] == [1, 2]
    assert all(p["original_ms"] > 0 and p["measured"] > 0 and p["history"] for p in per)
    assert lat["measured"] == max(p["measured"] for p in per)  # the binding batch
    assert "at batch 1" in result.summary and "at batch 2" in result.summary
    feeds = random_feeds(proto, batch=2, seed=5)
    (before,), (after,) = run_model(from_proto(proto), feeds), run_model(model, feeds)
    assert after.shape == before.shape and np.all(np.isfinite(after))
