"""Budget allocation: how many (and which) channels each group keeps under a ratio or cost target.

The cost of keeping channels (MACs or params) is a polynomial in the groups' keep vectors
(:mod:`~onnxopt.passes.prune.channel_cost`).

Knapsack (Knapsack Pruning). Maximise the importance kept subject to the cost kept being at
most the target. Scores come from :mod:`~onnxopt.passes.prune.importance`, normalised per layer.
The solver is the greedy of the fractional knapsack on exact marginal costs: repeatedly remove
the next chunk (the least important channels not yet removed; ``round_to`` of them, so kept
widths stay multiples of it) with the smallest ``importance / cost saved``, then update the
saving of every group that shares a cost term with it (the bilinear terms make one layer's
saving depend on its neighbours' widths). It stops at the target, then gives back the best
last-removed chunks that still fit (the last, or a coarse, chunk overshoots). Cost per step is
the number of neighbouring terms, so a few thousand channels take milliseconds.

Scores that measure the damage itself (thinet: relative output error, growing as a layer
thins) are used as they are. Scores that are only normalised per layer (magnitudes, APoZ,
random) order channels within a layer but say nothing across layers, and their flat spread
lets the greedy empty the costliest group first. With ``relative`` such scores are replaced
by their rank values (``2 (r + 1/2) / C`` times the layer's mean score, so the allocation
does not depend on a criterion's spread) and a removed chunk's value is divided by the
fraction of its group that remains (a channel counts relative to the width left), so
thinning a layer gets progressively dearer. Criteria then differ only in which channels
they remove, not in how many.

Uniform. Every group keeps the same fraction ``1 - r`` (rounded, limits applied); ``r`` is
found by bisection for a cost target, or given (``ratio``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from onnxopt.channels.groups import ChannelGroup
from onnxopt.passes.prune.channel_cost import CostModel, Keep

__all__ = ["ALLOCATORS", "Keep", "Limits", "allocate_knapsack", "allocate_ratio",
           "allocate_uniform", "group_savings", "keep_every_tensor", "kept_counts",
           "rank_values"]



# -- limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-group limits on the kept width.

    Attributes:
        min_channels: Least channels kept per group (None: ``max(1, ceil(10%))``).
        round_to: Kept widths are multiples of this (or the full width).
        round_by_group: ``(group index, round_to)`` pairs overriding ``round_to`` for
            those groups (a granularity measured per group, :mod:`.latency`).
    """

    min_channels: int | None = None
    round_to: int = 1
    round_by_group: tuple[tuple[int, int], ...] = ()

    def step(self, group: int | None = None) -> int:
        """The width granularity of ``group`` (``round_to`` unless overridden)."""
        return max(1, dict(self.round_by_group).get(group, self.round_to))

    def allowed(self, size: int, group: int | None = None) -> np.ndarray:
        """Kept widths allowed for a group of ``size`` channels, descending."""
        least = self.min_channels if self.min_channels is not None else math.ceil(0.1 * size)
        least = min(size, max(1, least))
        step = self.step(group)
        widths = [k for k in range(size - 1, 0, -1) if k % step == 0 and k >= least]
        return np.array([size, *widths], dtype=np.int64)

    def nearest(self, size: int, width: float, group: int | None = None) -> int:
        """The allowed width closest to ``width`` (the larger one on a tie)."""
        allowed = self.allowed(size, group)
        return int(allowed[np.argmin(np.abs(allowed - width) - 1e-9 * allowed)])


def _keep_lowest_removed(scores: np.ndarray, width: int) -> np.ndarray:
    keep = np.zeros(len(scores), dtype=bool)
    keep[np.argsort(-scores, kind="stable")[:width]] = True
    return keep


def rank_values(scores: np.ndarray) -> np.ndarray:
    """Scores replaced by their rank in the layer: ``2 (r + 1/2) / C`` times their mean.

    Keeps the order and the mean (the layer count for per-layer normalised criteria) and
    drops the spread, which for such criteria says nothing across layers.
    """
    size = len(scores)
    values = np.empty(size)
    values[np.argsort(scores, kind="stable")] = 2.0 * (np.arange(size) + 0.5) / max(size, 1)
    return values * float(np.mean(scores)) if size else values


def keep_every_tensor(group: ChannelGroup, keep: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``keep`` changed so no tensor of the group loses all its channels (same kept count).

    A tensor that holds only some channels of its group (a concat input, a split output)
    can lose all of them to a group-wide ranking. Its best channel is kept instead of the
    least important kept channel whose tensors all keep another one.
    """
    keep = keep.copy()
    members = [np.unique(m.channels) for m in group.members if m.channels is not None]
    for channels in members:
        if keep[channels].any() or keep.all():
            continue
        keep[channels[np.argmax(scores[channels])]] = True
        for c in np.argsort(scores, kind="stable"):
            if keep[c] and all(keep[m].sum() > 1 for m in members if c in m):
                keep[c] = False
                break
    return keep


def kept_counts(keep: Keep) -> dict[int, int]:
    """Group index -> channels kept."""
    return {g: int(k.sum()) for g, k in keep.items()}


# -- allocators -------------------------------------------------------------------------------


def allocate_ratio(scores: Mapping[int, np.ndarray], ratio: float, limits: Limits) -> Keep:
    """Every group loses about ``ratio`` of its channels, the least important ones."""
    return {g: _keep_lowest_removed(s, limits.nearest(len(s), len(s) * (1.0 - ratio), g))
            for g, s in scores.items()}


def allocate_uniform(scores: Mapping[int, np.ndarray], cost: CostModel, target: float,
                     limits: Limits, relative: bool = False) -> Keep:
    """The smallest common ratio whose uniform pruning brings ``cost`` down to ``target``.

    ``relative`` is accepted for a common signature; the ratio is the same for every group.
    """
    def at(ratio: float) -> Keep:
        return allocate_ratio(scores, ratio, limits)

    if cost.total(at(0.0)) <= target:
        return at(0.0)
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (low + high)
        if cost.total(at(mid)) <= target:
            high = mid
        else:
            low = mid
    return at(high)


class _Greedy:
    """State of the knapsack greedy (see the module docstring)."""

    def __init__(self, scores: Mapping[int, np.ndarray], cost: CostModel, limits: Limits,
                 relative: bool) -> None:
        self.cost = cost
        self.relative = relative
        self.history: dict[int, list[tuple[np.ndarray, float]]] = {g: [] for g in scores}
        self.groups = list(scores)
        self.order = {g: np.argsort(scores[g], kind="stable") for g in self.groups}
        self.scores = {g: rank_values(s) for g, s in scores.items()} if relative else scores
        self.keep = {g: np.ones(len(s), dtype=bool) for g, s in scores.items()}
        self.removed = dict.fromkeys(self.groups, 0)
        self.stops = {g: limits.allowed(len(s), g) for g, s in scores.items()}
        self.terms = cost.by_group()
        self.values = [[term.base, [float(w.sum()) for _, w in term.factors]]
                       for term in cost.terms]
        self.neighbours = {g: {h for t in self.terms.get(g, ()) for h, _ in cost.terms[t].factors}
                           for g in self.groups}
        self.total = cost.total()

    def chunk(self, g: int) -> np.ndarray | None:
        size = len(self.keep[g])
        width = size - self.removed[g]
        lower = self.stops[g][self.stops[g] < width]
        if not len(lower):
            return None
        return self.order[g][self.removed[g]:size - int(lower[0])]

    def saving(self, g: int, chunk: np.ndarray) -> float:
        saved = 0.0
        for t in self.terms.get(g, ()):
            term, current = self.cost.terms[t], self.values[t][1]
            after = [f - float(w[chunk].sum()) if h == g else f
                     for (h, w), f in zip(term.factors, current, strict=True)]
            saved += term.value(current) - term.value(after)
        return saved

    def ratio(self, g: int) -> tuple[float, np.ndarray | None, float]:
        chunk = self.chunk(g)
        if chunk is None:
            return math.inf, None, 0.0
        saved = self.saving(g, chunk)
        if saved <= 0:
            return math.inf, None, 0.0
        return self.value(g, chunk, self.removed[g] + len(chunk)) / saved, chunk, saved

    def value(self, g: int, chunk: np.ndarray, removed: int) -> float:
        """Importance of ``chunk`` when ``removed`` channels of ``g`` are gone with it."""
        value = float(self.scores[g][chunk].sum())
        if self.relative:
            size = len(self.keep[g])
            value *= size / max(size - removed, 1)
        return value

    def remove(self, g: int, chunk: np.ndarray, saved: float) -> None:
        self._change(g, chunk, -1)
        self.history[g].append((chunk, saved))
        self.total -= saved

    def restore(self, g: int) -> None:
        """Undo the last removal of ``g``."""
        chunk, _ = self.history[g].pop()
        self._change(g, chunk, +1)
        self.total = self.cost.total(self.keep)

    def _change(self, g: int, chunk: np.ndarray, sign: int) -> None:
        self.keep[g][chunk] = sign > 0
        self.removed[g] -= sign * len(chunk)
        for t in self.terms.get(g, ()):
            current = self.values[t][1]
            for i, (h, w) in enumerate(self.cost.terms[t].factors):
                if h == g:
                    current[i] += sign * float(w[chunk].sum())

    def refill(self, target: float) -> None:
        """Give back the most valuable last-removed chunks that still fit under ``target``.

        The last chunk removed (or a coarse ``round_to`` chunk) usually overshoots the
        target; this takes back what fits, best value per cost first.
        """
        while True:
            best, best_ratio = None, -math.inf
            for g, done in self.history.items():
                if not done:
                    continue
                chunk, _ = done[-1]
                self._change(g, chunk, +1)
                added = self.cost.total(self.keep) - self.total
                self._change(g, chunk, -1)
                ratio = self.value(g, chunk, self.removed[g]) / max(added, 1e-12)
                if self.total + added <= target and ratio > best_ratio:
                    best, best_ratio = g, ratio
            if best is None:
                return
            self.restore(best)


def allocate_knapsack(scores: Mapping[int, np.ndarray], cost: CostModel, target: float,
                      limits: Limits, relative: bool = False) -> Keep:
    """Greedy knapsack: remove the cheapest importance per unit of cost until ``target``.

    Args:
        scores: Group index -> channel scores (higher = keep).
        cost: The cost model over those groups.
        target: Cost to reach.
        limits: Per-group limits.
        relative: The scores are only normalised per layer: use their rank values and divide
            a removed chunk's value by the fraction of its group that remains.
    """
    state = _Greedy(scores, cost, limits, relative)
    best = {g: state.ratio(g) for g in state.groups}
    while state.total > target:
        g = min(best, key=lambda h: best[h][0])
        ratio, chunk, saved = best[g]
        if chunk is None or not math.isfinite(ratio):
            break
        state.remove(g, chunk, saved)
        for h in state.neighbours[g] | {g}:
            if h in best:
                best[h] = state.ratio(h)
    state.refill(target)
    return state.keep


ALLOCATORS: dict[str, Callable[..., Keep]] = {
    "knapsack": allocate_knapsack,
    "uniform": allocate_uniform,
}
"""Allocation name -> ``(scores, cost model, target cost, limits, relative) -> keep vectors``."""


def group_savings(cost: CostModel, keep: Keep) -> dict[int, float]:
    """Cost saved by each group's removals, applied one group after another in ``keep`` order.

    The savings add up to ``cost.total() - cost.total(keep)``.
    """
    applied: Keep = {}
    before = cost.total(applied)
    savings = {}
    for g, mask in keep.items():
        applied[g] = mask
        after = cost.total(applied)
        savings[g] = before - after
        before = after
    return savings
