"""A latency budget at several batch sizes: one measured budget per batch, one plan for all.

``prune(latency=X, batch=1;32)`` keeps at most ``X`` of the latency at every batch named.
Each batch has its own :class:`~.latency_plan.LatencyBudget` (one-node tables at its shapes,
cached under their own signatures, its own calibration and whole-model timings). The
allocators need one cost that is a sum of per-node terms, so the plan is made against the
*mean* of the calibrated per-batch ratios, plus the predicted excess of the slowest batch
over that mean: a max of the ratios is no such sum (removing channels that only speed up
another batch would save nothing, so the knapsack's marginal costs would be zero for them),
and the ratios of one plan at different batches move together (0.69x at batch 1, 0.65x at
batch 32 for the same plan in issue #22), so the mean plus the excess is close to the max
where the plan lands. Each plan is timed at every batch; the correction rounds re-fit every
batch's line (:meth:`~.latency_plan.LatencyBudget.bracket`) and the excess at the last plan,
until the slowest batch is within the noise of ``X``. With one batch this is exactly the
one-batch budget.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.channels import ChannelAnalysis, ChannelGroup
from onnxopt.passes.prune.budget import Keep, Limits
from onnxopt.passes.prune.channel_cost import CostModel
from onnxopt.passes.prune.latency_plan import (
    CLOSE,
    ROUNDS,
    LatencyBudget,
    LatencyOutcome,
    same_plan,
)
from onnxopt.timing import SideBySide

logger = logging.getLogger(__name__)

__all__ = ["LatencyBudgets", "mean_cost"]


def mean_cost(costs: Sequence[CostModel], excess: float = 0.0) -> CostModel:
    """The mean of ``costs`` (their terms scaled by ``1/n``), plus ``excess``."""
    if len(costs) == 1 and excess == 0.0:
        return costs[0]
    n = len(costs)
    out = CostModel(sum(c.constant for c in costs) / n + excess,
                    unknown="; ".join(dict.fromkeys(c.unknown for c in costs if c.unknown)))
    out.terms = [dataclasses.replace(term, base=term.base / n)
                 for cost in costs for term in cost.terms]
    return out


def _excess(costs: Sequence[CostModel], keep: Keep) -> float:
    """How far the slowest batch's predicted ratio lies above the mean, at ``keep``."""
    predicted = [c.total(keep) for c in costs]
    return float(max(predicted) - np.mean(predicted))


def _worst(timed: Sequence[SideBySide]) -> SideBySide:
    return max(timed, key=lambda t: t.ratios[0])


class LatencyBudgets:
    """Latency budgets at each of ``batches``, planned together (see the module docstring).

    Args:
        model: The model to prune (not changed).
        analysis: Its channel groups.
        groups: The candidate groups.
        per_sample: Per-sample input dims.
        batches: Samples per run to time, in the order named.
        threads: Intra-op threads to time with.
        make: ``(batch) -> LatencyBudget`` (default: the onnxruntime budget; tests inject
            fake timers here).
    """

    def __init__(self, model: ir.Model, analysis: ChannelAnalysis, groups: list[ChannelGroup],
                 per_sample: Mapping[str, tuple[int, ...]], *, batches: Sequence[int],
                 threads: int, seed: int = 0,
                 make: Callable[[int], LatencyBudget] | None = None) -> None:
        def default(batch: int) -> LatencyBudget:
            return LatencyBudget(model, analysis, groups, per_sample, batch=batch,
                                 threads=threads, seed=seed)

        self.budgets = [(make or default)(b) for b in dict.fromkeys(batches)]
        self.costs: list[CostModel] = []

    @property
    def outcomes(self) -> list[LatencyOutcome]:
        """What each batch's budget predicted and measured, in the order named."""
        return [b.outcome for b in self.budgets]

    @property
    def outcome(self) -> LatencyOutcome:
        """The outcome of the batch whose measured ratio is the highest (the binding one)."""
        return max(self.outcomes, key=lambda o: o.measured)

    def limits(self, limits: Limits) -> Limits:
        """``limits`` with the granularity measured at the first batch named."""
        return self.budgets[0].limits(limits)

    def cost(self, limits: Limits, uniform: Callable[[CostModel, float], Keep],
             target: float) -> CostModel:
        """Every batch calibrated on its uniform plan; their mean plus the excess of the
        slowest at the first batch's uniform plan."""
        self.costs = [b.cost(limits, uniform, target) for b in self.budgets]
        if len(self.budgets) == 1:
            return self.costs[0]
        return mean_cost(self.costs, _excess(self.costs, self.budgets[0].uniform_keep))

    def check(self, keep: Keep, cost: CostModel, target: float,
              replan: Callable[[CostModel], Keep]) -> tuple[Keep, CostModel]:
        """Time the plan at every batch; while the slowest misses ``target``, re-plan.

        As :meth:`.latency_plan.LatencyBudget.check`, on the slowest batch's ratio: each
        round re-fits every batch's cost on its measured plans nearest the target and
        re-plans on their mean plus the excess at the last plan. The plan kept is the one
        whose slowest batch meets the target closest to it (the fastest when none does).
        """
        if len(self.budgets) == 1:
            return self.budgets[0].check(keep, cost, target, replan)
        costs = list(self.costs)
        timed = [b.time(keep) for b in self.budgets]
        tried = [(keep, cost, timed, costs)]
        for _ in range(ROUNDS):
            worst = _worst(timed)
            if abs(worst.ratios[0] - target) <= worst.noise + CLOSE:
                break
            for b, t in zip(self.budgets, timed, strict=True):
                assert b.raw is not None
                b.points.append((b.raw.total(keep), t.ratios[0]))
            costs = [b.bracket(target, t.noise) for b, t in zip(self.budgets, timed,
                                                                 strict=True)]
            cost = mean_cost(costs, _excess(costs, keep))
            keep = replan(cost)
            if any(same_plan(keep, k) for k, *_ in tried):
                break  # the lines moved too little to change the plan
            timed = [b.time(keep) for b in self.budgets]
            tried.append((keep, cost, timed, costs))
        meets = [t for t in tried
                 if _worst(t[2]).ratios[0] <= target + _worst(t[2]).noise + CLOSE]
        best = (max(meets, key=lambda t: _worst(t[2]).ratios[0]) if meets
                else min(tried, key=lambda t: _worst(t[2]).ratios[0]))
        keep, cost, _, costs = best
        for i, budget in enumerate(self.budgets):
            self._record(budget.outcome, budget, [(k, c[i], t[i]) for k, _, t, c in tried],
                         (keep, costs[i], best[2][i]))
        return keep, cost

    @staticmethod
    def _record(out: LatencyOutcome, budget: LatencyBudget,
                tried: list[tuple[Keep, CostModel, SideBySide]],
                kept: tuple[Keep, CostModel, SideBySide]) -> None:
        keep, cost, timed = kept
        out.measurements = budget.meter.measured
        out.cached = budget.meter.cached
        out.rounds = len(tried) - 1
        out.history = [t.ratios[0] for _, _, t in tried]
        out.predictions = [float(c.total(k)) for k, c, _ in tried]
        out.corrected = timed is not tried[0][2]
        out.first_measured = tried[0][2].ratios[0] if len(tried) > 1 else None
        out.predicted = float(cost.total(keep))
        out.measured = timed.ratios[0]
        out.aa = timed.aa
        out.noise = timed.noise
