"""The per-op channel tie table: how each ONNX op ties channel axes of its inputs and outputs.

Pass-through ops keep channel ``c`` at position ``c`` (identity ties):

- elementwise unary ops and activations tie every axis of input and output;
- elementwise n-ary ops (Add, Mul, Sum, Max, ..., the SE scale Mul) tie the aligned axes of
  every operand that is not broadcast along that axis (right-aligned numpy broadcasting);
  constant operands become weights sliced along with the channel;
- BatchNormalization and InstanceNormalization tie axis 1 with their per-channel parameters;
- pooling, Pad, Resize and reductions tie the axes they leave untouched.

Weighted ops come from :mod:`~onnxopt.channels.linear` and index mappings from
:mod:`~onnxopt.channels.mappings`. An op that is not in the table, or in a custom
domain, freezes every group that reaches it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.channels.linear import LINEAR_RULES
from onnxopt.channels.mappings import DYNAMIC, MAPPING_RULES
from onnxopt.channels.tie import (
    IN0,
    OUT0,
    NodeTie,
    Port,
    Role,
    TieEntry,
    frozen,
    identity,
    norm_axis,
    positions,
    rank_of,
    size_of,
)
from onnxopt.ir import attr, const_array, is_standard

TieRule = Callable[[ir.Node, Port, int], NodeTie]

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu",
    "Selu", "Celu", "Gelu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Identity",
    "Dropout", "Cast", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Floor", "Ceil",
    "Round", "Sign", "Sin", "Cos",
})
"""Elementwise ops with one data input; extra inputs (Clip bounds) are scalars."""

BROADCAST = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where",
})
"""Elementwise ops with numpy broadcasting over all their inputs."""

POOLING = frozenset({
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
})

REDUCE = frozenset({
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSumExp", "ReduceSumSquare",
})


def _unused_extra_outputs(node: ir.Node) -> bool:
    return all(not v.uses() and not v.is_graph_output() for v in node.outputs[1:])


def unary_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Elementwise unary op: identity on every axis."""
    if port not in (IN0, OUT0):
        return frozen(node, port, axis, f"{node.op_type} parameter varies along the axis")
    if not _unused_extra_outputs(node):
        return frozen(node, port, axis, f"{node.op_type} mask output is used")
    return identity(node, [(IN0, axis), (OUT0, axis)])


def broadcast_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Elementwise n-ary op: right-aligned axes of non-broadcast operands are tied."""
    out_rank = rank_of(node.outputs[0])
    rank = rank_of(port.value(node))
    if out_rank is None or rank is None:
        return frozen(node, port, axis, DYNAMIC)
    out_axis = axis if port.output else axis + out_rank - rank
    n = size_of(node.outputs[0], out_axis)
    entries = [TieEntry(OUT0, out_axis, positions(n))]
    for i, value in enumerate(node.inputs):
        r = rank_of(value)
        if value is None or r is None or out_axis - (out_rank - r) < 0:
            continue
        a = out_axis - (out_rank - r)
        d = size_of(value, a)
        if d == 1 and n != 1:
            if Port(False, i) == port:
                return frozen(node, port, axis, f"{node.op_type} broadcasts the channel axis")
            continue
        entries.append(TieEntry(Port(False, i), a, positions(d)))
    sizes = {None if e.index is None else len(e.index) for e in entries}
    reason = DYNAMIC if None in sizes or len(sizes) > 1 else None
    return NodeTie(node, Role.THROUGH, tuple(entries), frozen=reason)


def _normalization(spatial_ok: bool) -> TieRule:
    def rule(node: ir.Node, port: Port, axis: int) -> NodeTie:
        if port not in (IN0, OUT0) or not _unused_extra_outputs(node):
            return frozen(node, port, axis, f"{node.op_type} in training mode")
        tie = identity(node, [(IN0, axis), (OUT0, axis)])
        if axis >= 2 and not spatial_ok:
            return frozen(node, port, axis, f"{node.op_type} normalizes over axis {axis}")
        if axis != 1 or tie.frozen:
            return tie
        params = tuple(TieEntry(Port(False, i), 0, tie.entries[0].index)
                       for i in range(1, len(node.inputs)) if node.inputs[i] is not None)
        return NodeTie(node, Role.THROUGH, tie.entries + params)
    return rule


def layer_norm_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """LayerNormalization: axes before ``axis`` pass through; normalized axes freeze."""
    rank = rank_of(node.inputs[0])
    if rank is None or port not in (IN0, OUT0) or not _unused_extra_outputs(node):
        return frozen(node, port, axis, DYNAMIC)
    if axis >= norm_axis(int(attr(node, "axis", -1)), rank):
        return frozen(node, port, axis, f"LayerNormalization normalizes over axis {axis}")
    return identity(node, [(IN0, axis), (OUT0, axis)])


def pooling_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Pooling: batch and channel axes pass through; spatial axes are mixed."""
    if port not in (IN0, OUT0) or not _unused_extra_outputs(node):
        return frozen(node, port, axis, f"{node.op_type} indices output depends on channels")
    if axis >= 2:
        return frozen(node, port, axis, f"{node.op_type} mixes axis {axis}")
    return identity(node, [(IN0, axis), (OUT0, axis)])


def pad_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Pad: an axis with zero padding on both sides passes through."""
    rank = rank_of(node.inputs[0])
    pads = attr(node, "pads") if len(node.inputs) < 2 else const_array(node.inputs[1])
    axes_input = node.inputs[3] if len(node.inputs) > 3 else None
    axes = None if axes_input is None else const_array(axes_input)
    if rank is None or pads is None or port not in (IN0, OUT0):
        return frozen(node, port, axis, "Pad amounts are computed at run time")
    pads = np.asarray(pads).tolist()
    axes = list(range(rank)) if axes is None else [norm_axis(int(a), rank) for a in axes]
    count = len(axes)
    for a, begin, end in zip(axes, pads[:count], pads[count:], strict=True):
        if a == axis and (begin or end):
            return frozen(node, port, axis, f"Pad pads axis {axis}")
    return identity(node, [(IN0, axis), (OUT0, axis)])


def resize_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Resize/Upsample: an axis whose size does not change passes through."""
    size_in, size_out = size_of(node.inputs[0], axis), size_of(node.outputs[0], axis)
    if port not in (IN0, OUT0) or size_in is None or size_in != size_out:
        return frozen(node, port, axis, f"{node.op_type} resamples axis {axis}")
    return identity(node, [(IN0, axis), (OUT0, axis)])


def reduce_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Reductions: axes that are not reduced pass through (shifted when keepdims=0)."""
    rank = rank_of(node.inputs[0])
    if rank is None or port not in (IN0, OUT0):
        return frozen(node, port, axis, DYNAMIC)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        if axes is None:
            return frozen(node, port, axis, f"{node.op_type} axes are computed at run time")
    else:
        axes = attr(node, "axes")
    if axes is None or len(axes) == 0:
        reduced = set() if attr(node, "noop_with_empty_axes", 0) else set(range(rank))
    else:
        reduced = {norm_axis(int(a), rank) for a in np.asarray(axes).ravel()}
    keep = bool(attr(node, "keepdims", 1))
    kept = [a for a in range(rank) if keep or a not in reduced]
    in_axis = kept[axis] if port.output else axis
    if in_axis in reduced:
        return frozen(node, port, axis, f"{node.op_type} reduces over axis {in_axis}")
    return identity(node, [(IN0, in_axis), (OUT0, kept.index(in_axis))])


def shape_reader_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Shape and Size read the channel count itself."""
    return frozen(node, port, axis, f"{node.op_type} reads the channel count")


RULES: dict[str, TieRule] = {
    **{op: unary_tie for op in UNARY},
    **{op: broadcast_tie for op in BROADCAST},
    **{op: pooling_tie for op in POOLING},
    **{op: reduce_tie for op in REDUCE},
    "BatchNormalization": _normalization(spatial_ok=True),
    "InstanceNormalization": _normalization(spatial_ok=False),
    "LayerNormalization": layer_norm_tie,
    "Pad": pad_tie,
    "Resize": resize_tie,
    "Upsample": resize_tie,
    "Shape": shape_reader_tie,
    "Size": shape_reader_tie,
    **LINEAR_RULES,
    **MAPPING_RULES,
}
"""Op type (default ONNX domain) -> tie rule."""

def tie_for(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """The tie of ``node`` that contains ``axis`` of the tensor at ``port``.

    Unknown ops and custom-domain ops give a frozen tie with the reason.
    """
    if not is_standard(node):
        return frozen(node, port, axis, f"custom-domain op {node.domain}::{node.op_type}")
    rule = RULES.get(node.op_type)
    if rule is None:
        return frozen(node, port, axis, f"{node.op_type} is not understood")
    return rule(node, port, axis)
