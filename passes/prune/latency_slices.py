"""Concat slices on the channel step under a latency budget: snapped plans that keep the target.

A concat group is thinned by one ranking over all its slices (the outputs of the layers it
concatenates), so a slice can end at any width. Off onnxruntime's channel block a layer
falls back to other kernels, and a concat of blocked and unblocked inputs is reordered,
none of which the one-node tables of :mod:`.latency` see. Under a latency budget every
slice therefore keeps a multiple of its group's step (:func:`keep_slices_on_step`), and
:func:`snapped_allocation` finds the allocator target whose snapped plan meets the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from onnxopt.channels.groups import ChannelGroup
from onnxopt.passes.prune.budget import Keep, Limits, keep_every_tensor
from onnxopt.passes.prune.channel_cost import CostModel

__all__ = ["BLOCK", "concat_slices", "keep_slices_on_step", "snapped", "snapped_allocation"]

BLOCK = 8
"""The least step of a concat slice when the steps are measured: onnxruntime's smallest NCHWc
channel block (AVX2; AVX-512 has 16). A concat of inputs off the block is reordered, which
no one-node measurement sees, and the measured steps of single nodes can come out small
on a loaded machine (2 where the slices then mispredict by 20%)."""

BISECTIONS = 24
"""Bisection steps on the allocator's target (the allocators take milliseconds)."""


def concat_slices(group: ChannelGroup) -> list[np.ndarray]:
    """The slices of a concat group: its members' channel sets that contain no other.

    Empty for a group without slices (every member holds all its channels) and when the
    slices overlap (nothing to snap to).
    """
    sets = list({frozenset(np.unique(m.channels).tolist()): None for m in group.members
                 if m.channels is not None})
    minimal = [s for s in sets if len(s) < group.size
               and not any(len(t) < len(s) and t <= s for t in sets)]
    if len(minimal) < 2 or len(frozenset().union(*minimal)) < sum(map(len, minimal)):
        return []
    return sorted((np.array(sorted(s), dtype=np.int64) for s in minimal),
                  key=lambda a: int(a[0]))


SLICE_STEPS = 4
"""Steps a slice holds at least: a wider step is halved (so a slice can lose 3/4)."""


def _slice_step(step: int, size: int) -> int:
    """The group's step, halved until the slice holds :data:`SLICE_STEPS` of them."""
    while step > 1 and size < SLICE_STEPS * step:
        step //= 2
    return step


def keep_slices_on_step(group: ChannelGroup, keep: np.ndarray, scores: np.ndarray,
                        step: int) -> np.ndarray:
    """``keep`` with every concat slice at a multiple of ``step`` (or whole), same total.

    The knapsack thins a concat group by one ranking over all its slices, so a slice can
    end at any width: a producer whose output is off onnxruntime's channel block, which
    its one-node table does not see, and a concat of blocked and unblocked inputs, which
    onnxruntime reorders. Each slice's count is rounded down to its step (at least one
    step), then step chunks are added back, best mean score first, while they fit the
    group's count, or removed, worst first, while it is exceeded. Slices narrower than
    :data:`SLICE_STEPS` steps use a step halved until they hold that many.
    """
    slices = concat_slices(group) if step > 1 and not keep.all() else []
    if not slices:
        return keep
    total = int(keep.sum())
    order = [s[np.argsort(-scores[s], kind="stable")] for s in slices]
    steps = [_slice_step(step, len(s)) for s in slices]
    widths = [sorted({*range(t, len(s) + 1, t), len(s)}) for s, t in zip(slices, steps,
                                                                    strict=True)]
    counts = [max([w for w in ws if w <= int(keep[s].sum())] or [ws[0]])
              for s, ws in zip(slices, widths, strict=True)]
    rest = total - int(sum(keep[s].sum() for s in slices))  # channels outside the slices

    def mean(i: int, up: bool) -> float:
        ws = widths[i]
        j = ws.index(counts[i]) + (1 if up else -1)
        low, high = sorted((counts[i], ws[j]))
        return float(np.mean(scores[order[i][low:high]]))

    while True:
        kept = rest + sum(counts)
        if kept < total:
            grow = [i for i, ws in enumerate(widths) if counts[i] < ws[-1]
                    and kept + ws[ws.index(counts[i]) + 1] - counts[i] <= total]
            if not grow:
                break
            i = max(grow, key=lambda i: mean(i, True))
            counts[i] = widths[i][widths[i].index(counts[i]) + 1]
        elif kept > total:
            shrink = [i for i, ws in enumerate(widths) if counts[i] > ws[0]]
            if not shrink:
                break
            i = min(shrink, key=lambda i: mean(i, False))
            counts[i] = widths[i][widths[i].index(counts[i]) - 1]
        else:
            break
    keep = keep.copy()
    for s, ranked, n in zip(slices, order, counts, strict=True):
        keep[s] = False
        keep[ranked[:n]] = True
    return keep


def snapped(groups: Sequence[ChannelGroup], keep: Keep, scores: Mapping[int, np.ndarray],
            limits: Limits, least: int = 1) -> Keep:
    """``keep`` with no tensor emptied and every concat slice on its group's step (at
    least ``least``)."""
    return {g.index: keep_slices_on_step(g, keep_every_tensor(g, keep[g.index],
                                                              scores[g.index]),
                                         scores[g.index], max(limits.step(g.index), least))
            for g in groups}


def snapped_allocation(allocate: Callable[[float], Keep], groups: Sequence[ChannelGroup],
                       scores: Mapping[int, np.ndarray], cost: CostModel, target: float,
                       limits: Limits, least: int = 1) -> Keep:
    """The allocator's plan, snapped (:func:`snapped`), at most ``target`` by ``cost``.

    Snapping keeps each group's count but moves channels between slices, which changes
    the cost (raising a thin slice to a full step usually costs more than the channels it
    takes from the others). When the plan at ``target`` exceeds it, the allocator's
    target is bisected for the largest whose snapped plan fits (the deepest plan when
    none does). Without concat slices this is the allocator's plan.

    Args:
        allocate: Allocator target (cost units) -> plan.
        groups: The candidate groups.
        scores: Their channel scores.
        cost: The cost the target is in.
        target: Cost to reach.
        limits: Per-group limits (their steps are the slices').
        least: The least step of a slice (:data:`BLOCK` when the steps were measured).
    """
    plan = snapped(groups, allocate(target), scores, limits, least)
    if cost.total(plan) <= target * (1 + 1e-9) or not any(map(concat_slices, groups)):
        return plan  # without slices, the allocator's plan is the best there is
    low, high, best = 0.0, target, None
    for _ in range(BISECTIONS):
        mid = 0.5 * (low + high)
        candidate = snapped(groups, allocate(mid), scores, limits, least)
        if cost.total(candidate) <= target * (1 + 1e-9):
            low, best = mid, candidate
        else:
            high = mid
    return best if best is not None else snapped(groups, allocate(0.0), scores, limits,
                                                         least)
