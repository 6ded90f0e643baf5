"""Greedy channel removal with the refit's closed-form compensation (OBS block elimination).

A group's consumers will be refitted by ridge least squares after the removal
(:mod:`~onnxopt.passes.prune.reconstruct`). Each consumer's problem is known from calibration
data (a :class:`~onnxopt.passes.prune.statistics.ConsumerSystem`: ``H = sum X'X`` over sampled
rows and the weights ``W``), so the effect of removing a channel *and refitting* is known in
closed form, without another calibration pass. With ``P = (H + lam I)^-1`` and ``W`` the
current optimal weights, removing the columns ``b`` of a channel raises the consumer's error
by ``sum_o W[o, b] P_bb^-1 W[o, b]'`` and changes the optimum to

    W -= W[:, b] P_bb^-1 P[b]        P -= P[:, b] P_bb^-1 P[b]

(block elimination of Optimal Brain Surgeon; ``W[:, b]`` becomes 0). :class:`Compensation`
holds that state for every consumer of a group; :func:`eliminate` removes channels one at a
time by any per-channel cost evaluated on the *compensated* state, so a criterion sees the
weights the refit will have left, not the original ones: ``thinet`` with refit costs the
error increase, ``l1``/``l2`` the norms of the compensated input columns (iterative
magnitude pruning, with the refit's update standing in for retraining between steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxopt.passes.prune.statistics import ConsumerSystem

__all__ = ["Compensation", "eliminate"]


@dataclass(eq=False)
class _Consumer:
    inverse: np.ndarray
    weight: np.ndarray
    channels: np.ndarray
    columns: np.ndarray
    energy: float


class Compensation:
    """The refit's optimum for every consumer of a group as channels are removed.

    Args:
        size: Channels in the group.
        systems: Each consumer's least-squares problem (see
            :func:`~onnxopt.passes.prune.statistics.collect_statistics`).
        ridge: The refit's relative ridge (``lam = ridge * tr(H_xx) / D``, as the refit uses).
    """

    def __init__(self, size: int, systems: Sequence[ConsumerSystem], ridge: float) -> None:
        self.size = size
        self.removed = np.zeros(size, dtype=bool)
        self._consumers = []
        for system in systems:
            channels, columns = system.columns
            inputs = columns.size
            lam = ridge * float(np.trace(system.moment[:inputs, :inputs])) / max(inputs, 1)
            regulariser = np.zeros(len(system.moment))
            regulariser[:inputs] = max(lam, 1e-12)
            inverse = np.linalg.inv(system.moment + np.diag(regulariser))
            self._consumers.append(_Consumer(inverse, system.weight.copy(), channels, columns,
                                             max(system.energy, 1e-30)))

    def error_increase(self) -> np.ndarray:
        """Per channel, the refitted consumers' error increase (each relative to its output
        energy, summed) if it were removed next (meaningless for removed channels)."""
        delta = np.zeros(self.size)
        for c in self._consumers:
            alive = ~self.removed[c.channels]
            if not alive.any():
                continue
            idx = c.columns[alive]
            blocks = c.inverse[idx[:, :, None], idx[:, None, :]]
            rows = c.weight[:, idx].transpose(1, 2, 0)
            delta[c.channels[alive]] += np.sum(rows * np.linalg.solve(blocks, rows),
                                               axis=(1, 2)) / c.energy
        return delta

    def column_norms(self, power: int) -> np.ndarray:
        """Per channel, the ``L_power`` norm of its compensated input columns in each consumer,
        divided by that consumer's mean over the channels still present, summed."""
        total = np.zeros(self.size)
        for c in self._consumers:
            norms = np.sum(np.abs(c.weight[:, c.columns]) ** power, axis=(0, 2)) ** (1 / power)
            alive = ~self.removed[c.channels]
            mean = float(norms[alive].mean()) if alive.any() else 0.0
            np.add.at(total, c.channels, norms / mean if mean > 0 else np.ones_like(norms))
        return total

    def remove(self, channel: int) -> None:
        """Remove ``channel`` and move every consumer to its refitted optimum without it."""
        self.removed[channel] = True
        if self.removed.all():
            return
        for c in self._consumers:
            hit = np.flatnonzero(c.channels == channel)
            if not hit.size:
                continue
            b = c.columns[hit[0]]
            solved = np.linalg.solve(c.inverse[np.ix_(b, b)], c.inverse[b])
            c.weight -= c.weight[:, b] @ solved
            c.inverse -= c.inverse[:, b] @ solved
            # The eliminated rows and columns are now zero: drop them, so later steps work
            # on the inputs still present (a third of the work over a whole elimination).
            # Columns of removed channels then point anywhere; they are never read.
            present = np.ones(len(c.inverse), dtype=bool)
            present[b] = False
            c.inverse = c.inverse[np.ix_(present, present)]
            c.weight = c.weight[:, present]
            c.columns = np.maximum(np.cumsum(present)[c.columns] - 1, 0)


def eliminate(state: Compensation,
              cost: Callable[[Compensation], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Remove every channel of ``state`` greedily, cheapest ``cost`` first, compensating after
    each removal.

    Args:
        state: The consumers' compensation state (consumed).
        cost: Per-channel cost on the current state (removed channels are skipped).

    Returns:
        ``(order, costs)``: ``order[i]`` is the channel removed at step ``i`` and ``costs[i]``
        its cost at that step.
    """
    order = np.empty(state.size, dtype=np.int64)
    costs = np.empty(state.size)
    for step in range(state.size):
        values = np.where(state.removed, np.inf, cost(state))
        pick = int(np.argmin(values))
        order[step], costs[step] = pick, values[pick]
        state.remove(pick)
    return order, costs
