"""Per-channel scales and shifts after a weighted op, folded into its weight and bias.

Algebra. A Conv, ConvTranspose or Gemm computes, per output channel ``o``,
``y[o] = (W * x)[o] + b[o]``, where only the slice of ``W`` that makes channel ``o``
contributes (:mod:`onnxopt.layouts`). A constant ``s`` or ``t`` that varies only along the
output channels (a scalar, or a tensor whose other dims are all 1, as ``[C, 1, 1]`` after a
Conv) then folds:

    y * s  ->  W'[o] = s[o] * W[o],  b'[o] = s[o] * b[o]
    y / s  ->  W'[o] = W[o] / s[o],  b'[o] = b[o] / s[o]     (s has no zero)
    y + t  ->  b'[o] = b[o] + t[o]
    y - t  ->  b'[o] = b[o] - t[o]

and the Mul/Div/Add/Sub node goes. Exporters write BatchNormalization as such a Mul and Add
(caffe2 models), and Paddle's learnable affine blocks as a scalar Mul and Add after a Conv.
MatMul (with a constant right operand, channels on the last axis) takes scales only: it has no
bias, unless both its operands are matrices: ``A @ B + t`` then becomes ``Gemm(A, B, t)``.
An inference BatchNormalization takes the constant into its scale and bias the same way
(``gamma' = s gamma``, ``beta' = s beta + t``), so that fold-bn can then fold it into the Conv
before it. Gemm's effective bias ``beta * C`` becomes ``C'`` with ``beta = 1`` (``C`` may vary over
rows; the constant runs along its last axis).

A weighted op whose output has other readers (or is a graph output) is no match. A match is
refused, and the refusal reported, when a weight that would change is shared with another
node, when the bias is not a constant, or when a divisor has a zero. Main graph only. The
products round differently than the original (``(W x) s`` against ``(s W) x``), as in fold-bn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.ir import (
    FreshNames,
    add_initializer,
    const_array,
    detach_node,
    is_constant,
    is_standard,
    node_label,
    opset_version,
    replace_value,
    used_only_by,
)
from onnxopt.layouts import weight_layout
from onnxopt.pass_base import PassResult
from onnxopt.passes.cleanup.shapes import Dims, rank_of

_FLOATS = frozenset("fd")

#: (output rank, channel axis, channel count) of a producer's output.
Geometry = tuple[int, int, int]


def _linear_geometry(node: ir.Node, weight: np.ndarray, dims: dict[str, Dims]) -> Geometry | None:
    layout = weight_layout(node, weight.ndim)
    if layout is None:
        return None
    if node.op_type == "MatMul":
        rank = rank_of(node.outputs[0], dims)
        if rank is None or weight.ndim != 2:
            return None
        return rank, rank - 1, layout.out_channels(weight.shape)
    rank = 2 if node.op_type == "Gemm" else weight.ndim
    return rank, 1, layout.out_channels(weight.shape)


def _bn_geometry(node: ir.Node, scale: np.ndarray, dims: dict[str, Dims]) -> Geometry | None:
    rank = rank_of(node.inputs[0], dims)
    if rank is None or rank < 2 or scale.ndim != 1:
        return None
    return rank, 1, scale.shape[0]


def _scale_linear(node: ir.Node, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    return weight_layout(node, weight.ndim).scale_outputs(weight, factor)


def _bn_blocker(node: ir.Node, opset: int) -> str | None:
    """Why this BatchNormalization is not a per-channel affine map at inference, or None."""
    if node.attributes.get_int("training_mode", 0) != 0 or (
            opset < 7 and node.attributes.get_int("is_test", 0) != 1):
        return "BatchNormalization is in training mode"
    if opset < 9 and node.attributes.get_int("spatial", 1) != 1:
        return "BatchNormalization has spatial=0"
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return "BatchNormalization training outputs are used"
    return None


@dataclass(frozen=True)
class _Producer:
    """Where a producer keeps what a per-channel scale or shift changes."""

    weight: int  # the input a scale multiplies (per output channel)
    bias: int | None  # the input a shift adds to (None: the op takes scales only)
    large: bool  # the weight is big: refuse rather than copy it when it is shared
    geometry: Callable[[ir.Node, np.ndarray, dict[str, Dims]], Geometry | None]
    scale: Callable[[ir.Node, np.ndarray, np.ndarray], np.ndarray]
    blocker: Callable[[ir.Node, int], str | None] = lambda node, opset: None


#: Producer op type -> its table entry. BatchNormalization takes the constant into its
#: scale and bias; fold-bn then folds it into the Conv before it.
_PRODUCERS: dict[str, _Producer] = {
    "Conv": _Producer(1, 2, True, _linear_geometry, _scale_linear),
    "ConvTranspose": _Producer(1, 2, True, _linear_geometry, _scale_linear),
    "Gemm": _Producer(1, 2, True, _linear_geometry, _scale_linear),
    "MatMul": _Producer(1, None, True, _linear_geometry, _scale_linear),
    "BatchNormalization": _Producer(1, 2, False, _bn_geometry,
                                    lambda node, scale, factor: scale * factor, _bn_blocker),
}


@dataclass(frozen=True)
class _Op:
    """How an elementwise op with a constant acts on weight and bias."""

    scales: bool  # multiplies (or divides) the weight too, not only the bias
    commutes: bool  # the constant may be either operand
    weight: Callable[[np.ndarray], np.ndarray]  # per-channel factor for the weight, from c
    bias: Callable[[np.ndarray, np.ndarray], np.ndarray]  # new bias from (bias, c)


#: Op type -> its action; the constant operand ``c`` is already per output channel.
_OPS: dict[str, _Op] = {
    "Mul": _Op(True, True, lambda c: c, lambda b, c: b * c),
    "Div": _Op(True, False, lambda c: 1.0 / c, lambda b, c: b / c),
    "Add": _Op(False, True, lambda c: c, lambda b, c: b + c),
    "Sub": _Op(False, False, lambda c: c, lambda b, c: b - c),
}


def fold_affine(model: ir.Model, result: PassResult, dims: dict[str, Dims]) -> int:
    """Fold per-channel constant Mul/Div/Add/Sub into the op before them; returns how many.

    Args:
        model: The model, changed in place (main graph).
        result: Receives a refusal for every match that must stay.
        dims: Inferred dims by value name, for ranks the model does not annotate.
    """
    graph = model.graph
    opset = opset_version(model)
    names = FreshNames(graph, values_only=True)
    folded = 0
    for node in list(graph):
        if node.graph is not graph:  # removed by an earlier fold
            continue
        match = _match(node, dims, opset)
        if match is None and _matmul_as_gemm(graph, node, dims, opset):
            match = _match(node, dims, opset)
        if match is None:
            continue
        if isinstance(match, str):
            result.refuse(node_label(node), f"not folded into the op before it: {match}")
            continue
        _apply(graph, node, *match, names)
        folded += 1
    return folded


def _operands(node: ir.Node, op: _Op) -> tuple[ir.Value | None, ir.Value | None]:
    """``(y, c)``: the data operand and the constant one (for Sub/Div, the divisor)."""
    y_index = 1 if op.commutes and not is_constant(node.inputs[1]) else 0
    return node.inputs[y_index], node.inputs[1 - y_index]


def _matmul_as_gemm(graph: ir.Graph, node: ir.Node, dims: dict[str, Dims], opset: int) -> bool:
    """Turn the 2-D MatMul before a per-feature Add/Sub into a Gemm that can take the shift.

    ``A @ B + t`` is ``Gemm(A, B, t)`` when ``A`` and ``B`` are matrices (Gemm needs rank 2).
    Returns whether it did.
    """
    op = _OPS.get(node.op_type)
    if op is None or op.scales or opset < 7 or not is_standard(node) or len(node.inputs) != 2:
        return False
    y, c_value = _operands(node, op)
    if y is None or not is_constant(c_value) or is_constant(y) or not used_only_by(y, [node]):
        return False
    producer = y.producer()
    if producer is None or producer.op_type != "MatMul" or not is_standard(producer) \
            or producer.graph is not graph:
        return False
    a, b = producer.inputs
    weight = const_array(b) if is_constant(b) else None
    c = const_array(c_value)
    if (weight is None or weight.ndim != 2 or weight.dtype.kind not in _FLOATS
            or c.dtype != weight.dtype or rank_of(a, dims) != 2
            or _per_channel(c, 2, 1, weight.shape[1]) is None):
        return False
    gemm = ir.Node("", "Gemm", [a, b], name=producer.name or None)
    out = gemm.outputs[0]
    out.type, out.shape = y.type, y.shape
    graph.insert_before(producer, gemm)
    y.replace_all_uses_with(out)
    detach_node(producer)
    graph.remove(producer)
    out.name = y.name
    return True


def _per_channel(c: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``c`` as ``[channels]`` if broadcasting it against the output varies only along
    ``axis`` and leaves the output shape as it is, else None."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,))


def _input(node: ir.Node, index: int | None) -> ir.Value | None:
    return node.inputs[index] if index is not None and index < len(node.inputs) else None


def _match(node: ir.Node, dims: dict[str, Dims], opset: int,
           ) -> tuple[ir.Node, _Producer, _Op, np.ndarray] | str | None:
    """Producer, its table entry, the op and the per-channel constant; a reason; or None."""
    op = _OPS.get(node.op_type)
    if op is None or not is_standard(node) or len(node.inputs) != 2:
        return None
    y, c_value = _operands(node, op)
    if y is None or not is_constant(c_value) or is_constant(y):
        return None
    # An output read elsewhere too is no match: the constant belongs to whatever computes
    # with it (the ``x + 3`` of a hard-swish), not to the producer.
    producer = y.producer() if used_only_by(y, [node]) else None
    entry = _PRODUCERS.get(producer.op_type) if producer is not None else None
    if entry is None or not is_standard(producer) or producer.graph is not node.graph \
            or (entry.bias is None and not op.scales) or producer.outputs[0] is not y:
        return None
    w_value = _input(producer, entry.weight)
    weight = const_array(w_value) if is_constant(w_value) else None  # not an overridable input
    c = const_array(c_value)
    if weight is None or weight.dtype.kind not in _FLOATS or c.dtype != weight.dtype:
        return None
    geometry = entry.geometry(producer, weight, dims)
    per_channel = None if geometry is None else _per_channel(c, *geometry)
    if per_channel is None:
        return None
    reason = entry.blocker(producer, opset)
    if reason is not None:
        return reason
    bias_value = _input(producer, entry.bias)
    if bias_value is not None and not is_constant(bias_value):
        return f"bias of {node_label(producer)} is not a constant"
    if op.scales and entry.large and not used_only_by(producer.inputs[entry.weight], [producer]):
        return f"weight of {node_label(producer)} is shared with another node"
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        factor = op.weight(per_channel.astype(np.float64))
    if op.scales and not np.all(np.isfinite(factor)):
        return "the divisor has a zero" if node.op_type == "Div" else "the scale is not finite"
    return producer, entry, op, per_channel


def _apply(graph: ir.Graph, node: ir.Node, producer: ir.Node, entry: _Producer, op: _Op,
           c: np.ndarray, names: FreshNames) -> None:
    """Rewrite ``producer``'s weight and bias for ``node``'s constant and drop ``node``."""
    w_value = producer.inputs[entry.weight]
    weight = const_array(w_value)
    calc = np.result_type(weight.dtype, np.float32)
    base = producer.name or w_value.name or "folded"
    if op.scales:
        factor = op.weight(c.astype(np.float64)).astype(calc)
        new_weight = entry.scale(producer, weight.astype(calc), factor)
        producer.replace_input_with(entry.weight, add_initializer(
            graph, f"{base}.scaled", new_weight.astype(weight.dtype), names=names))
    b_value = _input(producer, entry.bias)
    if entry.bias is not None and (b_value is not None or not op.scales):
        old = np.zeros(len(c)) if b_value is None else const_array(b_value).astype(np.float64)
        if producer.op_type == "Gemm" and b_value is not None:
            # C may be [M, N] or [M, 1]: the constant runs along its last axis.
            old = producer.attributes.get_float("beta", 1.0) * old
        if producer.op_type == "Gemm":
            producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        new_bias = op.bias(old, c.astype(np.float64))
        if len(producer.inputs) <= entry.bias:
            producer.resize_inputs(entry.bias + 1)
        producer.replace_input_with(entry.bias, add_initializer(
            graph, f"{base}.shifted", new_bias.astype(weight.dtype), names=names))
    y, z = producer.outputs[0], node.outputs[0]
    detach_node(node)
    if z.is_graph_output():
        replaced = replace_value(graph, z, y)
        assert replaced, "checked by _match: y is a node output read only by this node"
    else:
        z.replace_all_uses_with(y)
    graph.remove(node)
