"""prune(latency=X) on concat groups: per-slice node tables, slices snapped to the step."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.channels import analyse_channels
from onnxopt.cost import infer_shapes, model_cost
from onnxopt.data import input_specs, random_source
from onnxopt.ir import from_proto
from onnxopt.pass_base import PassContext, PassResult
from onnxopt.passes.prune import PrunePass
from onnxopt.passes.prune.budget import Limits, allocate_knapsack, allocate_uniform
from onnxopt.passes.prune.candidates import candidates
from onnxopt.passes.prune.channel_cost import macs_model
from onnxopt.passes.prune.latency import latency_model, node_specs
from onnxopt.passes.prune.latency_cache import LatencyMeter
from onnxopt.passes.prune.latency_plan import LatencyBudget
from onnxopt.passes.prune.latency_slices import (
    BLOCK,
    concat_slices,
    keep_slices_on_step,
    snapped,
    snapped_allocation,
)
from onnxopt.session import run_model
from onnxopt.shapes import concrete_shapes
from onnxopt.timing import SideBySide
from testmodels.structures import concat_branches, conv_chain
from tests.helpers import apply_pass, random_feeds
from tests.helpers import macs_timer as _macs_timer


def _concat(width: int = 8):
    proto = concat_branches(width=width)
    model = from_proto(proto)
    analysis = analyse_channels(model)
    groups = candidates(analysis, (), PassResult(modified=False))
    dense = max(groups, key=lambda g: g.size)  # the Inception + DenseNet concat group
    return proto, model, analysis, groups, dense


def test_concat_slices_partition_the_concat_group() -> None:
    _, _, _, groups, dense = _concat()
    slices = concat_slices(dense)
    assert len(slices) == 7  # four Inception branches, three DenseNet layers
    assert sorted(np.concatenate(slices).tolist()) == list(range(dense.size))
    assert all(concat_slices(g) == [] for g in groups if g is not dense)


def test_each_slice_producer_is_costed_by_its_own_slice() -> None:
    """Thinning one slice costs what it removes there (MACs-proportional fake timer).

    With one table per group, every producer of the group scaled with the group's kept
    fraction: emptying one branch looked like thinning all of them a little.
    """
    _, model, analysis, groups, dense = _concat()
    shapes = concrete_shapes(model, {"input": (1, 3, 16, 16)})
    specs, skipped = node_specs(analysis, shapes, groups)
    assert not skipped
    slices = {tuple(s) for s in map(tuple, concat_slices(dense))}
    own = [s for s in specs if any(g == dense.index and tuple(c) in slices
                                   for g, c in zip(s.factors, s.channels, strict=True))]
    assert {s.node.op_type for s in own} >= {"Conv", "Relu", "BatchNormalization"}
    concats = [s for s in specs if s.node.op_type == "Concat"]
    assert concats and all(len(s.factors) == 1 for s in concats)  # costed from the sum
    # a DenseNet layer reads a prefix of the group and writes the next slice: two factors
    assert any(s.factors == [dense.index, dense.index] for s in specs)
    raw = latency_model(analysis, specs, Limits(None, 1), LatencyMeter(1, _macs_timer, None))
    macs = macs_model(analysis, shapes)
    for s in concat_slices(dense):
        keep = {g.index: np.ones(g.size, dtype=bool) for g in groups}
        keep[dense.index][s[1:]] = False  # one slice down to one channel
        keep[groups[0].index][: groups[0].size // 2] = False
        saved = raw.total() - raw.total(keep)
        assert saved == pytest.approx(1e-9 * (macs.total() - macs.total(keep)), rel=1e-6)


def test_slices_snap_to_the_step_keeping_the_count_and_the_best_channels() -> None:
    _, _, _, _, dense = _concat(width=32)  # slices of 32 and 16 channels
    slices = concat_slices(dense)
    rng = np.random.default_rng(0)
    scores = rng.random(dense.size)
    keep = np.ones(dense.size, dtype=bool)
    keep[slices[0][3:]] = False  # 3 of 32 kept
    keep[slices[1][20:]] = False  # 20 of 32
    keep[slices[-1][5:]] = False  # 5 of 16
    assert int(keep.sum()) % 8  # off the step
    snapped = keep_slices_on_step(dense, keep, scores, 8)
    counts = [int(snapped[s].sum()) for s in slices]
    assert all(c % 8 == 0 or c % 4 == 0 and len(s) < 32 for c, s in zip(counts, slices,
                                                                         strict=True))
    assert all(c >= min(8, len(s) // 4) for c, s in zip(counts, slices, strict=True))
    assert int(snapped.sum()) <= int(keep.sum()) and int(keep.sum()) - int(snapped.sum()) < 8
    for s, c in zip(slices, counts, strict=True):  # the best channels of each slice
        assert set(np.flatnonzero(snapped[s])) == set(np.argsort(-scores[s])[:c])
    on_step = keep.copy()
    on_step[slices[0]] = np.arange(32) < 8
    on_step[slices[1]] = np.arange(32) < 16
    on_step[slices[-1]] = np.arange(16) < 8
    assert np.array_equal(keep_slices_on_step(dense, on_step, np.arange(dense.size) * 0.0,
                                              8), on_step)  # already on the step
    assert keep_slices_on_step(dense, keep, scores, 1) is keep  # step 1: nothing to snap


def test_snapped_allocation_meets_the_target_with_slices_on_the_step() -> None:
    _, model, analysis, groups, dense = _concat(width=32)
    cost = macs_model(analysis, concrete_shapes(model, {"input": (1, 3, 16, 16)}))
    cost = cost.restrict([g.index for g in groups])
    rng = np.random.default_rng(1)
    scores = {g.index: rng.random(g.size) for g in groups}
    limits = Limits(None, 8)
    for allocator in (allocate_knapsack, allocate_uniform):
        target = 0.4 * cost.total()
        plan = snapped_allocation(lambda t, a=allocator: a(scores, cost, t, limits, True),
                                  groups, scores, cost, target, limits)
        assert cost.total(plan) <= target * (1 + 1e-9)
        assert cost.total(plan) > 0.3 * cost.total()  # not the deepest plan either
        for s in concat_slices(dense):
            kept = int(plan[dense.index][s].sum())  # a 16-wide slice holds 4 steps of 4
            assert kept % (8 if len(s) >= 32 else 4) == 0 and kept > 0
    # without concat slices the allocator's plan is returned as it is
    chain = from_proto(conv_chain())
    chain_analysis = analyse_channels(chain)
    chain_groups = candidates(chain_analysis, (), PassResult(modified=False))
    chain_cost = macs_model(chain_analysis).restrict([g.index for g in chain_groups])
    chain_scores = {g.index: np.arange(g.size, dtype=float) for g in chain_groups}
    direct = allocate_knapsack(chain_scores, chain_cost, 0.5 * chain_cost.total(), limits)
    again = snapped_allocation(
        lambda t: allocate_knapsack(chain_scores, chain_cost, t, limits), chain_groups,
        chain_scores, chain_cost, 0.5 * chain_cost.total(), limits)
    assert all(np.array_equal(direct[g], again[g]) for g in direct)


def test_first_concat_plan_predicts_a_macs_proportional_latency() -> None:
    """Fake timers that both follow MACs: the first knapsack plan's prediction is exact
    up to interpolation, however unevenly the knapsack thins the concat slices."""
    proto, model, analysis, groups, dense = _concat()
    full = model_cost(infer_shapes(model)).macs
    measured: list[float] = []

    def compare(original, models, feed, threads):
        measured.append(model_cost(infer_shapes(from_proto(models[0]))).macs / full)
        return SideBySide(0.1, [measured[-1]], [0.002], 1.0, 0.002)

    budget = LatencyBudget(model, analysis, groups, {"input": (1, 3, 16, 16)}, batch=1,
                           threads=1, timer=_macs_timer, compare=compare)
    scores = {g.index: np.linspace(1, 2, g.size) for g in groups}
    scores[dense.index][concat_slices(dense)[0]] *= 0.1  # the knapsack empties one branch
    limits = Limits(None, 1)
    cost = budget.cost(limits, lambda c, t: allocate_uniform(scores, c, t, limits), 0.5)
    keep = allocate_knapsack(scores, cost, 0.5, limits)
    first = concat_slices(dense)[0]
    assert keep[dense.index][first].sum() < 0.5 * len(first)  # uneven slices
    budget.check(keep, cost, 0.5, lambda c: keep)  # no other plan: one timing
    assert len(measured) == 2 and budget.outcome.rounds == 0
    assert budget.outcome.predictions[0] == pytest.approx(measured[1], rel=0.02)


def test_latency_budget_on_concat_runs_and_snaps_slices() -> None:
    proto, _, _, _, dense = _concat()
    ctx = PassContext(calib=random_source(input_specs(from_proto(proto)), 16, seed=1))
    model, result = apply_pass(PrunePass(latency=0.5, round_to=4), proto, ctx)
    assert result.modified and result.stats["latency"]["measured"] > 0
    pruned = infer_shapes(model)
    for node in pruned.graph:  # every concat input (a slice) on the step of 4, or whole
        if node.op_type == "Concat":
            assert all(v.shape[1] % 4 == 0 or v.shape[1] < 16 for v in node.inputs)
    feeds = random_feeds(proto, batch=2, seed=5)
    (before,), (after,) = run_model(from_proto(proto), feeds), run_model(model, feeds)
    assert after.shape == before.shape and np.all(np.isfinite(after))


def test_a_measured_step_below_the_block_still_snaps_slices_to_the_block() -> None:
    _, _, _, groups, dense = _concat(width=32)
    rng = np.random.default_rng(2)
    scores = {g.index: rng.random(g.size) for g in groups}
    keep = {g.index: rng.random(g.size) < 0.4 for g in groups}
    limits = Limits(None, 2, ((dense.index, 2),))  # a step of 2 measured on a busy machine
    loose = snapped(groups, keep, scores, limits)
    tight = snapped(groups, keep, scores, limits, BLOCK)
    slices = concat_slices(dense)
    assert any(int(loose[dense.index][s].sum()) % 4 for s in slices)  # step 2 only
    for s in slices:  # 32-wide slices on the block of 8, 16-wide ones on 4 (four steps)
        assert int(tight[dense.index][s].sum()) % (BLOCK if len(s) >= 32 else 4) == 0
    assert int(tight[dense.index].sum()) <= int(keep[dense.index].sum())
