"""dead-layers: remove layers whose output cannot matter (cleanup family).

1. An op that returns one of its inputs unchanged is bypassed, when that input already has
   the op's output shape and type (so the op does not broadcast it):

   - residual branches that contribute exactly zero: ``x + z``, ``x - z``, ``Sum(x, z)``
     where ``z`` is provably zero: a constant 0, ``y * 0``, a zero-preserving op of a zero
     tensor, or a tensor whose every channel is 0 by the channel-constant analysis (e.g. a
     branch ending in a BN with ``gamma = beta = 0``);
   - ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0`` with constant operands;
   - Pad by zero, a Slice that keeps every index, a Reshape to the same shape.

2. A node none of whose outputs reaches a graph output is removed, and with it the
   initializers only it read. Bypassed branches go this way.

Activations are assumed finite (``0 * x = 0``), as for every exact zero removal.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.channels import ChannelAnalysis, analyse_channels
from onnxopt.channels.mappings import reshape_dims, slice_bounds
from onnxopt.channels.tie import dims_of, rank_of
from onnxopt.channels.values import ChannelConstants, channel_constants, is_zero_constant
from onnxopt.cost import macs_saved, model_cost
from onnxopt.ir import (
    attr,
    const_array,
    is_standard,
    node_label,
    remove_dead_nodes,
    remove_unused_initializers,
    replace_value,
)
from onnxopt.pass_base import Pass, PassContext, PassResult, register_pass

logger = logging.getLogger(__name__)

#: Ops whose output is zero wherever their (first) input is zero.
ZERO_PRESERVING = frozenset({
    "Relu", "LeakyRelu", "Tanh", "Neg", "Abs", "Identity", "Dropout", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze",
    "Unsqueeze", "Resize", "Slice", "Elu", "HardSwish", "Gelu",
})


@register_pass
class DeadLayersPass(Pass):
    """Bypass ops and residual branches that change nothing; remove unreachable nodes."""

    name = "dead-layers"
    description = "remove zero residual branches, no-op ops and nodes that reach no output"
    exact = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        analysis = analyse_channels(model)
        is_zero = ZeroTest(analysis, channel_constants(analysis))
        start = model_cost(model, ctx.input_shapes)
        graph = model.graph
        bypassed: Counter[str] = Counter()
        declined: set[int] = set()
        for node in list(graph):
            rule = BYPASS_RULES.get(node.op_type) if is_standard(node) else None
            found = rule(node, is_zero) if rule else None
            if found is None or id(node) in declined:
                continue
            source, kind = found
            if replace_value(graph, node.outputs[0], source):
                bypassed[kind] += 1
                logger.debug("bypassed %s (%s)", node_label(node), kind)
            else:
                declined.add(id(node))
                result.refuse(node_label(node), f"{kind}, but the output is a graph output "
                                                "and its input cannot take its place")
        removed = remove_dead_nodes(graph)
        initializers = remove_unused_initializers(graph)
        end = model_cost(model, ctx.input_shapes)
        result.modified = bool(bypassed or removed or initializers)
        result.stats = {
            "bypassed": dict(bypassed),
            "nodes_removed": removed,
            "initializers_removed": initializers,
            "params_saved": start.params - end.params,
            "macs_saved": macs_saved(start, end),
        }
        return result


class ZeroTest:
    """Decides whether a tensor is provably all zeros (memoized)."""

    def __init__(self, analysis: ChannelAnalysis, consts: ChannelConstants) -> None:
        self.analysis = analysis
        self.consts = consts
        self.memo: dict[int, bool] = {}

    def __call__(self, value: ir.Value | None) -> bool:
        if value is None:
            return False
        if id(value) not in self.memo:
            self.memo[id(value)] = False  # cycles cannot occur, but be safe on malformed graphs
            self.memo[id(value)] = self._compute(value)
        return self.memo[id(value)]

    def _compute(self, value: ir.Value) -> bool:
        array = const_array(value)
        if array is not None:
            return array.size > 0 and not np.any(array)
        if value.is_graph_input():
            return False
        for axis in range(rank_of(value) or 0):
            found = self.analysis.lookup(value, axis)
            if found and is_zero_constant(self.consts.member(found[1])):
                return True
        producer = value.producer()
        if producer is None or not is_standard(producer):
            return False
        if producer.op_type == "Mul":
            return any(self(v) for v in producer.inputs)
        if producer.op_type in ZERO_PRESERVING and value.index() == 0:
            return self(producer.inputs[0])
        return False


def _same_shape(value: ir.Value, like: ir.Value) -> bool:
    a, b = dims_of(value), dims_of(like)
    return a is not None and a == b and None not in a and value.dtype == like.dtype


def _all_equal(value: ir.Value | None, number: float) -> bool:
    array = const_array(value)
    return array is not None and array.size > 0 and bool(np.all(array == number))


Bypass = tuple[ir.Value, str] | None
BypassRule = Callable[[ir.Node, ZeroTest], Bypass]


def _kind(zero_operand: ir.Value, constant_kind: str) -> str:
    return constant_kind if const_array(zero_operand) is not None else "zero-branch"


def _add(node: ir.Node, is_zero: ZeroTest) -> Bypass:
    out = node.outputs[0]
    operands = [v for v in node.inputs if v is not None]
    for i, keep in enumerate(operands):
        others = operands[:i] + operands[i + 1:]
        if others and _same_shape(keep, out) and all(is_zero(v) for v in others):
            return keep, _kind(others[0], "add-of-0")
    return None


def _sub(node: ir.Node, is_zero: ZeroTest) -> Bypass:
    x, z = node.inputs[0], node.inputs[1]
    if _same_shape(x, node.outputs[0]) and is_zero(z):
        return x, _kind(z, "add-of-0")
    return None


def _mul(node: ir.Node, is_zero: ZeroTest) -> Bypass:
    for keep, one in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        if _all_equal(one, 1.0) and _same_shape(keep, node.outputs[0]):
            return keep, "mul-by-1"
    return None


def _div(node: ir.Node, is_zero: ZeroTest) -> Bypass:
    x = node.inputs[0]
    if _all_equal(node.inputs[1], 1.0) and _same_shape(x, node.outputs[0]):
        return x, "mul-by-1"
    return None


def _pad(node: ir.Node, is_zero: ZeroTest) -> Bypass:
    x = node.inputs[0]
    pads = attr(node, "pads") if len(node.inputs) < 2 else const_array(node.inputs[1])
    if pads is not None and not np.any(pads) and _same_shape(x, node.outputs[0]):
        return x, "pad-of-0"
    return None


def _slice(node: ir.Node, is_zero: ZeroTest) -> Bypass:
    x = node.inputs[0]
    bounds = slice_bounds(node)
    if bounds is None or not _same_shape(x, node.outputs[0]):
        return None
    full = all(start == 0 and step == 1 and end == dims_of(x)[axis]
               for axis, (start, end, step) in bounds.items())
    return (x, "full-slice") if full else None


def _reshape(node: ir.Node, is_zero: ZeroTest) -> Bypass:
    x = node.inputs[0]
    shape, dims = const_array(node.inputs[1]), dims_of(x)
    if shape is None or dims is None or None in dims:
        return None
    out = reshape_dims(dims, shape.tolist(), bool(attr(node, "allowzero", 0)))
    same = out == dims and node.outputs[0].dtype in (None, x.dtype)
    return (x, "same-reshape") if same else None


BYPASS_RULES: dict[str, BypassRule] = {
    "Add": _add,
    "Sum": _add,
    "Sub": _sub,
    "Mul": _mul,
    "Div": _div,
    "Pad": _pad,
    "Slice": _slice,
    "Reshape": _reshape,
}
"""Op type -> the input an op passes through unchanged (with the kind of no-op), if any."""
