"""Calibration statistics of channel groups for the data-driven importance criteria.

Gathered in one onnxruntime pass over the calibration data (the consumers' inputs and outputs
exposed on a truncated copy of the model), per prunable group:

- zero counts at the consumers' inputs (``apoz``);
- the contribution Gram ``G = sum_k E[z_c . z_c'] / E|y_k - b_k|^2``, where consumer ``k``
  receives ``z_c = sum_{p in c, j} M_k[:, p, j] x[p, j]`` from channel ``c`` (``thinet``);
- per consumer, the input second moment ``H = sum X'X`` over sampled rows ``X = [x, 1]``
  (``x`` flattened to ``P x K`` columns, ``1`` for the bias), with the weight ``[M, b]`` and
  which columns each group channel owns: the least-squares problem the refit will solve,
  so a criterion can score the error that remains *after* it (``thinet`` with refit).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.channels.groups import ChannelGroup, Member
from onnxopt.channels.tie import IN0, Role
from onnxopt.data import FeedSource
from onnxopt.feeds import input_specs
from onnxopt.passes.prune.capture import LinearView, linear_view
from onnxopt.passes.prune.runner import stream_segments
from onnxopt.session import batch_within

__all__ = ["CalibStatistics", "ConsumerSystem", "collect_statistics"]

#: Budget of one contribution block ``P x S x O`` (elements) before rows are chunked.
_BLOCK = 4_000_000
#: Largest consumer input (``P x K`` columns) whose second moment is kept.
MAX_COLUMNS = 2048
#: Rows buffered per consumer before they are added to its second moment.
FLUSH_ROWS = 4096


@dataclass(eq=False)
class ConsumerSystem:
    """One consumer's least-squares problem, in the original model.

    Attributes:
        weight: ``[M, b]`` as ``[O, D (+1)]`` (the bias column only when the op has one).
        columns: ``(channels, [n, B] column indices)``: the columns of each group channel
            present in the consumer's input (``B = positions per channel x K``).
        moment: ``sum X'X`` over the sampled rows, ``[D (+1), D (+1)]``.
        energy: ``sum |y - b|^2`` over the same rows.
    """

    weight: np.ndarray
    columns: tuple[np.ndarray, np.ndarray]
    moment: np.ndarray
    energy: float = 0.0
    name: str = ""


@dataclass
class CalibStatistics:
    """Per-group statistics from calibration data.

    Attributes:
        zeros: Group index -> exact zeros seen per channel at the consumers' inputs.
        seen: Group index -> values seen per channel there.
        gram: Group index -> the normalised contribution Gram ``G`` of ``thinet`` (not
            computed for groups that have ``systems``).
        systems: Group index -> the least-squares problem of each consumer (only when every
            consumer of the group has one that fits :data:`MAX_COLUMNS`).
    """

    zeros: dict[int, np.ndarray] = field(default_factory=dict)
    seen: dict[int, np.ndarray] = field(default_factory=dict)
    gram: dict[int, np.ndarray] = field(default_factory=dict)
    systems: dict[int, list[ConsumerSystem]] = field(default_factory=dict)
    consumers: dict[str, tuple[int, ConsumerSystem]] = field(default_factory=dict)


@dataclass(eq=False)
class _Consumer:
    group: ChannelGroup
    member: Member
    view: LinearView
    gram: np.ndarray
    energy: float = 0.0
    system: ConsumerSystem | None = None
    needs_gram: bool = True
    pending: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0


def _flush(consumer: _Consumer) -> None:
    """Add the buffered rows to the consumer's second moment (one product per block)."""
    if consumer.pending and consumer.system is not None:
        design = np.concatenate(consumer.pending)
        consumer.system.moment += (design.T @ design).astype(np.float64)
    consumer.pending, consumer.pending_rows = [], 0


def _columns(member: Member, kernel: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Channels of ``member`` and the ``P x K`` columns of each; None if of unequal width."""
    channels, counts = np.unique(member.channels, return_counts=True)
    if len(set(counts.tolist())) != 1:
        return None
    positions = np.stack([np.flatnonzero(member.channels == c) for c in channels])
    columns = (positions[:, :, None] * kernel + np.arange(kernel)).reshape(len(channels), -1)
    return channels, columns


def _system(view: LinearView, member: Member) -> ConsumerSystem | None:
    out, positions, kernel = view.weight.shape
    size = positions * kernel + int(view.fits_bias)
    columns = _columns(member, kernel)
    if size > MAX_COLUMNS or columns is None:
        return None
    weight = view.weight.reshape(out, -1)
    if view.fits_bias:
        weight = np.concatenate([weight, view.bias[:, None]], axis=1)
    return ConsumerSystem(weight, columns, np.zeros((size, size)), name=view.node.name or "")


def _consumers(groups: Sequence[ChannelGroup], systems: bool) -> list[_Consumer]:
    found = []
    for group in groups:
        for tie in group.ties_with_role(Role.CONSUMER):
            member = tie.member_at(IN0)
            view = linear_view(tie.node)
            if member is None or member.is_weight or isinstance(view, str):
                continue
            if view.weight.shape[1] != member.size or member.channels is None:
                continue
            consumer = _Consumer(group, member, view, np.zeros((group.size, group.size)))
            consumer.system = _system(view, member) if systems else None
            found.append(consumer)
    return found


def _contributions(consumer: _Consumer, rows: np.ndarray) -> np.ndarray:
    """``z_c`` of every group channel for these rows: ``[C, S * O]``."""
    weight, channels = consumer.view.weight, consumer.member.channels
    size, samples, out = consumer.group.size, rows.shape[0], weight.shape[0]
    z = np.zeros((size, samples, out))
    if len(np.unique(channels)) == len(channels):
        step = max(1, _BLOCK // max(1, len(channels) * out))
        for start in range(0, samples, step):
            block = np.einsum("spk,opk->pso", rows[start:start + step], weight, optimize=True)
            z[channels, start:start + step] = block
    else:
        for c in np.unique(channels):
            at = np.flatnonzero(channels == c)
            z[c] = np.einsum("spk,opk->so", rows[:, at], weight[:, at], optimize=True)
    return z.reshape(size, -1)


def _count_zeros(stats: CalibStatistics, group: ChannelGroup, member: Member,
                 array: np.ndarray) -> None:
    values = np.moveaxis(array, member.axis, 0).reshape(array.shape[member.axis], -1)
    zeros = np.zeros(group.size)
    seen = np.zeros(group.size)
    np.add.at(zeros, member.channels, np.count_nonzero(values == 0, axis=1))
    np.add.at(seen, member.channels, values.shape[1])
    stats.zeros[group.index] = stats.zeros.get(group.index, 0) + zeros
    stats.seen[group.index] = stats.seen.get(group.index, 0) + seen


def _observe(consumer: _Consumer, x: np.ndarray, y: np.ndarray, positions: int,
             rng: np.random.Generator) -> None:
    view = consumer.view
    coords = view.sample(y.shape, positions, rng)
    rows = view.rows(x, coords)
    if consumer.needs_gram:
        z = _contributions(consumer, rows.astype(np.float64))
        consumer.gram += z @ z.T
    centred = view.outputs(y, coords).astype(np.float64)
    if view.bias is not None:
        centred = centred - view.bias
    consumer.energy += float(np.sum(centred ** 2))
    system = consumer.system
    if system is not None:
        design = rows.reshape(rows.shape[0], -1).astype(np.float32)
        if view.fits_bias:
            design = np.concatenate([design, np.ones((len(design), 1), np.float32)], axis=1)
        consumer.pending.append(design)
        consumer.pending_rows += len(design)
        if consumer.pending_rows >= FLUSH_ROWS:
            _flush(consumer)
        system.energy = consumer.energy


def collect_statistics(model: ir.Model, groups: Sequence[ChannelGroup], source: FeedSource,
                       needs: Collection[str], *, batch_size: int = 32,
                       limit: int | None = None, positions: int = 16,
                       input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                       seed: int = 0, show_progress: bool = False) -> CalibStatistics:
    """Gather what the criteria need (``needs``) about ``groups`` in one calibration pass.

    Args:
        model: The model the groups belong to (not changed).
        groups: The groups to measure.
        source: Calibration feeds.
        needs: ``"apoz"`` (zero counts), ``"gram"`` (contribution Gram), ``"systems"``
            (the consumers' least-squares problems; implies the Gram's pass).
        batch_size: Batch size when the batch axis is dynamic.
        limit: At most this many samples.
        positions: Output locations sampled per sample and Conv consumer.
        input_shapes: Concrete shapes of dynamic inputs.
        seed: Seed of the position sampling.
        show_progress: Allow a progress bar.
    """
    stats = CalibStatistics()
    wanted = {"gram", "systems"} & set(needs)
    consumers = _consumers(groups, "systems" in needs) if wanted else []
    for consumer in consumers:  # a group whose consumers all have systems needs no Gram
        consumer.needs_gram = "gram" in needs and any(
            c.system is None for c in consumers if c.group is consumer.group)
    members: dict[tuple[str, int], tuple[ChannelGroup, Member]] = {}
    if "apoz" in needs:
        for group in groups:
            for tie in group.ties_with_role(Role.CONSUMER):
                member = tie.member_at(IN0)
                if member is not None and not member.is_weight and member.channels is not None:
                    members.setdefault((member.value.name, member.axis), (group, member))
    names = [c.member.value.name for c in consumers]
    names += [c.view.node.outputs[0].name for c in consumers]
    names = list(dict.fromkeys(names + [name for name, _ in members]))
    if not names:
        return stats
    rng = np.random.default_rng(seed)
    specs = input_specs(model, input_shapes)
    batch = batch_within(model, names, source, batch_size, input_shapes=input_shapes)
    for (tensors,) in stream_segments([model], names, source, specs, batch_size=batch,
                                      limit=limit, show_progress=show_progress,
                                      desc="prune: scoring channels"):
        for (name, _), (group, member) in members.items():
            _count_zeros(stats, group, member, tensors[name])
        for consumer in consumers:
            _observe(consumer, tensors[consumer.member.value.name],
                     tensors[consumer.view.node.outputs[0].name], positions, rng)
    for consumer in consumers:
        _flush(consumer)
        if consumer.energy > 0 and consumer.needs_gram:
            index = consumer.group.index
            stats.gram[index] = stats.gram.get(index, 0.0) + consumer.gram / consumer.energy
    for consumer in consumers:
        if consumer.system is not None and consumer.energy > 0 and consumer.system.name:
            stats.consumers[consumer.system.name] = (consumer.group.index, consumer.system)
    for group in groups:
        mine = [c for c in consumers if c.group is group]
        if mine and all(c.system is not None and c.energy > 0 for c in mine):
            stats.systems[group.index] = [c.system for c in mine]
    return stats
