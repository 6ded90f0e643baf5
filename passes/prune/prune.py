"""prune: structured channel pruning by importance under a budget, with least-squares compensation.

Removing group channel ``c`` deletes filter ``c`` of every producer of the group and every
tensor that carries it (BN parameters, residual operands, depthwise filters, concat slots,
flattened blocks), and the matching input columns of every consumer
(:mod:`~onnxopt.channels.surgery`). A consumer ``y = M x + b`` then misses
``sum_{c removed} M[:, c] x_c``; without retraining that loss is made small twice:

1. *which* channels: an importance criterion (:mod:`.importance`; ``auto`` is
   ``thinet`` with calibration data and ``l1`` without) scores every channel of a group once,
   over all its producers, and the budget (:mod:`.budget`) shares a MACs or
   params target across groups as a knapsack (or uniformly), or removes ``ratio`` of each;
   with calibration data the knapsack values each group's channels by the measured change
   of the graph output when that group is thinned (:func:`.sensitivity.measured_scores`),
   since per-layer scores do not compare across layers; the knapsack plan is then measured
   against the uniform plan it started from, and the uniform one is kept (and the refusal
   reported) when it changes the output less, so the default never does worse than uniform
   on calibration data; these measurements refit on 3 of every 4 calibration samples and
   measure on the 4th, because a refit measured on its own samples looks better than it is;
2. *compensation*: every consumer of a pruned group is refitted by ridge least squares on
   calibration data so that its pre-activation output matches the unpruned model's
   (:mod:`.reconstruct`).

Frozen groups (graph inputs and outputs, so the classifier output, dynamic sizes, ops the
analysis cannot rewrite) and excluded ones are never touched. ``plan_only`` (or a dry run)
reports the plan (channels kept per group, MACs saved) and leaves the model unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx_ir as ir

from onnxopt.blas import single_blas_thread
from onnxopt.channels import ChannelAnalysis, ChannelGroup, analyse_channels
from onnxopt.channels.surgery import remove_channels
from onnxopt.cost import model_cost
from onnxopt.errors import UserError
from onnxopt.ir import clone_model, unmatched
from onnxopt.options import option
from onnxopt.pass_base import Pass, PassContext, PassResult, register_pass
from onnxopt.passes.prune.budget import (
    ALLOCATORS,
    Limits,
    allocate_ratio,
    allocate_uniform,
    group_savings,
    keep_every_tensor,
)
from onnxopt.passes.prune.candidates import candidates, why_no_groups
from onnxopt.passes.prune.channel_cost import COST_MODELS, CostModel
from onnxopt.passes.prune.importance import CRITERIA, group_scores
from onnxopt.passes.prune.latency_slices import BLOCK, snapped_allocation
from onnxopt.passes.prune.plan_report import (
    Plan,
    calib_effect,
    format_plan,
    plan_rows,
    summary_line,
)
from onnxopt.passes.prune.reconstruct import reconstruct
from onnxopt.passes.prune.sensitivity import (
    measured_error,
    measured_scores,
    measurement,
    refit_targets,
)
from onnxopt.passes.prune.statistics import collect_statistics
from onnxopt.shapes import ShapeTable, concrete_shapes, resolve_input_shapes

if TYPE_CHECKING:
    from onnxopt.passes.prune.latency_batches import LatencyBudgets

logger = logging.getLogger(__name__)

DEFAULT_RATIO = 0.3
"""``-p prune`` with no budget removes this fraction of every prunable group."""

DEFAULT_ROUND_TO = 16
"""Kept-width granularity unless given (or, for a latency budget, measured)."""

CriterionName = Literal["auto", "l1", "l2", "bn", "apoz", "thinet", "random"]


@dataclass(frozen=True)
class PruneOptions:
    """Options of prune.

    Attributes:
        ratio: Fraction of channels each prunable group loses (default 0.3 when no budget).
        macs: Fraction of the model's MACs to keep (global, allocated by ``allocation``).
        params: Fraction of the model's parameters to keep.
        latency: Fraction of the model's latency to keep, measured with onnxruntime on this
            machine at ``batch`` samples and ``threads`` threads (:mod:`.latency_plan`).
        batch: Samples per run the latency budget is measured at (default 1); several
            (``batch=1;32``, or a tuple) keep at most ``latency`` at each of them
            (:mod:`.latency_batches`).
        threads: Intra-op threads the latency budget is measured with (default 1: timings
            of one thread do not depend on what else the machine runs).
        criterion: Channel importance; ``auto`` = ``thinet`` with calibration data, else ``l1``.
        allocation: ``knapsack`` (importance per cost) or ``uniform`` (same ratio everywhere)
            for a ``macs``/``params`` target.
        reconstruct: Refit consumers by least squares (None: when calibration data is given).
        min_channels: Least channels a group keeps (None: ``max(1, 10%)``).
        round_to: Kept widths are multiples of this (or the full width). onnxruntime's
            blocked (NCHWc) conv kernels work on 8 (AVX2) or 16 (AVX-512) channels at a
            time and pad other widths up to the block or fall back to slower kernels, so
            the MACs saved would not all be time saved. 16 suits both; 1 allows any width
            (finer budgets for narrow models). Unset with a ``latency`` budget, it is
            measured per op kind: where the measured latency curve steps.
        exclude: Node or tensor names (fnmatch patterns) whose channels are never removed;
            a pattern that matches no node or tensor of the model is an error.
        plan_only: Report the plan without rewriting (``--dry-run``).
        ridge: Relative ridge of the refit, toward the pruned weights.
        max_samples: Calibration samples used for scoring and refitting.
        positions: Output locations sampled per sample and Conv.
        batch_size: Calibration batch size when the batch axis is dynamic.
        refit_aware: With reconstruction, score what the refit leaves: ``thinet`` the output
            change that remains after it (else the raw change, as ThiNet does), ``l1``/``l2``
            (and ``bn`` without normalizations) the compensated consumer weights after each
            removal (iterative magnitude pruning; else the original weights).
        sensitivity: For a knapsack over a ``macs``/``params`` target, value a group's
            channels by the measured change of the graph output (``measured_scores``)
            instead of the criterion's per-layer scores (None: when calibration data is given).
        probes: Kept widths measured per group by ``sensitivity`` (interpolated between).
        data_free: Prune without calibration data: channels chosen by weight magnitude,
            nothing refitted. The result usually needs fine-tuning afterwards, so it is
            an explicit opt-in; without it, prune refuses to run without ``--calib``.
    """

    ratio: float | None = option(None, within="[0, 1)", effective=DEFAULT_RATIO)
    macs: float | None = option(None, within="(0, 1]")
    params: float | None = option(None, within="(0, 1]")
    latency: float | None = option(None, within="(0, 1]")
    batch: int | tuple[int, ...] | None = option(None, within="[1, inf)")
    threads: int | None = option(None, within="[1, inf)")
    criterion: CriterionName = "auto"
    allocation: Literal["knapsack", "uniform"] = "knapsack"
    reconstruct: bool | None = None
    min_channels: int | None = option(None, within="[1, inf)")
    round_to: int | None = option(None, within="[1, inf)", effective=DEFAULT_ROUND_TO)
    exclude: tuple[str, ...] = ()
    plan_only: bool = False
    ridge: float = option(1e-2, within="[0, inf)")
    max_samples: int = option(512, within="[1, inf)")
    positions: int = option(16, within="[1, inf)")
    batch_size: int = option(32, within="[1, inf)")
    refit_aware: bool = True
    sensitivity: bool | None = None
    probes: int = option(3, within="[1, inf)")
    data_free: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("ratio", "macs", "params", "latency")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        if isinstance(self.batch, (tuple, list)) and not self.batch:
            raise ValueError("batch= names no batch size")
        for key in ("batch", "threads"):
            if getattr(self, key) is not None and self.latency is None:
                raise ValueError(f"{key}= sets how a latency budget is measured; give "
                                 f"latency= with it")
        # Ranges and choices are declared on the fields (onnxopt.options).
        if self.criterion != "auto" and self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}")

    def batches(self) -> tuple[int, ...]:
        """The batch sizes a latency budget is measured at, in order, each once."""
        if self.batch is None:
            return (1,)
        given = (self.batch,) if isinstance(self.batch, int) else tuple(self.batch)
        return tuple(dict.fromkeys(given))

    def budget(self) -> tuple[str, float]:
        """``("ratio" | "macs" | "params" | "latency", value)``."""
        for key in ("macs", "params", "latency", "ratio"):
            if getattr(self, key) is not None:
                return key, float(getattr(self, key))
        return "ratio", DEFAULT_RATIO


@register_pass
class PrunePass(Pass):
    """Structured channel pruning by importance under a budget, with least-squares refit."""

    name = "prune"
    description = ("remove the least important channels under a ratio/MACs/params/latency "
                   "budget, refitting the next layers on calibration data")
    Options = PruneOptions
    exact = False
    needs_data = True
    supports_dry_run = True

    def requires_data(self) -> bool:
        return not self.options.data_free

    def missing_data_message(self) -> str:
        return (f"pass {self!r} needs calibration data to choose channels and refit the next "
                f"layers; give --calib DATA, or opt in to magnitude pruning without data "
                f"with prune(data_free=true) and fine-tune the result afterwards")

    @single_blas_thread  # thousands of small solves between onnxruntime runs
    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        opts: PruneOptions = self.options
        result = PassResult(modified=False)
        input_shapes = resolve_input_shapes(model, ctx.input_shapes, (ctx.calib,))
        shapes = concrete_shapes(model, input_shapes)
        plan = self._plan(model, ctx, result, shapes)
        before = model_cost(model, shapes=shapes)
        summary = summary_line(plan, opts, before, why_no_groups(result))
        result.stats.update({"criterion": plan.criterion, "allocation": plan.allocation,
                             "budget": f"{plan.kind}={plan.value:g}", "reconstruct": plan.refit,
                             "groups": plan.rows})
        if before.macs_unknown:
            result.stats["macs_unknown"] = before.macs_unknown
        result.plan = format_plan(plan.rows)
        pruned = [g for g in plan.groups if not plan.keep[g.index].all()]
        plan_only = opts.plan_only or ctx.dry_run
        if plan_only or not pruned:
            result.summary = ("plan only: " if plan_only else "") + summary
            return result
        original = clone_model(model) if plan.refit else None
        targets = refit_targets(plan.groups, plan.keep) if plan.refit else []
        for group in pruned:
            remove_channels(model, group, np.flatnonzero(~plan.keep[group.index]).tolist())
        result.modified = True
        if original is not None:
            unrefit = clone_model(model)
            refits = reconstruct(
                original, model, targets, ctx.calib, ridge=opts.ridge, positions=opts.positions,
                batch_size=opts.batch_size, limit=opts.max_samples,
                input_shapes=ctx.input_shapes, seed=ctx.seed, show_progress=ctx.progress)
            result.stats["refits"] = [vars(r) for r in refits]
            for r in refits:
                if r.reason and r.reason != "no improvement":
                    result.refuse(r.node, f"not refitted: {r.reason}")
            summary += calib_effect(original, unrefit, model, ctx, opts, result.stats)
        after = model_cost(model, input_shapes)
        result.stats.update(macs_before=before.macs, macs_after=after.macs,
                            params_before=before.params, params_after=after.params)
        result.summary = summary
        logger.info("prune: %s", summary)
        return result

    def _plan(self, model: ir.Model, ctx: PassContext, result: PassResult,
              shapes: ShapeTable) -> Plan:
        """Score the channels of every candidate group and allocate the budget.

        Raises:
            UserError: A MACs budget on a model whose MACs are unknown (a dim no input
                shape fixes), or options the data given cannot serve.
        """
        opts: PruneOptions = self.options
        has_data = ctx.calib is not None
        criterion = opts.criterion if opts.criterion != "auto" else (
            "thinet" if has_data else "l1")
        rule = CRITERIA[criterion]
        refit = has_data if opts.reconstruct is None else opts.reconstruct
        if (rule.needs or refit) and not has_data:
            what = f"criterion={criterion}" if rule.needs else "reconstruct=true"
            raise UserError(f"prune({what}) needs calibration data; give --calib DATA")
        missing = unmatched(model.graph, opts.exclude, patterns=True, values=True)
        if missing:
            raise UserError(f"prune(exclude=...): {', '.join(map(repr, missing))} matches no "
                            "node or tensor name of the model")
        analysis = analyse_channels(model)
        costs = {k: build(analysis, shapes) for k, build in COST_MODELS.items()}
        kind, value = opts.budget()
        if kind == "macs" and costs["macs"].unknown:
            raise UserError(f"prune(macs={value:g}) needs the model's MACs, and they are "
                            f"unknown: {costs['macs'].unknown}")
        groups = candidates(analysis, opts.exclude, result)
        aware = refit and opts.refit_aware
        stats = None
        needs = rule.needs | (rule.refit_needs if aware else frozenset())
        if needs and groups:
            stats = collect_statistics(
                model, groups, ctx.calib, needs,
                batch_size=opts.batch_size, limit=opts.max_samples, positions=opts.positions,
                input_shapes=ctx.input_shapes, seed=ctx.seed, show_progress=ctx.progress)
        scores = group_scores(groups, criterion, stats, ctx.seed, opts.ridge if aware else None)
        limits = Limits(opts.min_channels, opts.round_to or DEFAULT_ROUND_TO)
        allocation = "ratio" if kind == "ratio" else opts.allocation
        uniform = measuring = timing = None
        least = BLOCK if opts.round_to is None else 1  # a measured step is at least a block

        def allocate(name: str, ranks: dict[int, np.ndarray], cost: CostModel, target: float,
                     relative: bool) -> dict[int, np.ndarray]:
            """The allocator's plan; under a latency budget, concat slices on the step."""
            def plan(at: float) -> dict[int, np.ndarray]:
                return ALLOCATORS[name](ranks, cost, at, limits, relative)

            if timing is None:
                return plan(target)
            return snapped_allocation(plan, groups, ranks, cost, target, limits, least)

        if kind == "latency" and groups:
            timing, limits = self._latency(model, ctx, analysis, groups, scores, limits)
            costs["latency"] = timing.calibrated_cost
        elif kind == "latency":
            costs["latency"] = CostModel(1.0)  # nothing to thin: nothing to measure
        if kind == "ratio":
            keep = allocate_ratio(scores, value, limits)
        else:
            cost = costs[kind].restrict([g.index for g in groups])
            calibrated = rule.calibrated
            if opts.allocation == "knapsack" and (
                    has_data if opts.sensitivity is None else opts.sensitivity):
                if not has_data:
                    raise UserError("prune(sensitivity=true) needs calibration data")
                context = allocate("uniform", scores, cost, value * costs[kind].total(), False)
                uniform = {g.index: keep_every_tensor(g, context[g.index], scores[g.index])
                           for g in groups}
                measuring = measurement(model, ctx, opts, refit)
                # the operating point keeps a channel of every tensor (a concat input the
                # uniform ratio would empty cannot be built)
                scores, uniform_error = measured_scores(model, ctx, opts, groups, scores,
                                                        uniform, limits, refit, measuring)
                calibrated = True
            keep = allocate(opts.allocation, scores, cost, value * costs[kind].total(),
                            not calibrated)
        keep = {g.index: keep_every_tensor(g, keep[g.index], scores[g.index]) for g in groups}
        if uniform is not None:
            knapsack_error = measured_error(model, ctx, opts, keep, refit, measuring)
            result.stats["allocation_check"] = {"knapsack_error": knapsack_error,
                                                "uniform_error": uniform_error}
            if uniform_error < knapsack_error:
                keep, allocation = uniform, "uniform"
                result.refuse("allocation", (
                    f"knapsack plan changes the output more than the uniform one on "
                    f"calibration data (relative error {knapsack_error:.3g} vs "
                    f"{uniform_error:.3g}): uniform kept"))
        if timing is not None:
            def replan(new: CostModel) -> dict[int, np.ndarray]:
                again = allocate(allocation, scores, new.restrict([g.index for g in groups]),
                                 value, not calibrated)  # ratio units
                return {g.index: keep_every_tensor(g, again[g.index], scores[g.index])
                        for g in groups}

            keep, costs["latency"] = timing.budget.check(keep, costs["latency"], value, replan)
            cost = costs["latency"].restrict([g.index for g in groups])
            result.stats["latency"] = timing.budget.outcome.to_dict()
            if len(timing.budget.outcomes) > 1:
                result.stats["latency"]["per_batch"] = [
                    o.to_dict() for o in timing.budget.outcomes]
        if kind != "ratio":
            reached = (max(o.predicted for o in timing.budget.outcomes) if timing is not None
                       else cost.total(keep) / max(costs[kind].total(), 1.0))
            if reached > value + 1e-9:
                result.refuse("budget", f"{kind} kept {reached:.1%} > target {value:.1%}: "
                              f"the limits allow no more")
        savings = {k: group_savings(c.restrict(list(keep)), keep) for k, c in costs.items()}
        if costs["macs"].unknown:
            del savings["macs"]  # unknown, not zero
        outcomes = timing.budget.outcomes if timing is not None else None
        if outcomes:  # the measured saving at the first batch, shared as the tables say
            outcome = outcomes[0]
            shares = savings["latency"]
            total = sum(shares.values())
            saved_ms = max(1.0 - outcome.measured, 0.0) * outcome.original_ms
            savings["latency"] = {g: v / total * saved_ms if total > 0 else 0.0
                                  for g, v in shares.items()}
        return Plan(criterion, refit, kind, value, allocation, groups, keep,
                     plan_rows(groups, keep, savings), savings, outcomes)

    def _latency(self, model: ir.Model, ctx: PassContext, analysis: ChannelAnalysis,
                 groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                 limits: Limits) -> tuple[_Timing, Limits]:
        """The measured, calibrated latency cost; with ``round_to`` unset, measured limits."""
        from onnxopt.passes.prune.latency_batches import LatencyBudgets

        opts: PruneOptions = self.options
        per_sample = resolve_input_shapes(model, ctx.input_shapes, (ctx.calib,))
        budget = LatencyBudgets(model, analysis, groups, per_sample, batches=opts.batches(),
                                threads=opts.threads or 1, seed=ctx.seed)
        if opts.round_to is None:
            limits = budget.limits(limits)

        def uniform(cost: CostModel, target: float) -> dict[int, np.ndarray]:
            return snapped_allocation(lambda t: allocate_uniform(scores, cost, t, limits),
                                      groups, scores, cost, target, limits,
                                      BLOCK if opts.round_to is None else 1)

        cost = budget.cost(limits, uniform, float(opts.latency or 1.0))
        return _Timing(budget, cost), limits


@dataclass
class _Timing:
    """The latency planner of a ``latency`` budget and its calibrated cost."""

    budget: LatencyBudgets
    calibrated_cost: CostModel
