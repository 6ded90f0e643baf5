"""Consecutive Slices over different axes merged into one Slice.

``Slice(Slice(x, s1, e1, a1, p1), s2, e2, a2, p2)`` with the axes ``a1`` and ``a2`` disjoint is
``Slice(x, s1 + s2, e1 + e2, a1 + a2, p1 + p2)`` (lists concatenated): slicing different axes
commutes, and each bound is clamped against a dim that the other slice does not change. The
inner Slice goes when every reader of its output is such a Slice (each takes the inner
bounds), every bound must be a true constant, and negative axes need the rank of ``x``.
Opset 10 and later (bounds as inputs). Main graph only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.ir import (
    FreshNames,
    add_initializer,
    const_array,
    consumers,
    detach_node,
    is_constant,
    is_standard,
    opset_version,
)
from onnxopt.passes.cleanup.shapes import Dims, rank_of


def _bounds(node: ir.Node, rank: int | None) -> list[np.ndarray] | None:
    """``[starts, ends, axes, steps]`` as int64 with axes normalized, or None."""
    inputs = [*node.inputs[1:], None, None, None][:4]
    arrays = []
    for value in inputs:
        if value is None:
            arrays.append(None)
            continue
        if not is_constant(value):
            return None
        arrays.append(np.asarray(const_array(value), np.int64).reshape(-1))
    starts, ends, axes, steps = arrays
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    if axes is None:
        axes = np.arange(len(starts), dtype=np.int64)
    if steps is None:
        steps = np.ones(len(starts), np.int64)
    if len(axes) != len(starts) or len(steps) != len(starts):
        return None
    if (axes < 0).any():
        if rank is None:
            return None
        axes = np.where(axes < 0, axes + rank, axes)
    return [starts, ends, axes, steps]


def merge_slices(model: ir.Model, dims: dict[str, Dims]) -> int:
    """Merge Slices into the Slices that read them over other axes; returns how many went.

    An inner Slice goes when every reader of its output is such a Slice (each takes the
    inner bounds along with its own).

    Args:
        model: The model, changed in place (main graph).
        dims: Inferred dims by value name (for the rank behind negative axes).
    """
    if opset_version(model) < 10:
        return 0
    graph = model.graph
    names = FreshNames(graph, values_only=True)
    merged = 0
    for inner in list(graph):
        if inner.op_type != "Slice" or not is_standard(inner) or not inner.inputs \
                or inner.inputs[0] is None:
            continue
        out = inner.outputs[0]
        readers = consumers(out)
        if not readers or out.is_graph_output() or any(
                r.op_type != "Slice" or not is_standard(r) or r.graph is not graph
                or any(v is out for v in r.inputs[1:]) for r in readers):
            continue
        x = inner.inputs[0]
        rank = rank_of(x, dims)
        inner_bounds = _bounds(inner, rank)
        outer_bounds = [_bounds(r, rank) for r in readers]
        if inner_bounds is None or any(
                b is None or set(b[2].tolist()) & set(inner_bounds[2].tolist())
                for b in outer_bounds):
            continue
        for reader, bounds in zip(readers, outer_bounds, strict=True):
            _rewrite(graph, reader, x, inner_bounds, bounds, names)
        detach_node(inner)
        graph.remove(inner)
        merged += 1
    return merged


def _rewrite(graph: ir.Graph, node: ir.Node, x: ir.Value, first: list[np.ndarray],
             second: list[np.ndarray], names: FreshNames) -> None:
    """Make ``node`` slice ``x`` with both sets of bounds."""
    parts = [np.concatenate([a, b]) for a, b in zip(first, second, strict=True)]
    for index, (role, array) in enumerate(zip(("starts", "ends", "axes", "steps"), parts,
                                              strict=True), start=1):
        value = add_initializer(graph, f"{node.name or 'slice'}.{role}", array, names=names)
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
    node.replace_input_with(0, x)
