"""Least-squares compensation: refit pruned consumers so their outputs match the unpruned model.

A consumer ``y = M x + b`` (a :class:`~onnxopt.passes.prune.capture.LinearView`) that lost input
channels now reads ``x'`` (the kept inputs, as the *pruned* model computes them, refits above
it included) and should still produce the original model's pre-activation ``y``, restricted
to the output channels it keeps. On sampled rows ``s`` (output locations of calibration
samples), with ``M0, b0`` the pruned weights:

    min_{M', b'}  sum_s |y_s - M' x'_s - b'|^2 + lam |M' - M0|^2,   lam = ridge * tr(H_xx) / D

With ``X = [x', 1]`` (no ``1`` for ops without a bias), ``H = sum X'X``, ``R = sum X'y`` and
``Theta = [M'^T; b']`` this is ``(H + lam I_x) Theta = R + lam Theta0``: the ridge pulls
toward the pruned weights, so a consumer with little data keeps them. The residual before and
after, ``sum|y|^2 - 2 <Theta, R> + <Theta, H Theta>``, needs no further pass; a refit that does
not lower it is discarded. With fewer rows ``N`` than inputs ``D`` (a wide consumer refitted on
a few samples, as the sensitivity probes are) the same solution comes from the rows
themselves, in their ``N``-dimensional space (:func:`_solve_rows`): ``N^2 D`` work instead of
the ``D^2 N`` of ``H`` and the ``D^3`` of its solve.

Order. A consumer's rows depend on every refit above it, so consumers are processed in
levels (level = refitted consumers on the longest path above it). The original model's outputs
at the sampled rows (the targets) are computed in one pass (:class:`.targets.TargetCache`, shareable
between refits of the same data); the pruned model runs level by level through a
:class:`~onnxopt.passes.prune.runner.LevelRunner`, so each of its nodes runs once in all.
Rows are buffered and added to ``H`` and ``R`` in blocks of :data:`FLUSH_ROWS`, so the cost
does not grow with the number of batches (a model with a fixed batch of 1 streams one sample
at a time).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.data import FeedSource
from onnxopt.feeds import input_specs
from onnxopt.passes.prune.capture import LinearView, linear_view
from onnxopt.passes.prune.runner import LevelRunner
from onnxopt.passes.prune.targets import TargetCache
from onnxopt.ridge import ridge_in_sample_space
from onnxopt.session import batch_within

logger = logging.getLogger(__name__)

__all__ = ["RefitResult", "RefitTarget", "reconstruct", "refit_levels"]

#: Rows buffered per consumer before they are added to its normal equations.
FLUSH_ROWS = 4096


@dataclass(eq=False)
class RefitTarget:
    """A consumer to refit.

    Attributes:
        node: The consumer in the pruned model.
        kept_outputs: Indices of the original output channels it still computes.
    """

    node: ir.Node
    kept_outputs: np.ndarray


@dataclass
class RefitResult:
    """Outcome of one refit, errors relative to the target energy on calibration rows.

    Attributes:
        node: Node name.
        error_before: ``|y - M0 x' - b0|^2 / |y|^2`` with the pruned weights.
        error_after: The same with the refitted weights (= before when not refitted).
        rows: Calibration rows used.
        refitted: Whether new weights were written.
        reason: Why not, when not.
    """

    node: str
    error_before: float
    error_after: float
    rows: int
    refitted: bool
    reason: str = ""


@dataclass(eq=False)
class _System:
    """One consumer's refit: its rows, kept until there are more of them than inputs, and
    from then on added up in the normal equations ``gram`` and ``cross``."""

    index: int
    target: RefitTarget
    view: LinearView
    size: int
    outputs: int
    gram: np.ndarray | None = None
    cross: np.ndarray | None = None
    energy: float = 0.0
    rows: int = 0
    pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    pending_rows: int = 0


def refit_levels(model: ir.Model, nodes: Sequence[ir.Node]) -> list[list[int]]:
    """Indices of ``nodes`` grouped by level (refitted nodes on the longest path above)."""
    wanted = {id(n): i for i, n in enumerate(nodes)}
    depth: dict[int, int] = {}
    for node in model.graph:
        level = 0
        for value in node.inputs:
            producer = None if value is None else value.producer()
            if producer is not None and id(producer) in depth:
                level = max(level, depth[id(producer)] + (id(producer) in wanted))
        depth[id(node)] = level
    levels: dict[int, list[int]] = {}
    for node in nodes:
        levels.setdefault(depth.get(id(node), 0), []).append(wanted[id(node)])
    return [levels[k] for k in sorted(levels)]


def _design(view: LinearView, rows: np.ndarray) -> np.ndarray:
    flat = rows.reshape(rows.shape[0], -1).astype(np.float32)
    if view.fits_bias:
        flat = np.concatenate([flat, np.ones((flat.shape[0], 1), np.float32)], axis=1)
    return flat


def _theta(view: LinearView) -> np.ndarray:
    weight = view.weight.reshape(view.weight.shape[0], -1).T
    return np.vstack([weight, view.bias[None]]) if view.fits_bias else weight


def _residual(system: _System, theta: np.ndarray) -> float:
    return float(system.energy - 2.0 * np.sum(theta * system.cross)
                 + np.sum(theta * (system.gram @ theta)))


def _ridge(inputs_energy: float, inputs: int, ridge: float) -> float:
    """``lam``: ``ridge`` times the mean energy of an input column (``tr(H_xx) / D``)."""
    return max(ridge * inputs_energy / max(inputs, 1), 1e-12)


def _solve(system: _System, ridge: float) -> RefitResult:
    if system.gram is None and 0 < system.rows < system.size:
        try:
            return _solve_rows(system, ridge)
        except np.linalg.LinAlgError:
            pass  # the normal equations below fall back to least squares
    _flush(system)
    if system.gram is None or system.cross is None:  # no rows at all
        system.gram = np.zeros((system.size, system.size))
        system.cross = np.zeros((system.size, system.outputs))
    view = system.view
    theta0 = _theta(view)
    energy = max(system.energy, 1e-30)
    before = _residual(system, theta0) / energy
    inputs = theta0.shape[0] - int(view.fits_bias)
    lam = _ridge(float(np.trace(system.gram[:inputs, :inputs])), inputs, ridge)
    regulariser = np.zeros(theta0.shape[0])
    regulariser[:inputs] = lam
    lhs = system.gram + np.diag(regulariser)
    rhs = system.cross + regulariser[:, None] * theta0
    try:
        theta = np.linalg.solve(lhs, rhs)
        # H theta = R + lam (theta0 - theta) at the solution: no second D x D product
        after = float(system.energy - np.sum(theta * system.cross)
                      + np.sum(theta * (regulariser[:, None] * (theta0 - theta)))) / energy
    except np.linalg.LinAlgError:
        theta = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
        after = _residual(system, theta) / energy
    return _write(system, theta, before, after)


def _solve_rows(system: _System, ridge: float) -> RefitResult:
    """The refit of :func:`_solve` from fewer rows than inputs, in the space of the rows.

    The bias is not pulled toward anything, so it is the mean residual: centering the rows
    and the residual ``E = y - X Theta0`` removes it, and the weights' change is the ridge
    solution ``dM^T = Xc^T (Xc Xc^T + lam I)^-1 Ec`` (``N x N``), the same as from the
    normal equations. Raises ``LinAlgError`` if that system is singular.
    """
    view = system.view
    design = np.concatenate([d for d, _ in system.pending]).astype(np.float64)
    target = np.concatenate([t for _, t in system.pending]).astype(np.float64)
    theta0 = _theta(view)
    inputs = theta0.shape[0] - int(view.fits_bias)
    energy = max(system.energy, 1e-30)
    residual = target - design @ theta0
    before = float(np.sum(residual ** 2)) / energy
    x = design[:, :inputs]
    lam = _ridge(float(np.sum(x ** 2)), inputs, ridge)
    change, shift = ridge_in_sample_space(x, residual, lam, intercept=view.fits_bias)
    theta = theta0.copy()
    theta[:inputs] += change
    if view.fits_bias:
        theta[inputs] += shift
    after = float(np.sum((target - design @ theta) ** 2)) / energy
    return _write(system, theta, before, after)


def _write(system: _System, theta: np.ndarray, before: float, after: float) -> RefitResult:
    """Write the refitted ``theta`` into the consumer, unless it does not lower the error."""
    view, name = system.view, system.target.node.name or system.target.node.op_type
    inputs = theta.shape[0] - int(view.fits_bias)
    if not np.all(np.isfinite(theta)) or after >= before:
        return RefitResult(name, before, before, system.rows, False, "no improvement")
    out, shape = theta.shape[1], view.weight.shape
    weight = theta[:inputs].T.reshape(out, shape[1], shape[2])
    bias = theta[inputs] if view.fits_bias else None
    view.write(view.node.graph, weight, bias)
    return RefitResult(name, before, after, system.rows, True)


def _flush(system: _System) -> None:
    if not system.pending:
        return
    design = np.concatenate([d for d, _ in system.pending])
    target = np.concatenate([t for _, t in system.pending])
    if system.gram is None or system.cross is None:
        system.gram = np.zeros((system.size, system.size))
        system.cross = np.zeros((system.size, system.outputs))
    system.gram += (design.T @ design).astype(np.float64)
    system.cross += (design.T @ target).astype(np.float64)
    system.pending, system.pending_rows = [], 0


def _accumulate(system: _System, x: np.ndarray, target: np.ndarray,
                coords: np.ndarray) -> None:
    design = _design(system.view, system.view.rows(x, coords))
    system.energy += float(np.sum(target.astype(np.float64) ** 2))
    system.rows += design.shape[0]
    system.pending.append((design, target))
    system.pending_rows += design.shape[0]
    # rows are kept while they are fewer than the inputs (solved in their own space)
    if system.pending_rows >= FLUSH_ROWS and (system.gram is not None
                                              or system.rows >= system.size):
        _flush(system)


def _chunks(levels: list[list[_System]], rows: int, budget: int) -> list[list[list[_System]]]:
    """Consecutive levels whose cached targets (``rows x outputs`` floats) fit ``budget``."""
    chunks: list[list[list[_System]]] = []
    used = budget + 1
    for level in levels:
        size = 4 * rows * sum(s.view.weight.shape[0] for s in level)
        if used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(level)
        used += size
    return chunks


def reconstruct(original: ir.Model, pruned: ir.Model, targets: Sequence[RefitTarget],
                source: FeedSource, *, ridge: float = 1e-2, positions: int = 16,
                batch_size: int = 32, limit: int | None = None, max_inputs: int = 4096,
                input_shapes: Mapping[str, tuple[int, ...]] | None = None, seed: int = 0,
                show_progress: bool = False, cache_bytes: int = 256 << 20,
                frontier_bytes: int = 1 << 30, cache: TargetCache | None = None,
                ) -> list[RefitResult]:
    """Refit ``targets`` of ``pruned`` in place so they reproduce ``original``'s outputs.

    Args:
        original: The unpruned model; its tensors carry the same names.
        pruned: The pruned model holding the target nodes (rewritten in place).
        targets: Consumers to refit.
        source: Calibration feeds.
        ridge: Relative ridge toward the pruned weights.
        positions: Output locations sampled per sample and Conv.
        batch_size: Batch size when the batch axis is dynamic.
        limit: At most this many samples per pass.
        max_inputs: Consumers with more inputs (``kept channels x kernel``) are skipped.
        input_shapes: Concrete shapes of dynamic inputs.
        seed: Seed of the position sampling.
        show_progress: Allow a progress bar.
        cache_bytes: Memory for cached targets (levels are refitted in chunks that fit).
        frontier_bytes: Memory for the pruned model's activations kept between levels.
        cache: Targets shared with other refits on the same data (its sampling settings
            replace ``positions``, ``seed``, ``batch_size`` and ``limit``); None makes a
            private one.

    Returns:
        One result per target, in the order given.
    """
    results: dict[int, RefitResult] = {}
    systems: dict[int, _System] = {}
    for i, target in enumerate(targets):
        view = linear_view(target.node)
        name = target.node.name or target.node.op_type
        if isinstance(view, str):
            results[i] = RefitResult(name, 0.0, 0.0, 0, False, view)
        elif view.weight[0].size > max_inputs:
            results[i] = RefitResult(name, 0.0, 0.0, 0, False,
                                     f"{view.weight[0].size} inputs > max {max_inputs}")
        else:
            size = view.weight[0].size + int(view.fits_bias)
            outputs = len(target.kept_outputs)
            systems[i] = _System(i, target, view, size, outputs)
    order = list(systems)
    levels = [[systems[order[k]] for k in level]
              for level in refit_levels(pruned, [systems[i].target.node for i in order])]
    shared = cache is not None
    if cache is None:
        outputs = [s.target.node.outputs[0].name for s in systems.values()]
        if outputs:
            batch_size = batch_within(original, outputs, source, batch_size,
                                      input_shapes=input_shapes)
        cache = TargetCache(original, source, input_shapes, positions=positions, seed=seed,
                            batch_size=batch_size, limit=limit, show_progress=show_progress)
    by_name = {v.name: node for node in original.graph for v in node.outputs}
    runner = LevelRunner(
        pruned, [[s.target.node.inputs[0].name for s in level] for level in levels],
        cache.source, input_specs(pruned, input_shapes), batch_size=cache.batch_size,
        limit=cache.limit, cache_bytes=frontier_bytes, show_progress=show_progress,
        desc="prune: refit")
    samples = cache.limit or source.num_samples or 512
    chunks = [levels] if shared else _chunks(levels, samples * cache.positions, cache_bytes)
    k = 0
    for chunk in chunks:
        outs = [s.target.node.outputs[0].name for level in chunk for s in level]
        views = {}
        for name in outs:
            node = by_name.get(name)
            view = linear_view(node) if node is not None else "missing"
            if isinstance(view, str):
                raise ValueError(f"{name!r} is not the output of a linear consumer in the "
                                 "original model")
            views[name] = view
        cache.ensure(views)
        for level in chunk:
            for b, xs in enumerate(runner.run(k)):
                for system in level:
                    coords, y = cache.rows[system.target.node.outputs[0].name][b]
                    _accumulate(system, xs[system.target.node.inputs[0].name],
                                y[:, system.target.kept_outputs], coords)
            k += 1
            for system in level:
                result = results[system.index] = _solve(system, ridge)
                logger.debug("refit %s: error %.4g -> %.4g", result.node,
                             result.error_before, result.error_after)
        if not shared:
            cache.drop(outs)
    return [results[i] for i in range(len(targets))]
