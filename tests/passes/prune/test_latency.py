"""prune(latency=X): node tables, cache, granularity, calibration and correction, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt.channels import analyse_channels
from onnxopt.cost import infer_shapes, model_cost
from onnxopt.data import input_specs, random_source
from onnxopt.errors import PipelineError, UserError
from onnxopt.ir import from_proto, to_proto
from onnxopt.pass_base import PassContext, PassResult
from onnxopt.passes.prune import PrunePass
from onnxopt.passes.prune.budget import Limits, allocate_knapsack, allocate_uniform
from onnxopt.passes.prune.candidates import candidates
from onnxopt.passes.prune.latency import (
    TableTerm,
    calibrated,
    latency_model,
    monotone,
    node_specs,
)
from onnxopt.passes.prune.latency_cache import CACHE_ENV, LatencyMeter, cache_dir
from onnxopt.passes.prune.latency_plan import CLOSE, ROUNDS, LatencyBudget
from onnxopt.passes.prune.latency_steps import detect_step
from onnxopt.pipeline import parse_pipeline
from onnxopt.session import run_model
from onnxopt.shapes import concrete_shapes
from onnxopt.timing import SideBySide
from testmodels.dynamic import with_input_dims
from testmodels.structures import concat_branches, conv_chain, inverted_residual
from tests.helpers import apply_pass, random_feeds
from tests.helpers import macs_timer as _macs_timer


def test_cache_is_written_and_a_second_plan_measures_nothing(_cache: Path) -> None:
    proto = conv_chain()
    first = PrunePass(latency=0.6, data_free=True, plan_only=True)
    _, result = apply_pass(first, proto)
    stats = result.stats["latency"]
    assert stats["measurements"] > 0 and stats["cached"] >= 0
    files = sorted(_cache.glob("*.json"))
    assert files and not list(_cache.glob(".*.tmp"))  # replaced atomically, no leftovers
    stored = json.loads(files[0].read_text())
    assert stored["machine"]["threads"] == 1 and stored["points"]
    _, again = apply_pass(PrunePass(latency=0.6, data_free=True, plan_only=True), proto)
    assert again.stats["latency"]["measurements"] == 0
    assert again.stats["latency"]["cached"] == stats["measurements"] + stats["cached"]
    assert sorted(_cache.glob("*.json")) == files
    # another thread count is another machine key: measured anew
    _, other = apply_pass(PrunePass(latency=0.6, threads=2, data_free=True, plan_only=True),
                          proto)
    assert other.stats["latency"]["measurements"] > 0


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "onnxopt" / "latency"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_concurrent_writers_merge_their_points(_cache: Path) -> None:
    proto = conv_chain()
    model = from_proto(proto)
    analysis = analyse_channels(model)
    groups = candidates(analysis, (), PassResult(modified=False))
    specs, skipped = node_specs(analysis, concrete_shapes(model, {"input": (1, 3, 16, 16)}),
                                groups)
    assert specs and not skipped
    spec = specs[0]
    a = LatencyMeter(1, lambda items: [1.0] * len(items), _cache)
    b = LatencyMeter(1, lambda items: [2.0] * len(items), _cache)
    full = tuple(spec.sizes)
    half = tuple(max(1, s // 2) for s in spec.sizes)
    assert a.times([(spec, [full])])[0] == {full: 1.0}
    assert b.times([(spec, [half])])[0] == {half: 2.0}  # b did not read a's point as its own
    c = LatencyMeter(1, lambda items: pytest.fail("measured a cached point"), _cache)
    assert c.times([(spec, [full, half])])[0] == {full: 1.0, half: 2.0}


def test_table_interpolates_is_monotone_and_holds_factors_at_full_width() -> None:
    grids = [np.array([0.25, 0.5, 1.0]), np.array([0.5, 1.0])]
    noisy = np.array([[1.0, 2.0], [3.0, 2.5], [2.0, 6.0]])  # noise: not increasing
    values = monotone(noisy)
    assert np.all(np.diff(values, axis=0) >= 0) and np.all(np.diff(values, axis=1) >= 0)
    assert values.tolist() == [[1.0, 2.0], [3.0, 3.0], [3.0, 6.0]]
    w = np.full(4, 0.25)
    term = TableTerm(2.0, [(0, w), (1, w)], grids, values)
    assert term.value([0.5, 1.0]) == pytest.approx(2 * 3.0)  # on the grid
    assert term.value([0.75, 1.0]) == pytest.approx(2 * 4.5)  # halfway between 3 and 6
    assert term.value([1.0, 0.75]) == pytest.approx(2 * 4.5)
    assert term.value([0.1, 0.1]) == pytest.approx(2 * 1.0)  # clamped below the grid
    fractions = np.linspace(0.2, 1.0, 17)
    curve = [term.value([f, f]) for f in fractions]
    assert np.all(np.diff(curve) >= 0)
    held = term.held([0])  # factor 1 at full width
    assert [g for g, _ in held.factors] == [0]
    assert held.value([0.5]) == pytest.approx(term.value([0.5, 1.0]))


def test_step_detection_finds_blocked_kernels() -> None:
    widths = list(range(24, 65))
    padded = [1.0 + 0.5 * -(-k // 8) for k in widths]  # each block of 8 costs the same
    assert detect_step(widths, padded) == 8
    dips = [1.0 + 0.02 * k + (0.0 if k % 16 == 0 else 0.4) for k in widths]
    assert detect_step(widths, dips) == 16
    smooth = [1.0 + 0.02 * k for k in widths]
    assert detect_step(widths, smooth) == 1
    rng = np.random.default_rng(0)
    assert detect_step(widths, [s * (1 + 0.002 * rng.standard_normal()) for s in smooth]) == 1


def _budget(proto: onnx.ModelProto, compare) -> tuple[LatencyBudget, list, dict]:
    model = from_proto(proto)
    analysis = analyse_channels(model)
    groups = candidates(analysis, (), PassResult(modified=False))
    budget = LatencyBudget(model, analysis, groups, {"input": (1, 3, 16, 16)}, batch=2,
                           threads=1, timer=_macs_timer, compare=compare)
    scores = {g.index: np.arange(g.size, dtype=float) + 1 for g in groups}
    return budget, groups, scores


def _first_plan(proto, compare, target: float = 0.5):
    """The budget calibrated on the uniform plan, and its first knapsack plan."""
    budget, _, scores = _budget(proto, compare)
    limits = Limits(None, 1)
    cost = budget.cost(limits, lambda c, t: allocate_uniform(scores, c, t, limits), target)
    return budget, scores, limits, cost, allocate_knapsack(scores, cost, target, limits)


def test_calibration_and_one_correction_round_with_a_fake_timer() -> None:
    measured = iter([0.7, 0.62, 0.49])  # uniform plan, first plan (a miss), corrected plan

    def compare(original, models, feed, threads):
        assert feed["input"].shape == (2, 3, 16, 16)  # batch=2
        assert len(models) == 1 and len(models[0].graph.node) == len(original.graph.node)
        return SideBySide(0.1, [next(measured)], [0.005], 1.0, 0.005)

    budget, scores, limits, cost, keep = _first_plan(inverted_residual(), compare)
    assert cost.total() == pytest.approx(1.0)  # the calibrated ratio is 1 at full width
    assert budget.outcome.uniform_measured == 0.7
    assert cost.total(keep) <= 0.5 + 1e-9
    replanned = []

    def replan(new):
        replanned.append(new)
        return allocate_knapsack(scores, new, 0.5 * new.total(), limits)

    final, final_cost = budget.check(keep, cost, 0.5, replan)
    out = budget.outcome
    assert replanned and out.corrected and out.first_measured == 0.62 and out.measured == 0.49
    # the corrected plan removes more: the first one was slower than predicted
    assert sum(int(k.sum()) for k in final.values()) < sum(int(k.sum()) for k in keep.values())
    assert out.predicted == pytest.approx(final_cost.total(final))
    assert out.measurements > 0


def test_a_plan_within_the_noise_is_not_corrected() -> None:
    measured = iter([0.55, 0.505])

    def compare(original, models, feed, threads):
        return SideBySide(0.1, [next(measured)], [0.01], 1.0, 0.01)

    budget, scores, limits, cost, keep = _first_plan(concat_branches(), compare)
    final, _ = budget.check(keep, cost, 0.5, lambda c: pytest.fail("re-planned"))
    assert final is keep and not budget.outcome.corrected and budget.outcome.measured == 0.505


def _convex_compare(proto: onnx.ModelProto, calls: list[float]):
    """A fake whole-model timer: the ratio is convex in the kept MACs (as concat copies and
    layouts make it), so a line through the uniform plan mispredicts the knapsack's plans."""
    full = model_cost(infer_shapes(from_proto(proto))).macs

    def compare(original, models, feed, threads):
        kept = model_cost(infer_shapes(from_proto(models[0]))).macs / full
        calls.append(0.05 + 0.95 * kept ** 2)
        return SideBySide(0.1, [calls[-1]], [0.002], 1.0, 0.002)

    return compare


def test_secant_rounds_bring_a_convex_latency_to_the_target() -> None:
    proto = inverted_residual()
    calls: list[float] = []
    budget, scores, limits, cost, keep = _first_plan(proto, _convex_compare(proto, calls))

    def replan(new):
        return allocate_knapsack(scores, new, 0.5, limits)

    final, final_cost = budget.check(keep, cost, 0.5, replan)
    out = budget.outcome
    first = calls[1]
    assert abs(first - 0.5) > 0.05  # the first plan misses: the calibration line is off
    assert 1 <= out.rounds <= ROUNDS and out.corrected and out.first_measured == first
    assert out.history == calls[1:] and len(calls) == 2 + out.rounds
    assert out.measured == pytest.approx(0.5, abs=CLOSE + out.noise)
    assert out.error < 0.1  # the prediction of the plan kept is within 10%
    assert out.predicted == pytest.approx(final_cost.total(final))


def test_correction_rounds_stop_at_the_cap_and_keep_the_closest_plan_that_meets() -> None:
    measured = iter([0.7, 0.3, 0.45, 0.62, 0.56])  # uniform, first, three corrections

    def compare(original, models, feed, threads):
        return SideBySide(0.1, [next(measured)], [0.002], 1.0, 0.002)

    budget, scores, limits, cost, keep = _first_plan(inverted_residual(), compare)
    plans = [keep]

    def replan(new):
        # a new plan every round (a real allocator could repeat one, which ends the rounds)
        plans.append({g: k.copy() for g, k in plans[-1].items()})
        g = next(g for g, k in plans[-1].items() if k.sum() > 1)
        plans[-1][g][np.flatnonzero(plans[-1][g])[len(plans) % 2]] = False
        return plans[-1]

    final, _ = budget.check(keep, cost, 0.5, replan)
    out = budget.outcome
    assert out.rounds == ROUNDS == 3 and out.history == [0.3, 0.45, 0.62, 0.56]
    # 0.62 and 0.56 exceed the target: of the plans that meet it, 0.45 is the closest
    assert out.measured == 0.45 and out.corrected and final is plans[1]


def test_a_correction_that_repeats_a_plan_ends_the_rounds() -> None:
    measured = iter([0.7, 0.3])

    def compare(original, models, feed, threads):
        return SideBySide(0.1, [next(measured)], [0.002], 1.0, 0.002)

    budget, scores, limits, cost, keep = _first_plan(inverted_residual(), compare)
    final, _ = budget.check(keep, cost, 0.5, lambda c: {g: k.copy() for g, k in keep.items()})
    out = budget.outcome
    assert final is keep and out.rounds == 0 and not out.corrected and out.measured == 0.3


def test_parabola_step_lands_on_a_convex_curve_where_a_line_overshoots() -> None:
    budget, _, _ = _budget(inverted_residual(), lambda *a: pytest.fail("timed"))
    budget.raw = latency_model(budget.analysis, budget.specs, Limits(None, 1), budget.meter)
    budget.full = full = budget.raw.total()

    def curve(x):
        return 0.05 + 0.95 * x ** 2

    # original, the uniform plan (off the knapsack's curve), then three knapsack plans
    budget.points = [(full, 1.0), (0.5 * full, 0.9),
                     *((x * full, curve(x)) for x in (0.2, 0.4, 0.8))]
    tangent = budget._curve(0.5, 0.002)
    assert tangent is not None
    crossing = np.sqrt(0.45 / 0.95)  # where the curve reaches 0.5
    # the tangent line reaches 0.5 near the true crossing (a parabola through three points
    # of a parabola is the curve itself)
    line = calibrated(budget.raw, 0.0, 1.0)  # the raw sum, to read intercept and slope off
    slope = (tangent.total() - tangent.constant) / (line.total() - line.constant)
    at = (0.5 - tangent.constant) / slope
    assert at / full == pytest.approx(crossing, rel=1e-6)
    # the secant through the first two knapsack plans (both below) overshoots far
    secant = (0.5 - curve(0.4)) / ((curve(0.4) - curve(0.2)) / 0.2) + 0.4
    assert secant - crossing > 0.2
    # outside the span of the three points (no crossing), no parabola step
    assert budget._curve(0.95, 0.002) is None
    budget.points = budget.points[:-1]  # two knapsack plans: no parabola
    assert budget._curve(0.5, 0.002) is None


def test_node_tables_cover_depthwise_and_concat() -> None:
    for proto in (inverted_residual(), concat_branches()):
        model = from_proto(proto)
        analysis = analyse_channels(model)
        groups = candidates(analysis, (), PassResult(modified=False))
        shapes = concrete_shapes(model, {"input": (1, 3, 16, 16)})
        specs, skipped = node_specs(analysis, shapes, groups)
        assert not skipped
        ops = {s.node.op_type for s in specs}
        assert "Conv" in ops
        meter = LatencyMeter(1, _macs_timer, None)
        cost = latency_model(analysis, specs, Limits(None, 1), meter)
        keep = {g.index: np.arange(g.size) < g.size // 2 for g in groups}
        assert 0 < cost.total(keep) < cost.total()
        # each one-node model at half width is a valid model onnxruntime runs
        for spec in specs:
            built, feeds = spec.build([max(1, s // 2) for s in spec.sizes])
            onnx.checker.check_model(built, full_check=True)
            run_model(built, feeds)
        if proto.graph.name == "inverted_residual":
            assert any(s.node.op_type == "Conv" and len(s.factors) == 1 and
                       s.node.attributes["group"].value > 1 for s in specs)  # depthwise
        else:
            assert "Concat" in ops


def test_latency_budget_prunes_a_model_onnxruntime_runs() -> None:
    proto = conv_chain()
    ctx = PassContext(calib=random_source(input_specs(from_proto(proto)), 32, seed=1))
    model, result = apply_pass(PrunePass(latency=0.7, round_to=1), proto, ctx)
    assert result.modified
    lat = result.stats["latency"]
    assert lat["batch"] == 1 and lat["threads"] == 1 and lat["original_ms"] > 0
    assert 0 < lat["predicted"] < 1 and lat["measured"] > 0 and lat["aa"] > 0
    assert "latency" in result.summary and "measured" in result.summary
    rows = result.stats["groups"]
    assert any(r["kept"] < r["total"] for r in rows)
    assert all("time_saved_ms" in r for r in rows) and "time saved" in result.plan
    pruned = to_proto(model)
    widths = {n.name: n for n in pruned.graph.node}
    for row in rows:  # structure: every producer keeps the planned width
        for label in row["producers"]:
            name = label.split("'")[1]
            weight = next(i for i in pruned.graph.initializer if i.name == widths[name].input[1])
            assert weight.dims[0] == row["kept"]
    assert model_cost(infer_shapes(model)).macs < model_cost(infer_shapes(from_proto(proto))).macs
    feeds = random_feeds(proto, batch=4, seed=5)
    (before,), (after,) = run_model(from_proto(proto), feeds), run_model(model, feeds)
    assert after.shape == before.shape and np.all(np.isfinite(after))
    # refitted on calibration data: the output stays near the original's
    assert np.linalg.norm(after - before) < 0.5 * np.linalg.norm(before)


def test_latency_option_refuses_nonsense() -> None:
    for spec in ("prune(latency=0)", "prune(latency=1.5)", "prune(latency=-0.5)",
                 "prune(latency=0.5,macs=0.5)", "prune(latency=0.5,ratio=0.3)",
                 "prune(batch=8)", "prune(macs=0.5,threads=2)", "prune(latency=0.5,batch=0)"):
        with pytest.raises(PipelineError):
            parse_pipeline(spec)
    (ok,) = parse_pipeline("prune(latency=0.5,batch=8,threads=2)")
    assert (ok.options.latency, ok.options.batch, ok.options.threads) == (0.5, 8, 2)
    fixed = with_input_dims(conv_chain(), (1, 3, 16, 16))  # batch fixed to 1
    with pytest.raises(UserError, match="fixed batch of 1"):
        apply_pass(PrunePass(latency=0.5, batch=4, data_free=True), fixed)


def test_deep_latency_budget_on_concat_keeps_every_concat_input() -> None:
    """A deep uniform operating point would empty a concat input: it keeps one channel."""
    proto = concat_branches()
    ctx = PassContext(calib=random_source(input_specs(from_proto(proto)), 16, seed=1))
    model, result = apply_pass(PrunePass(latency=0.3, round_to=1), proto, ctx)
    assert result.modified and result.stats["latency"]["measured"] > 0
    shapes = infer_shapes(model)
    for node in shapes.graph:
        if node.op_type == "Concat":
            assert all(v.shape is not None and v.shape[1] >= 1 for v in node.inputs)
    feeds = random_feeds(proto, batch=2, seed=5)
    (before,), (after,) = run_model(from_proto(proto), feeds), run_model(model, feeds)
    assert after.shape == before.shape and np.all(np.isfinite(after))
