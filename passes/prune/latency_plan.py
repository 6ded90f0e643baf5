"""A latency budget for prune: measured cost model, whole-model calibration, secant corrections.

Flow (``prune(latency=X)``): the one-node tables of :mod:`.latency` give ``S(keep)``, the
sum of node times. The plan of the uniform allocator at ``S <= X S(full)`` is built (channels
removed from a copy, no refit: latency does not depend on weight values) and timed side by
side with the original; the ratio ``R(keep) = a + b S(keep)`` through ``(S(full), 1)`` and
that point is the calibrated cost the allocators use, so ``R <= X`` is the budget. The chosen
plan is then built and timed the same way; while it misses ``X`` by more than the A/A noise,
the line is re-fitted through the measured plans closest above and below ``X`` (a secant
step; through ``(S(full), 1)`` and the fastest plan when none is below), and the plan is
made again and timed (up to :data:`ROUNDS` correction rounds). What was predicted and
measured is kept in :class:`LatencyOutcome` for the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.channels import ChannelAnalysis, ChannelGroup, analyse_channels
from onnxopt.channels.surgery import remove_channels
from onnxopt.errors import UserError
from onnxopt.ir import clone_model
from onnxopt.passes.prune.budget import Keep, Limits, keep_every_tensor
from onnxopt.passes.prune.channel_cost import CostModel
from onnxopt.passes.prune.latency import calibrated, latency_model, node_specs
from onnxopt.passes.prune.latency_cache import LatencyMeter, Timer
from onnxopt.passes.prune.latency_steps import measured_steps
from onnxopt.passes.prune.latency_timing import ort_timer
from onnxopt.shapes import ShapeTable, concrete_shapes, static_dims
from onnxopt.timing import SideBySide, side_by_side

logger = logging.getLogger(__name__)

__all__ = ["LatencyBudget", "LatencyOutcome", "batched_shapes", "same_plan",
           "shapes_at_batch"]

NOISY = 0.05
"""A/A noise above which a whole-model timing is repeated (up to :data:`RETRIES` times)."""

RETRIES = 2

ROUNDS = 3
"""Correction rounds at most (each re-plans and times one more plan)."""

CLOSE = 0.01
"""A measured ratio this close to the target (besides the noise) needs no correction."""

Compare = Callable[[onnx.ModelProto, list[onnx.ModelProto], dict[str, np.ndarray], int],
                   SideBySide]
"""(original, models, feed, threads) -> their times side by side."""


def batched_shapes(model: ir.Model, per_sample: Mapping[str, tuple[int, ...]],
                   batch: int) -> dict[str, tuple[int, ...]]:
    """Input dims at ``batch`` samples (the leading axis), from the per-sample dims.

    Raises:
        UserError: An input's leading axis is fixed to another size, or a dim is unknown.
    """
    shapes = {}
    for value in model.graph.inputs:
        if value.const_value is not None or value.name in model.graph.initializers:
            continue
        dims = per_sample.get(value.name or "")
        own = static_dims(value)
        if dims is None:
            raise UserError(f"prune(latency=...) needs the dims of input '{value.name}'; give "
                            f"--input-shape {value.name}:... or calibration data")
        if own and own[0] is not None and own[0] != batch:
            raise UserError(f"prune(batch={batch}): input '{value.name}' has a fixed batch "
                            f"of {own[0]}")
        shapes[value.name or ""] = (batch, *dims[1:]) if dims else dims
    return shapes


def shapes_at_batch(model: ir.Model, inputs: Mapping[str, tuple[int, ...]]) -> ShapeTable:
    """Every value's dims with the inputs at ``inputs``, their batch axis included.

    :func:`~onnxopt.shapes.concrete_shapes` costs per sample (a dynamic batch axis at 1), so
    the inputs of a copy are declared at the batched dims first.
    """
    copy = clone_model(model)
    for value in copy.graph.inputs:
        if value.name in inputs:
            value.shape = ir.Shape(inputs[value.name or ""])
    return concrete_shapes(copy, inputs)


@dataclass
class LatencyOutcome:
    """What the latency planner predicted and measured (the report's numbers).

    Attributes:
        batch: Samples per run timed.
        threads: Intra-op threads timed.
        original_ms: Median time of one run of the original model.
        predicted: Predicted latency ratio of the plan kept.
        measured: Its measured ratio (median of paired ratios against the original).
        aa: The A/A ratio of the same timing (the noise row).
        noise: How far a ratio may move by noise alone.
        uniform_measured: The measured ratio of the calibration (uniform) plan.
        corrected: Whether the plan kept comes from a correction round.
        first_measured: The measured ratio of the first plan when a correction round ran.
        rounds: Correction rounds run.
        history: Measured ratio of every plan timed, in order (the first plan first).
        predictions: Predicted ratio of each of those plans, by the cost it was made with.
        measurements: One-node timings measured (not found in the cache).
        cached: One-node timings found in the cache.
        steps: Group index -> measured channel granularity (when round_to was measured).
        unmeasured: Nodes left out of the tables, with why.
        table_seconds: Time spent on the one-node tables (measuring or reading the cache).
        timing_seconds: Time spent timing whole models side by side.
    """

    batch: int
    threads: int
    original_ms: float = 0.0
    predicted: float = 1.0
    measured: float = 1.0
    aa: float = 1.0
    noise: float = 0.0
    uniform_measured: float | None = None
    corrected: bool = False
    first_measured: float | None = None
    rounds: int = 0
    history: list[float] = field(default_factory=list)
    predictions: list[float] = field(default_factory=list)
    measurements: int = 0
    cached: int = 0
    steps: dict[int, int] = field(default_factory=dict)
    unmeasured: list[str] = field(default_factory=list)
    table_seconds: float = 0.0
    timing_seconds: float = 0.0

    @property
    def error(self) -> float:
        """Relative error of the prediction against the measured ratio."""
        return abs(self.predicted - self.measured) / max(self.measured, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prediction_error": self.error}


class LatencyBudget:
    """Latency cost of one model's candidate groups, measured, calibrated and checked.

    Args:
        model: The model to prune (not changed).
        analysis: Its channel groups.
        groups: The candidate groups.
        per_sample: Per-sample input dims (:func:`~onnxopt.shapes.resolve_input_shapes`).
        batch: Samples per run to time.
        threads: Intra-op threads to time with.
        timer: One-node timer (default: onnxruntime, :func:`.latency_timing.ort_timer`).
        compare: Whole-model timer (default :func:`onnxopt.timing.side_by_side`).
        cache: Cache folder (default :func:`.latency_cache.cache_dir`).
    """

    def __init__(self, model: ir.Model, analysis: ChannelAnalysis, groups: list[ChannelGroup],
                 per_sample: Mapping[str, tuple[int, ...]], *, batch: int, threads: int,
                 timer: Timer | None = None, compare: Compare | None = None,
                 cache: Path | None = None, seed: int = 0) -> None:
        self.model = model
        self.groups = groups
        self.inputs = batched_shapes(model, per_sample, batch)
        shapes = shapes_at_batch(model, self.inputs)
        self.specs, skipped = node_specs(analysis, shapes, groups)
        self.analysis = analysis
        self.meter = LatencyMeter(threads, timer or ort_timer(threads), cache)
        self.compare = compare or side_by_side
        self.outcome = LatencyOutcome(batch, threads, unmeasured=skipped)
        self.proto = ir.serde.serialize_model(model)
        self.feed = _random_feed(model, self.inputs, seed)
        self.raw: CostModel | None = None
        self.full = 0.0
        self.points: list[tuple[float, float]] = []  # (node sum, measured ratio)
        self.uniform_keep: Keep = {}  # the calibration plan

    def limits(self, limits: Limits) -> Limits:
        """``limits`` with each group's granularity measured
        (:func:`.latency_steps.measured_steps`)."""
        start = time.perf_counter()
        steps = measured_steps(self.specs, self.meter)
        self.outcome.steps = steps
        self.outcome.table_seconds += time.perf_counter() - start
        return Limits(limits.min_channels, limits.round_to, tuple(sorted(steps.items())))

    def cost(self, limits: Limits, uniform: Callable[[CostModel, float], Keep],
             target: float) -> CostModel:
        """The calibrated latency ratio as a cost model (1 at full width; the costs of the
        correction round need not be, their unit is still the original's latency).

        Args:
            limits: Widths the tables are measured at.
            uniform: ``(cost, target cost) -> keep``: the uniform plan at a target.
            target: The latency ratio to reach.
        """
        start = time.perf_counter()
        self.raw = latency_model(self.analysis, self.specs, limits, self.meter)
        self.outcome.table_seconds += time.perf_counter() - start
        self.full = self.raw.total()
        keep = uniform(self.raw, target * self.full)
        self.uniform_keep = keep
        timed = self.time(keep)
        self.outcome.original_ms = timed.baseline_ms
        self.outcome.uniform_measured = timed.ratios[0]
        self.points = [(self.full, 1.0), (self.raw.total(keep), timed.ratios[0])]
        return self._fit(self.points[0], self.points[1])

    def _fit(self, high: tuple[float, float], low: tuple[float, float]) -> CostModel:
        """``R = a + b S`` through two measured ``(S, ratio)`` points (``high`` the slower).

        Without a measured speed-up between them, the ratio is proportional to the node sum.
        """
        assert self.raw is not None
        gap = high[0] - low[0]
        slope = (high[1] - low[1]) / gap if gap > 1e-12 * self.full else 0.0
        if slope <= 0:
            return calibrated(self.raw, 0.0, 1.0 / max(self.full, 1e-12))
        return calibrated(self.raw, high[1] - slope * high[0], slope)

    def bracket(self, target: float, noise: float = 0.0) -> CostModel:
        """A line through (or tangent to) the measured plans nearest ``target``.

        Whole-graph effects (layouts onnxruntime picks for a set of widths, concat copies)
        make the ratio bend away from a line through the original, and plans of the
        knapsack lie on another curve than the uniform one. In order of preference:
        with three knapsack plans measured, the tangent of a parabola through them where
        it crosses the target (:meth:`_curve`: the ratio is convex in the node sum where
        concat copies and layouts bend it, and a line between far points overshoots);
        with two or more, the line through the two nearest the target (one on either side
        when there are, else the two nearest: an extrapolating secant step) when their
        ratios differ by more than twice the noise; else the line between the measured
        points (any plan) closest above and below the target, or, with none below, through
        the original and the fastest plan measured.
        """
        plans = self.points[2:]  # after the original and the uniform plan
        if len(plans) >= 3:
            curve = self._curve(target, noise)
            if curve is not None:
                return curve
        above = sorted((p for p in plans if p[1] > target), key=lambda p: p[1])
        below = sorted((p for p in plans if p[1] <= target), key=lambda p: -p[1])
        pair = ([above[0], below[0]] if above and below
                else sorted(plans, key=lambda p: abs(p[1] - target))[:2])
        if len(pair) == 2 and abs(pair[0][1] - pair[1][1]) > 2 * noise:
            high, low = sorted(pair, key=lambda p: -p[1])
            if high[0] - low[0] > 1e-12 * self.full:  # rising: a usable secant
                return self._fit(high, low)
        above = [p for p in self.points if p[1] > target]
        below = [p for p in self.points if p[1] <= target]
        if below:
            return self._fit(min(above, key=lambda p: p[1]), max(below, key=lambda p: p[1]))
        return self._fit(self.points[0], min(self.points, key=lambda p: p[1]))

    def _curve(self, target: float, noise: float) -> CostModel | None:
        """The tangent, where it reaches ``target``, of the parabola through the three
        measured knapsack plans nearest the target; None unless the
        target lies between their ratios, they differ by more than twice the noise and the
        parabola crosses the target upwards once within the span of their node sums."""
        near = sorted(self.points[2:], key=lambda p: abs(p[1] - target))[:3]
        x = np.array([p[0] for p in near]) / self.full
        y = np.array([p[1] for p in near])
        if (len(near) < 3 or not y.min() <= target <= y.max() or np.ptp(y) <= 2 * noise
                or np.ptp(x) <= 1e-9 or len(np.unique(np.round(x, 9))) < 3):
            return None
        c2, c1, c0 = np.polyfit(x, y, 2)
        roots = np.roots([c2, c1, c0 - target])
        inside = [float(r.real) for r in roots  # crossings upwards within the span
                  if abs(r.imag) < 1e-12 and x.min() - 1e-9 <= r.real <= x.max() + 1e-9
                  and 2 * c2 * r.real + c1 > 0]
        if len(inside) != 1:
            return None
        at = inside[0]
        slope = (2 * c2 * at + c1) / self.full
        return calibrated(self.raw, target - slope * at * self.full, slope)

    def check(self, keep: Keep, cost: CostModel, target: float,
              replan: Callable[[CostModel], Keep]) -> tuple[Keep, CostModel]:
        """Time the plan; while it misses ``target`` by more than the noise, re-plan.

        A miss either way counts: a plan faster than asked removed channels it did not
        need to. Each correction round re-fits the cost on the measured plans nearest the
        target (:meth:`bracket`), re-plans and times the new plan, up to :data:`ROUNDS`
        rounds; a round whose plan was measured already ends them. The plan kept is the
        measured one that meets the target (within the noise and :data:`CLOSE`) closest to
        it, or the fastest one when none does.

        Returns:
            The plan kept and the cost model it was made with.
        """
        assert self.raw is not None
        timed = self.time(keep)
        tried = [(keep, cost, timed)]
        self.outcome.measurements = self.meter.measured
        self.outcome.cached = self.meter.cached
        for _ in range(ROUNDS):
            if _close(timed, target):
                break
            self.points.append((self.raw.total(keep), timed.ratios[0]))
            cost = self.bracket(target, timed.noise)
            keep = replan(cost)
            if any(same_plan(keep, k) for k, _, _ in tried):
                break  # the line moved too little to change the plan
            timed = self.time(keep)
            tried.append((keep, cost, timed))
        logger.debug("latency plans (node sum, measured ratio): %s; last %s", self.points,
                     [t.ratios[0] for _, _, t in tried])
        keep, cost, timed = _best(tried, target)
        self.outcome.rounds = len(tried) - 1
        self.outcome.history = [t.ratios[0] for _, _, t in tried]
        self.outcome.predictions = [float(c.total(k)) for k, c, _ in tried]
        self.outcome.corrected = timed is not tried[0][2]
        self.outcome.first_measured = tried[0][2].ratios[0] if len(tried) > 1 else None
        self.outcome.predicted = float(cost.total(keep))
        self.outcome.measured = timed.ratios[0]
        self.outcome.aa = timed.aa
        self.outcome.noise = timed.noise
        return keep, cost

    def time(self, keep: Keep) -> SideBySide:
        """The model with ``keep``'s channels removed, timed side by side with the original.

        A timing whose A/A noise exceeds :data:`NOISY` is repeated, and the quietest kept.
        """
        start = time.perf_counter()
        proto = thinned(self.model, keep)
        timed = self.compare(self.proto, [proto], self.feed, self.outcome.threads)
        for _ in range(RETRIES):  # a burst of load on a shared machine: time again
            if timed.noise <= NOISY:
                break
            again = self.compare(self.proto, [proto], self.feed, self.outcome.threads)
            timed = min(timed, again, key=lambda t: t.noise)
        self.outcome.timing_seconds += time.perf_counter() - start
        return timed


def _close(timed: SideBySide, target: float) -> bool:
    return abs(timed.ratios[0] - target) <= timed.noise + CLOSE


def same_plan(a: Keep, b: Keep) -> bool:
    """Whether two plans keep the same channels."""
    return a.keys() == b.keys() and all(np.array_equal(a[g], b[g]) for g in a)


def _best(tried: list[tuple[Keep, CostModel, SideBySide]], target: float
          ) -> tuple[Keep, CostModel, SideBySide]:
    """The measured plan meeting ``target`` (within the noise and :data:`CLOSE`) closest to
    it; the fastest when none meets it."""
    meets = [t for t in tried if t[2].ratios[0] <= target + t[2].noise + CLOSE]
    if meets:
        return max(meets, key=lambda t: t[2].ratios[0])
    return min(tried, key=lambda t: t[2].ratios[0])


def thinned(model: ir.Model, keep: Keep) -> onnx.ModelProto:
    """A copy of ``model`` without the channels ``keep`` drops (weights not refitted).

    Only the kept counts matter for latency: a mask that would empty a tensor of its group
    (a concat input) is changed to keep one of its channels instead of another.
    """
    copy = clone_model(model)
    for group in analyse_channels(copy, infer=False).groups:
        mask = keep.get(group.index)
        if mask is not None and not mask.all():
            if group.size != len(mask):  # the analysis is deterministic
                raise RuntimeError("channel groups of a copy differ from the model's")
            # same count, but no concat input or split output left empty
            mask = keep_every_tensor(group, mask, np.zeros(group.size))
            remove_channels(copy, group, np.flatnonzero(~mask).tolist())
    return ir.serde.serialize_model(copy)


def _random_feed(model: ir.Model, inputs: Mapping[str, tuple[int, ...]],
                 seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.inputs:
        if value.name not in inputs:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        dims = inputs[value.name or ""]
        feed[value.name or ""] = (rng.standard_normal(dims).astype(dtype)
                                  if np.issubdtype(dtype, np.floating) else np.zeros(dims, dtype))
    return feed
