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
not lower it is discarded.

Order. A consumer's rows depend on every refit above it, so consumers are processed in
levels (level = refitted consumers on the longest path above it). One calibration pass per
level runs the original model (targets) and the current pruned model (rows) side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.data import FeedSource
from onnxopt.passes.prune.capture import LinearView, linear_view, truncated_copy
from onnxopt.session import stream_tensors

logger = logging.getLogger(__name__)

__all__ = ["RefitResult", "RefitTarget", "reconstruct", "refit_levels"]


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
    index: int
    target: RefitTarget
    view: LinearView
    gram: np.ndarray
    cross: np.ndarray
    energy: float = 0.0
    rows: int = 0


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


def _solve(system: _System, ridge: float) -> RefitResult:
    view, name = system.view, system.target.node.name or system.target.node.op_type
    theta0 = _theta(view)
    energy = max(system.energy, 1e-30)
    before = _residual(system, theta0) / energy
    inputs = theta0.shape[0] - int(view.fits_bias)
    lam = ridge * float(np.trace(system.gram[:inputs, :inputs])) / max(inputs, 1)
    regulariser = np.zeros(theta0.shape[0])
    regulariser[:inputs] = max(lam, 1e-12)
    lhs = system.gram + np.diag(regulariser)
    rhs = system.cross + regulariser[:, None] * theta0
    try:
        theta = np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        theta = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    after = _residual(system, theta) / energy
    if not np.all(np.isfinite(theta)) or after >= before:
        return RefitResult(name, before, before, system.rows, False, "no improvement")
    out, shape = theta.shape[1], view.weight.shape
    weight = theta[:inputs].T.reshape(out, shape[1], shape[2])
    bias = theta[inputs] if view.fits_bias else None
    view.write(view.node.graph, weight, bias)
    return RefitResult(name, before, after, system.rows, True)


def _accumulate(system: _System, x: np.ndarray, target: np.ndarray,
                coords: np.ndarray) -> None:
    design = _design(system.view, system.view.rows(x, coords))
    system.gram += (design.T @ design).astype(np.float64)
    system.cross += (design.T @ target).astype(np.float64)
    system.energy += float(np.sum(target.astype(np.float64) ** 2))
    system.rows += design.shape[0]


def _chunks(levels: list[list[_System]], rows: int, budget: int) -> list[list[list[_System]]]:
    """Consecutive levels whose cached targets (``rows x kept outputs`` floats) fit ``budget``."""
    chunks: list[list[list[_System]]] = []
    used = budget + 1
    for level in levels:
        size = 4 * rows * sum(len(s.target.kept_outputs) for s in level)
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
                ) -> list[RefitResult]:
    """Refit ``targets`` of ``pruned`` in place so they reproduce ``original``'s outputs.

    The original model's outputs at the sampled rows are computed once per chunk of levels
    (as many as ``cache_bytes`` holds) and reused; each level then runs the pruned model only
    up to the inputs it needs.

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
        cache_bytes: Memory for cached targets.

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
            systems[i] = _System(i, target, view, np.zeros((size, size)),
                                 np.zeros((size, outputs)))
    order = list(systems)
    levels = [[systems[order[k]] for k in level]
              for level in refit_levels(pruned, [systems[i].target.node for i in order])]
    samples = limit or source.num_samples or 512
    options = {"batch_size": batch_size, "limit": limit, "input_shapes": input_shapes}
    for c, chunk in enumerate(_chunks(levels, samples * positions, cache_bytes)):
        flat = [system for level in chunk for system in level]
        outs = [s.target.node.outputs[0].name for s in flat]
        rng = np.random.default_rng([seed, c])
        cached: list[list[tuple[np.ndarray, np.ndarray]]] = []
        for (ys,), _ in stream_tensors([truncated_copy(original, outs)], [outs], source,
                                       show_progress=show_progress, desc="prune: targets",
                                       **options):
            batch = []
            for system, out in zip(flat, outs, strict=True):
                coords = system.view.sample(ys[out].shape, positions, rng)
                target = system.view.outputs(ys[out], coords)[:, system.target.kept_outputs]
                batch.append((coords, np.ascontiguousarray(target)))
            cached.append(batch)
        offset = 0
        for level in chunk:
            ins = [s.target.node.inputs[0].name for s in level]
            model = truncated_copy(pruned, ins)
            batches = stream_tensors([model], [list(dict.fromkeys(ins))], source,
                                     show_progress=show_progress, desc="prune: refit", **options)
            for b, ((xs,), _) in enumerate(batches):
                for k, (system, name) in enumerate(zip(level, ins, strict=True)):
                    coords, target = cached[b][offset + k]
                    _accumulate(system, xs[name], target, coords)
            offset += len(level)
            for system in level:
                result = results[system.index] = _solve(system, ridge)
                logger.debug("refit %s: error %.4g -> %.4g", result.node,
                             result.error_before, result.error_after)
    return [results[i] for i in range(len(targets))]
