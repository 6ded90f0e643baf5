"""Channel importance: a score per channel of a group, from one criterion, over all its producers.

A group channel lives in several tensors (every producer of a residual group, the BN after
each, the consumers' inputs); a criterion scores the *group* channel once, from all of them.
Scores are normalised per layer so the budget can compare channels of different groups:

- ``l1`` / ``l2`` (Li et al.): per weighted layer of the group (each producer's filters, each
  consumer's input columns) the norm of the channel's slice divided by that layer's mean;
  summed over the layers (Torch-Pruning's group importance with a sum), so a channel is worth
  as many layers as its cost is counted over. When the consumers will be refitted (the
  pass's ``reconstruct``), the consumers' columns are re-read after every removal from the
  refit's compensated weights (:mod:`~onnxopt.passes.prune.compensation`): iterative magnitude
  pruning with the closed-form refit in place of retraining, so of two channels that carry
  the same signal one is kept and inherits the other's weight.
- ``bn`` (network slimming): ``|gamma|`` of every normalization in the group, each divided by
  its mean, summed, scaled to the layer count. Without one (``fold-bn`` ran first): ``l2``.
- ``apoz`` (Hu et al.): ``1 - APoZ``, the fraction of nonzero values the channel's consumers
  read on calibration data, divided by its mean (``1e-3 x l2`` breaks ties of channels that
  are never zero), scaled to the layer count.
- ``thinet`` (Luo et al.): consumer ``k`` receives from channel ``c`` the contribution
  ``z_c = sum_{p in c, j} M_k[:, p, j] x[p, j]`` (see :mod:`~onnxopt.passes.prune.capture`).
  Removing a set ``T`` changes its output by ``sum_{c in T} z_c``, of energy ``1' G_TT 1``
  with the Gram ``G = sum_k E[z_c . z_c'] / E|y_k - b_k|^2`` (each consumer normalised by its
  own output energy). Greedily the channel with the least increase ``2 sum_{t in T} G[t, c] +
  G[c, c]`` joins ``T``; a channel's score is the running maximum of those increases at its
  turn: the relative output error its removal adds, comparable across groups as it is.
  When the consumers will be refitted (the pass's ``reconstruct``), the greedy measures the
  change that *remains after* the refit instead (:func:`refit_order`, block elimination of
  Optimal Brain Surgeon on each consumer's least-squares problem, in
  :mod:`~onnxopt.passes.prune.compensation`): a channel that the others
  can stand in for is then cheap, however large its own contribution.
- ``random``: uniform scores scaled to the layer count, the baseline.

Criteria live in the registry :data:`CRITERIA`; data-driven ones declare the calibration
statistics they need, gathered in one onnxruntime pass by
:func:`~onnxopt.passes.prune.statistics.collect_statistics`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxopt.channels.groups import ChannelGroup, Member
from onnxopt.channels.tie import Port, Role
from onnxopt.ir import const_array
from onnxopt.passes.prune.compensation import Compensation, eliminate
from onnxopt.passes.prune.statistics import CalibStatistics, ConsumerSystem

logger = logging.getLogger(__name__)

__all__ = ["CRITERIA", "Criterion", "group_scores", "refit_order", "thinet_order"]

WEIGHT = Port(False, 1)
#: Normalization ops whose input 1 is the per-channel scale ``gamma``.
SCALE_INPUT = {"BatchNormalization": 1, "InstanceNormalization": 1}


@dataclass(frozen=True)
class ScoringInputs:
    """What a criterion may look at besides the group.

    Attributes:
        stats: Calibration statistics, when gathered.
        seed: Seed of any randomness.
        refit_ridge: The refit's relative ridge when the consumers will be refitted (None:
            they will not).
    """

    stats: CalibStatistics | None = None
    seed: int = 0
    refit_ridge: float | None = None


@dataclass(frozen=True)
class Criterion:
    """An importance criterion.

    Attributes:
        score: ``(group, inputs) -> scores`` (one per group channel, higher = keep).
        needs: Calibration statistics it needs (see
            :func:`~onnxopt.passes.prune.statistics.collect_statistics`).
        refit_needs: More statistics it uses when the consumers will be refitted.
        calibrated: Scores measure the damage of a removal on a common scale, so they can
            be compared across groups as they are (else only within a layer).
        description: One line for the docs.
    """

    score: Callable[[ChannelGroup, ScoringInputs], np.ndarray]
    needs: frozenset[str] = frozenset()
    refit_needs: frozenset[str] = frozenset()
    calibrated: bool = False
    description: str = ""


def _by_mean(scores: np.ndarray) -> np.ndarray:
    mean = float(np.mean(scores)) if scores.size else 0.0
    return scores / mean if mean > 0 else np.ones_like(scores)


def _per_channel(group: ChannelGroup, member: Member, values: np.ndarray) -> np.ndarray:
    """Sum of per-position ``values`` of ``member`` into its group channels."""
    out = np.zeros(group.size)
    np.add.at(out, member.channels, values)
    return out


def _layers(group: ChannelGroup) -> int:
    """Weighted layers a channel of the group lives in (producers and consumers)."""
    return max(1, len(group.ties_with_role(Role.PRODUCER))
               + len(group.ties_with_role(Role.CONSUMER)))


def _weight_norms(group: ChannelGroup, members: Sequence[Member], power: int) -> np.ndarray:
    """Sum over ``members`` of their mean-normalised per-channel ``L_power`` norms."""
    total = np.zeros(group.size)
    for member in members:
        array = const_array(member.node.inputs[member.input_index]) if member.node else None
        if array is None or member.channels is None:
            continue
        rows = np.moveaxis(array.astype(np.float64), member.axis, 0)
        rows = rows.reshape(rows.shape[0], -1)
        norms = _per_channel(group, member, np.sum(np.abs(rows) ** power, axis=1)) ** (1 / power)
        total += _by_mean(norms)
    return total if total.any() else np.full(group.size, float(_layers(group)))


def _layer_weights(group: ChannelGroup) -> list[Member]:
    """Filters of the producers and input columns of the consumers."""
    ties = group.ties_with_role(Role.PRODUCER) + group.ties_with_role(Role.CONSUMER)
    return [m for m in (t.member_at(WEIGHT) for t in ties) if m is not None]


def _l1(group: ChannelGroup, inputs: ScoringInputs) -> np.ndarray:
    scores = _compensated_norms(group, inputs, 1)
    return _weight_norms(group, _layer_weights(group), 1) if scores is None else scores


def _l2(group: ChannelGroup, inputs: ScoringInputs) -> np.ndarray:
    scores = _compensated_norms(group, inputs, 2)
    return _weight_norms(group, _layer_weights(group), 2) if scores is None else scores


def _bn(group: ChannelGroup, inputs: ScoringInputs) -> np.ndarray:
    scales = []
    for tie in group.ties_with_role(Role.THROUGH):
        index = SCALE_INPUT.get(tie.node.op_type)
        member = tie.member_at(Port(False, index)) if index is not None else None
        if member is not None:
            scales.append(member)
    if not scales:
        return _l2(group, inputs)
    return _layers(group) * _by_mean(_weight_norms(group, scales, 1))


def _apoz(group: ChannelGroup, inputs: ScoringInputs) -> np.ndarray:
    stats = inputs.stats
    if stats is None or group.index not in stats.seen:
        return _l2(group, inputs)
    seen = np.maximum(stats.seen[group.index], 1)
    nonzero = _by_mean(1.0 - stats.zeros[group.index] / seen)
    return _layers(group) * _by_mean(nonzero + 1e-3 * _by_mean(_l2(group, inputs)))


def thinet_order(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy removal order over a contribution Gram, and the error increase at each step.

    Returns:
        ``(order, increase)``: ``order[i]`` is the channel removed at step ``i`` and
        ``increase[i]`` how much the removed set's energy ``1' G_TT 1`` grew by it.
    """
    size = gram.shape[0]
    cross = np.zeros(size)
    removed = np.zeros(size, dtype=bool)
    diagonal = np.diag(gram).copy()
    order = np.empty(size, dtype=np.int64)
    increase = np.empty(size)
    for step in range(size):
        cost = np.where(removed, np.inf, 2.0 * cross + diagonal)
        pick = int(np.argmin(cost))
        order[step], increase[step] = pick, cost[pick]
        removed[pick] = True
        cross += gram[pick]
    return order, increase


def refit_order(size: int, systems: Sequence[ConsumerSystem],
                ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy removal order when the consumers are refitted after every removal.

    Each step removes the channel whose removal (and refit) raises the consumers' error the
    least (:meth:`~onnxopt.passes.prune.compensation.Compensation.error_increase`, each
    consumer's increase divided by its output energy, like :func:`thinet_order`).

    Returns:
        ``(order, increase)`` as :func:`thinet_order` returns them.
    """
    return eliminate(Compensation(size, systems, ridge), Compensation.error_increase)


def _compensated_norms(group: ChannelGroup, inputs: ScoringInputs,
                       power: int) -> np.ndarray | None:
    """``l1``/``l2`` when the consumers will be refitted: iterative magnitude pruning.

    The producers' filter norms are fixed; the consumers' input columns are re-read after
    every removal from the refit's compensated weights, so a channel that takes over a
    removed one's work gains weight. A channel's score is the running maximum of its summed
    normalised norms at its turn (None: no least-squares systems for the group).
    """
    stats = inputs.stats
    systems = None if stats is None else stats.systems.get(group.index)
    if not systems or inputs.refit_ridge is None:
        return None
    ties = group.ties_with_role(Role.PRODUCER)
    producers = [m for m in (t.member_at(WEIGHT) for t in ties) if m is not None]
    fixed = _weight_norms(group, producers, power) if producers else np.zeros(group.size)
    order, costs = eliminate(Compensation(group.size, systems, inputs.refit_ridge),
                             lambda state: fixed + state.column_norms(power))
    return _ordered_scores(order, costs)


def _ordered_scores(order: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Scores that keep a greedy removal ``order``: the running maximum of the costs at each
    channel's turn, ties (e.g. dead channels at 0) broken by the step."""
    scores = np.empty(len(order))
    scores[order] = np.maximum.accumulate(np.maximum(costs, 0.0))
    return scores + 1e-9 * np.argsort(order) / max(len(order), 1)


def _thinet(group: ChannelGroup, inputs: ScoringInputs) -> np.ndarray:
    stats = inputs.stats
    systems = None if stats is None else stats.systems.get(group.index)
    gram = None if stats is None else stats.gram.get(group.index)
    if systems and inputs.refit_ridge is not None:
        order, increase = refit_order(group.size, systems, inputs.refit_ridge)
    elif gram is not None and np.any(np.diag(gram) > 0):
        order, increase = thinet_order(gram)
    else:
        return _l2(group, inputs)
    return _ordered_scores(order, increase)


def _random(group: ChannelGroup, inputs: ScoringInputs) -> np.ndarray:
    rng = np.random.default_rng([inputs.seed, group.index])
    return _layers(group) * _by_mean(rng.random(group.size) + 0.5)


CRITERIA: dict[str, Criterion] = {
    "l1": Criterion(_l1, refit_needs=frozenset({"systems"}),
                    description="L1 norm of the filters and input columns"),
    "l2": Criterion(_l2, refit_needs=frozenset({"systems"}),
                    description="L2 norm of the filters and input columns"),
    "bn": Criterion(_bn, refit_needs=frozenset({"systems"}),
                    description="|gamma| of the group's normalizations (else l2)"),
    "apoz": Criterion(_apoz, frozenset({"apoz"}),
                      description="1 - average percentage of zeros read by the consumers"),
    "thinet": Criterion(_thinet, frozenset({"gram"}), frozenset({"systems"}), True,
                        "greedy least change of the consumers' outputs (ThiNet)"),
    "random": Criterion(_random, description="uniform random, a baseline"),
}
"""Criterion name -> criterion."""


def group_scores(groups: Sequence[ChannelGroup], criterion: str,
                 stats: CalibStatistics | None = None, seed: int = 0,
                 refit_ridge: float | None = None) -> dict[int, np.ndarray]:
    """Scores of every channel of every group under ``criterion``.

    Args:
        groups: The groups.
        criterion: A name in :data:`CRITERIA`.
        stats: Calibration statistics (data-driven criteria).
        seed: Seed of any randomness.
        refit_ridge: The refit's ridge if the consumers will be refitted, else None.

    Raises:
        KeyError: Unknown criterion.
    """
    rule = CRITERIA[criterion]
    inputs = ScoringInputs(stats, seed, refit_ridge)
    return {g.index: np.asarray(rule.score(g, inputs), dtype=np.float64) for g in groups}
