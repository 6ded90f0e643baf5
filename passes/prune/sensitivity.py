"""Measured sensitivity for the prune pass: how much the graph output moves when a group thins.

Per-layer importance orders a group's channels but does not compare across groups, so with
calibration data the knapsack values channels by the measured change of the graph output
(see :func:`measured_scores`). Also the choice of consumers to refit after a removal.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxopt.channels import ChannelGroup, analyse_channels
from onnxopt.channels.surgery import remove_channels
from onnxopt.channels.tie import IN0, OUT0, Role
from onnxopt.data import input_specs
from onnxopt.ir import clone_model, subgraphs
from onnxopt.pass_base import PassContext
from onnxopt.passes.prune.budget import (
    Limits,
    keep_every_tensor,
)
from onnxopt.passes.prune.capture import linear_view
from onnxopt.passes.prune.crops import crop_source
from onnxopt.passes.prune.reconstruct import RefitTarget, reconstruct
from onnxopt.passes.prune.runner import stream_segments
from onnxopt.passes.prune.targets import TargetCache
from onnxopt.progress import progress
from onnxopt.session import batch_within

if TYPE_CHECKING:
    from onnxopt.passes.prune.prune import PruneOptions

logger = logging.getLogger(__name__)

HOLDOUT_EVERY = 4
"""The measurements refit on 3 of every 4 calibration samples and measure on the 4th."""
HOLDOUT_MIN = 32
"""Below this many calibration samples they refit and measure on all of them."""


@dataclass(eq=False)
class Measurement:
    """The data the measurements of one plan run on, and what they share.

    Attributes:
        model: The unpruned model.
        opts: The pass's options.
        refit: Whether pruned copies are refitted.
        fit: Context whose calibration data the probes are refitted on.
        held: Context whose calibration data their output change is measured on.
        cache: The unpruned model's outputs at the refit's sampled rows of ``fit`` (shared
            by every probe's refit), when refitting.
        reference: The unpruned model's first output per batch of ``held`` (once known).
    """

    model: ir.Model
    opts: PruneOptions
    refit: bool
    fit: PassContext
    held: PassContext
    cache: TargetCache | None = None
    reference: list[np.ndarray] | None = field(default=None, repr=False)


def measurement(model: ir.Model, ctx: PassContext, opts: PruneOptions,
                refit: bool) -> Measurement:
    """The measuring data of one plan: crops of large images, split into fit and held parts.

    Images at least twice :data:`~onnxopt.passes.prune.crops.CROP` in both directions are
    cropped when the model allows it (:func:`~onnxopt.passes.prune.crops.crop_source`).

    Measured on the samples it was fitted to, a refit looks better than it is, and most
    where the consumer has about as many inputs as there are rows (a Gemm after Flatten
    sees one row per sample): the knapsack would then thin the layers above such consumers
    for nothing. So the measuring holds out every 4th sample. The final refit uses all.
    """
    if ctx.calib is not None:
        cropped = crop_source(model, ctx.calib, ctx.input_shapes, ctx.seed)
        if cropped is not None:
            source, shapes = cropped
            logger.info("prune: measuring on %s", source.description)
            ctx = dataclasses.replace(ctx, calib=source, input_shapes=shapes)
    fit = held = ctx
    if ctx.calib is not None and ctx.calib.count(input_specs(model, ctx.input_shapes)) >= \
            HOLDOUT_MIN:
        parts = ctx.calib.holdout(HOLDOUT_EVERY)
        fit, held = (dataclasses.replace(ctx, calib=part) for part in parts)
    cache = None
    if refit and fit.calib is not None:
        consumers = [n.outputs[0].name for n in model.graph
                     if not isinstance(linear_view(n), str)]
        batch = batch_within(model, consumers, fit.calib, opts.batch_size,
                             input_shapes=fit.input_shapes)
        cache = TargetCache(model, fit.calib, fit.input_shapes, positions=opts.positions,
                            seed=fit.seed, batch_size=batch, limit=opts.max_samples,
                            show_progress=ctx.progress)
    return Measurement(model, opts, refit, fit, held, cache)


def refit_targets(groups: list[ChannelGroup], keep: dict[int, np.ndarray]) -> list[RefitTarget]:
    """Consumers of pruned groups, with the original output channels they keep."""
    produced: dict[int, np.ndarray] = {}
    for group in groups:
        for tie in group.ties_with_role(Role.PRODUCER):
            member = tie.member_at(OUT0)
            if member is not None and group.index in keep:
                produced[id(tie.node)] = np.flatnonzero(keep[group.index][member.channels])
    targets: dict[int, RefitTarget] = {}
    for group in groups:
        if keep[group.index].all():
            continue
        for tie in group.ties_with_role(Role.CONSUMER):
            view = linear_view(tie.node)
            if id(tie.node) in targets or tie.member_at(IN0) is None or isinstance(view, str):
                continue
            kept = produced.get(id(tie.node), np.arange(view.weight.shape[0]))
            targets[id(tie.node)] = RefitTarget(tie.node, kept)
    return list(targets.values())


def _increasing(values: np.ndarray) -> np.ndarray:
    """``values`` made non-decreasing by pooling adjacent violators (their sum is kept)."""
    blocks: list[list[float]] = []
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(int(c), t / c) for t, c in blocks])


def _probe_widths(size: int, limits: Limits, probes: int) -> list[int]:
    """Up to ``probes`` allowed widths below ``size``, near evenly spaced fractions of it."""
    allowed = limits.allowed(size)[1:]
    if not len(allowed):
        return []
    fractions = 1.0 - np.arange(1, probes + 1) / (probes + 1)
    return sorted({int(allowed[np.argmin(np.abs(allowed - size * f))]) for f in fractions},
                  reverse=True)


def _downstream(model: ir.Model, group: ChannelGroup) -> set[str] | None:
    """Names of the nodes whose computation changes when ``group``'s width does: its
    producers and every node below them (None: the graph has subgraphs or unnamed nodes)."""
    changed: set[int] = {id(t.node) for t in group.ties_with_role(Role.PRODUCER)}
    names: set[str] = set()
    for node in model.graph:
        if subgraphs(node) or not node.name:
            return None
        if id(node) in changed or any(
                v is not None and v.producer() is not None and id(v.producer()) in changed
                for v in node.inputs):
            changed.add(id(node))
            names.add(node.name)
    return names


def _reuse_refits(probe: ir.Model, targets: list[RefitTarget], reuse: ir.Model,
                  changed: set[str]) -> list[RefitTarget]:
    """Write ``reuse``'s refitted weights into the targets above the change; the rest."""
    by_name = {node.name: node for node in reuse.graph}
    remaining = []
    for target in targets:
        source = by_name.get(target.node.name)
        mine = linear_view(target.node)
        theirs = "not in the refitted copy" if source is None else linear_view(source)
        if (target.node.name in changed or isinstance(mine, str) or isinstance(theirs, str)
                or mine.weight.shape != theirs.weight.shape
                or (theirs.bias is not None and not mine.fits_bias)):
            remaining.append(target)
        else:
            mine.write(probe.graph, theirs.weight, theirs.bias)
    return remaining


def pruned_copy(model: ir.Model, ctx: PassContext, opts: PruneOptions,
                 keep: dict[int, np.ndarray], refit: bool,
                 reuse: tuple[ir.Model, int] | None = None,
                 cache: TargetCache | None = None) -> ir.Model:
    """A copy of ``model`` with the channels ``keep`` drops removed (and refitted).

    ``reuse=(refitted, index)``: ``refitted`` is the same plan but for group ``index``,
    already refitted; the consumers above that group's change take its weights instead of
    being refitted again (they see the same inputs and keep the same channels).
    """
    probe = clone_model(model)  # carries the model's inferred shapes: no new inference
    twins = [g for g in analyse_channels(probe, infer=False).groups if g.index in keep]
    if any(g.size != len(keep[g.index]) for g in twins):  # the analysis is deterministic
        raise RuntimeError("channel groups of a copy differ from the model's")
    targets = refit_targets(twins, keep) if refit else []
    changed = None
    if reuse is not None and targets:
        twin = next((g for g in twins if g.index == reuse[1]), None)
        changed = None if twin is None else _downstream(probe, twin)
    for twin in twins:
        if not keep[twin.index].all():
            remove_channels(probe, twin, np.flatnonzero(~keep[twin.index]).tolist())
    if changed is not None:
        targets = _reuse_refits(probe, targets, reuse[0], changed)
    if targets:
        reconstruct(model, probe, targets, ctx.calib, ridge=opts.ridge, positions=opts.positions,
                    batch_size=opts.batch_size, limit=opts.max_samples,
                    input_shapes=ctx.input_shapes, seed=ctx.seed, cache=cache)
    return probe


def _reference(model: ir.Model, ctx: PassContext, opts: PruneOptions) -> list[np.ndarray]:
    """The first graph output of ``model`` per calibration batch (float64)."""
    name = model.graph.outputs[0].name
    return [outs[0][name].astype(np.float64) for outs in stream_segments(
        [model], [name], ctx.calib, input_specs(model, ctx.input_shapes),
        batch_size=opts.batch_size, limit=opts.max_samples)]


def _output_errors(model: ir.Model, probes: list[ir.Model], ctx: PassContext,
                   opts: PruneOptions, reference: list[np.ndarray] | None = None) -> np.ndarray:
    """``|y_probe - y|^2 / |y|^2`` of the first graph output on calibration data.

    ``reference``: ``model``'s outputs per batch (:func:`_reference`), when already known.
    """
    if reference is None:
        reference = _reference(model, ctx, opts)
    name = model.graph.outputs[0].name
    error = np.zeros(len(probes))
    energy = sum(float(np.sum(r ** 2)) for r in reference)
    for b, outs in enumerate(stream_segments(
            probes, [name], ctx.calib, input_specs(model, ctx.input_shapes),
            batch_size=opts.batch_size, limit=opts.max_samples)):
        error += [np.sum((o[name] - reference[b]) ** 2) for o in outs]
    return error / max(energy, 1e-30)


def _copy(m: Measurement, keep: dict[int, np.ndarray],
          reuse: tuple[ir.Model, int] | None = None) -> ir.Model:
    return pruned_copy(m.model, m.fit, m.opts, keep, m.refit, reuse, m.cache)


def _errors(m: Measurement, probes: list[ir.Model]) -> np.ndarray:
    if m.reference is None:
        m.reference = _reference(m.model, m.held, m.opts)
    return _output_errors(m.model, probes, m.held, m.opts, m.reference)


def measured_scores(model: ir.Model, ctx: PassContext, opts: PruneOptions,
                     groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                     context: dict[int, np.ndarray], limits: Limits, refit: bool,
                     measuring: Measurement | None = None,
                     ) -> tuple[dict[int, np.ndarray], float]:
    """Scores whose sums measure the change of the graph output, comparable across groups.

    Per-layer scores order a group's channels but say nothing across groups: a layer's own
    error is amplified or damped by what follows it, and by how thin its neighbours are.
    So, around an operating point ``context`` (the uniform allocation of the same target),
    each group in turn is set to its full width and to a few probe widths, thinned in the
    criterion's order while the other groups keep ``context`` (refitted when the pass
    refits), and the relative energy ``E(r) = |y_r - y|^2 / |y|^2`` of the change of the
    first graph output is measured for ``r`` channels removed (refitted on 3 of every 4
    calibration samples and measured on the 4th, on crops of large images: see
    :func:`measurement`, whose result ``measuring`` may be given to share it).
    ``E(r) - E(0)``, interpolated linearly between probes (the last slope beyond them) and
    made increasing, scores the channel removed ``i``-th by ``E(i + 1) - E(i)``: a chunk's
    score is its measured damage, and the knapsack adds the damages of groups.

    Returns:
        ``(scores, error)``: the measured scores and ``E`` of ``context`` itself.
    """
    m = measuring or measurement(model, ctx, opts, refit)
    operating = _copy(m, context)
    base = float(_errors(m, [operating])[0])
    measured = dict(scores)
    for group in progress(groups, enabled=ctx.progress, desc="prune: measuring groups",
                          unit="group"):
        size, order = group.size, np.argsort(scores[group.index], kind="stable")
        current = int(context[group.index].sum())
        widths = sorted({size, *_probe_widths(size, limits, opts.probes)} - {current},
                        reverse=True)
        if len({*widths, current}) < 2:
            continue  # no narrower width allowed
        probes = []
        for width in widths:
            keep = np.ones(size, dtype=bool)
            keep[order[:size - width]] = False
            probe_keep = dict(context)
            probe_keep[group.index] = keep_every_tensor(group, keep, scores[group.index])
            probes.append(_copy(m, probe_keep, (operating, group.index)))
        errors = dict(zip(widths, _errors(m, probes), strict=True))
        errors[current] = base
        removed = np.array([size - w for w in sorted(errors, reverse=True)], dtype=np.float64)
        damage = np.array([errors[w] for w in sorted(errors, reverse=True)]) - errors[size]
        damage = np.maximum.accumulate(np.maximum(damage, 0.0))
        slope = (damage[-1] - damage[-2]) / max(removed[-1] - removed[-2], 1.0)
        steps = np.arange(size + 1, dtype=np.float64)
        curve = np.interp(steps, removed, damage) + slope * np.maximum(steps - removed[-1], 0)
        increase = _increasing(np.diff(curve))
        tie = 1e-9 * max(float(increase.max()), 1e-30) / size
        values = np.empty(size)
        values[order] = increase + tie * np.arange(size)
        measured[group.index] = values
        logger.debug("group %d: damage %s at %s removed", group.index, damage, removed)
    return measured, base


def measured_error(model: ir.Model, ctx: PassContext, opts: PruneOptions,
                   keep: dict[int, np.ndarray], refit: bool,
                   measuring: Measurement | None = None) -> float:
    """``|y_pruned - y|^2 / |y|^2`` of the first graph output on calibration data once the
    channels ``keep`` drops are removed (and the consumers refitted), on held-out samples
    (see :func:`measurement`)."""
    m = measuring or measurement(model, ctx, opts, refit)
    return float(_errors(m, [_copy(m, keep)])[0])
