"""Apply a quantization plan: insert QuantizeLinear/DequantizeLinear and the integer initializers.

For a computed tensor ``t`` with parameters ``(s, z)`` the rewrite is

    t -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> each quantized reader (one DQ each)

Readers that stay float keep reading ``t`` when its producer is float; when its producer is
quantized they read one shared DequantizeLinear (after fusion the float ``t`` no longer exists),
and a graph output ``t`` is renamed so that the DequantizeLinear output carries its name: graph
inputs and outputs stay float. Weights become int8 initializers behind a DequantizeLinear
(``axis`` = output channel when per channel), biases int32 initializers with scale
``s_x * s_w`` and zero point 0, and a constant activation operand (``x + c``) is quantized
offline with its own range. The float constant a quantized copy replaces (an initializer or a
Constant node) goes when nothing else reads it, so the model never carries both copies.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.ir import (
    FreshNames,
    const_array,
    is_constant,
    is_standard,
    remove_unused_initializers,
)
from onnxopt.layouts import gemm_bias, weight_layout
from onnxopt.passes.quantize.placement import NodePlan, Plan
from onnxopt.passes.quantize.scheme import (
    QuantParams,
    activation_params,
    fit_weight_scale_to_bias,
    quantize_bias,
    quantize_weight,
    weight_params,
)

logger = logging.getLogger(__name__)


@dataclass
class BiasSite:
    """A node whose int32 bias bias correction may adjust.

    Attributes:
        node: The Conv/Gemm/ConvTranspose.
        bias_value: The int32 initializer read by the bias DequantizeLinear.
        bias: The float bias per output channel.
        scale: The bias scale ``s_x * s_w``.
        weight: The float weight.
        x_name: The float tensor quantized for the node's activation input.
        y_name: The node's float output in the rewritten graph.
    """

    node: ir.Node
    bias_value: ir.Value
    bias: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    x_name: str
    y_name: str


@dataclass
class Rewritten:
    """What the rewrite did.

    Attributes:
        names: Original tensor name -> name of the same float tensor in the rewritten graph
            (they differ only for renamed graph outputs).
        bias_sites: Nodes with an int32 bias.
        counts: Inserted QuantizeLinear/DequantizeLinear and quantized weights and biases.
        float_removed: Float constants (initializers or Constant nodes) that the integer
            copies replaced and nothing else read, removed from the graph.
    """

    names: dict[str, str] = field(default_factory=dict)
    bias_sites: list[BiasSite] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    float_removed: int = 0


class _Builder:
    """Creates uniquely named initializers and Q/DQ nodes in one graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.name = FreshNames(graph)
        self.counts: Counter = Counter()
        self.removed = 0

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.name(base)
        array = np.asarray(array)
        tensor = ir.tensor(np.ascontiguousarray(array).reshape(array.shape), name=name)
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def params(self, base: str, p: QuantParams) -> tuple[ir.Value, ir.Value]:
        return self.const(f"{base}_scale", p.scale), self.const(f"{base}_zero_point",
                                                                 p.zero_point)

    def _node(self, op: str, inputs: list[ir.Value], base: str, dtype: ir.DataType,
              like: ir.Value | ir.TensorProtocol | None, axis: int | None) -> ir.Value:
        attrs = {} if axis is None else {"axis": axis}
        node = ir.node(op, inputs, attrs, name=self.name(f"{base}_{op}"))
        out = node.outputs[0]
        out.name = self.name(f"{base}_{'quantized' if op == 'QuantizeLinear' else 'dq'}")
        out.type = ir.TensorType(dtype)
        if like is not None and like.shape is not None:
            out.shape = ir.Shape(like.shape)
        self.graph.append(node)
        self.counts[op] += 1
        return out

    def quantize(self, x: ir.Value, scale: ir.Value, zp: ir.Value) -> ir.Value:
        dtype = zp.const_value.dtype  # type: ignore[union-attr]
        return self._node("QuantizeLinear", [x, scale, zp], x.name or "t", dtype, x, None)

    def dequantize(self, q: ir.Value, scale: ir.Value, zp: ir.Value, base: str,
                   axis: int | None = None) -> ir.Value:
        like = q.const_value if q.const_value is not None else q
        return self._node("DequantizeLinear", [q, scale, zp], base, ir.DataType.FLOAT, like,
                          axis)

    def dequantized_const(self, base: str, q: np.ndarray, p: QuantParams,
                          axis: int | None = None) -> ir.Value:
        """An integer initializer behind its own DequantizeLinear."""
        scale, zp = self.params(base, p)
        return self.dequantize(self.const(f"{base}_quantized", q), scale, zp, base, axis)

    def replace_constant(self, node: ir.Node, index: int, new: ir.Value) -> None:
        """Make ``node`` read ``new`` instead of its float constant input ``index``.

        A Constant node left without readers goes at once (float initializers without
        readers go at the end), so the model never carries both copies of a weight.
        """
        old = node.inputs[index]
        node.replace_input_with(index, new)
        if old is None or old.uses() or old.is_graph_output() or old.is_graph_input():
            return
        producer = old.producer()
        if (producer is not None and producer.op_type == "Constant" and is_standard(producer)
                and producer.graph is self.graph):
            self.graph.remove(producer)
            self.removed += 1
        elif old.is_initializer():
            self.removed += 1  # remove_unused_initializers drops it at the end


def apply_plan(graph: ir.Graph, plan: Plan, params: dict[str, QuantParams], *,
               activation_type: str, per_channel: bool, reduce_range: bool,
               add_bias: bool = False) -> Rewritten:
    """Rewrite ``graph`` in place as ``plan`` says.

    Args:
        graph: The float graph the plan was made for.
        plan: The plan.
        params: Group representative -> activation parameters (see :meth:`Plan.group`).
        activation_type: ``uint8`` or ``int8`` (for constant activation operands).
        per_channel: Per-output-channel weight scales where the rule has an axis.
        reduce_range: 7-bit weights.
        add_bias: Give Conv/ConvTranspose/Gemm without a bias a zero int32 bias (so bias
            correction can fill it).
    """
    b = _Builder(graph)
    done = Rewritten()
    produced = {v.name for np_ in plan.nodes for v in np_.quantized_outputs()}
    readers = {(id(np_.node), i) for np_ in plan.nodes for i in np_.activations}
    inputs = {id(np_.node): np_.node.inputs[np_.activations[0]] for np_ in plan.nodes}
    group_consts: dict[str, tuple[ir.Value, ir.Value]] = {}
    for name, value in plan.tensors.items():
        group = plan.group(name)
        if group not in group_consts:
            group_consts[group] = b.params(group, params[group])
        _quantize_tensor(b, graph, value, group_consts[group], readers, name in produced)
        done.names[name] = value.name or name
    for np_ in plan.nodes:
        for i in np_.activations:
            value = np_.node.inputs[i]
            if value is not None and is_constant(value):
                _quantize_constant_input(b, np_.node, i, activation_type)
    for np_ in plan.nodes:
        if np_.weight is not None:
            x = inputs[id(np_.node)]
            x_params = params[plan.group(x.name)] if x is not None and x.name in plan.tensors \
                else None
            site = _quantize_weight_and_bias(b, np_, x_params, per_channel, reduce_range,
                                             add_bias)
            if site is not None and x is not None:
                site.x_name = x.name or ""  # the float tensor (renamed if it was an output)
                done.bias_sites.append(site)
    remove_unused_initializers(graph)
    graph.sort()
    done.counts.update(b.counts)
    done.float_removed = b.removed
    return done


def _quantize_tensor(b: _Builder, graph: ir.Graph, t: ir.Value, consts: tuple[ir.Value, ir.Value],
                     readers: set[tuple[int, int]], producer_quantized: bool) -> None:
    scale, zp = consts
    uses = [(u.node, u.idx) for u in t.uses()]
    q = b.quantize(t, scale, zp)
    per_node: dict[int, ir.Value] = {}
    shared: ir.Value | None = None
    for node, index in uses:
        if (id(node), index) in readers:
            if id(node) not in per_node:
                per_node[id(node)] = b.dequantize(q, scale, zp, t.name or "t")
            node.replace_input_with(index, per_node[id(node)])
        elif producer_quantized:
            if shared is None:
                shared = b.dequantize(q, scale, zp, t.name or "t")
            node.replace_input_with(index, shared)
    if producer_quantized and t.is_graph_output():
        if shared is None:
            shared = b.dequantize(q, scale, zp, t.name or "t")
        name = t.name
        for i, out in enumerate(graph.outputs):
            if out is t:
                graph.outputs[i] = shared
        t.name = b.name(f"{name}_float")
        shared.name = name


def _quantize_constant_input(b: _Builder, node: ir.Node, index: int, activation_type: str) -> None:
    value = node.inputs[index]
    array = const_array(value)
    if array is None:
        return
    p = activation_params(float(array.min(initial=0.0)), float(array.max(initial=0.0)),
                          activation_type)
    base = (value.name if value is not None else None) or f"{node.name}_const{index}"
    b.replace_constant(node, index, b.dequantized_const(base, p.quantize(array), p))
    b.counts["constant operands"] += 1


def _out_channels(np_: NodePlan, weight: np.ndarray) -> int:
    layout = weight_layout(np_.node, weight.ndim)
    assert layout is not None, "only weighted ops have a bias"
    return layout.out_channels(weight.shape)


def _float_bias(np_: NodePlan, weight: np.ndarray, add_bias: bool) -> np.ndarray | None:
    node = np_.node
    if np_.bias is None:
        if not add_bias or np_.rule.bias is None:
            return None
        return np.zeros(_out_channels(np_, weight), np.float32)
    array = const_array(node.inputs[np_.bias])
    assert array is not None, "checked by the placement"
    bias = array.astype(np.float64)
    if node.op_type == "Gemm":
        bias = gemm_bias(node, bias, _out_channels(np_, weight))
        assert not isinstance(bias, str), "checked by the placement"
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return np.asarray(bias, np.float32)


def _quantize_weight_and_bias(b: _Builder, np_: NodePlan, x_params: QuantParams | None,
                              per_channel: bool, reduce_range: bool, add_bias: bool,
                              ) -> BiasSite | None:
    node, w_index, b_index = np_.node, np_.weight, np_.rule.bias
    assert w_index is not None
    w_value = node.inputs[w_index]
    weight = const_array(w_value)
    assert w_value is not None and weight is not None, "checked by the placement"
    weight = weight.astype(np.float32)
    axis = np_.rule.weight_axis(node, weight) if per_channel else None
    wp = weight_params(weight, axis, reduce_range)
    bias = _float_bias(np_, weight, add_bias) if x_params is not None else None
    if bias is not None and x_params is not None:
        wp = fit_weight_scale_to_bias(bias, x_params.scale, wp)
    base = w_value.name or f"{node.name}_weight"
    b.replace_constant(node, w_index, b.dequantized_const(
        base, quantize_weight(weight, wp), wp, axis if wp.scale.ndim else None))
    b.counts["weights"] += 1
    if bias is None or x_params is None or b_index is None:
        return None
    q_bias, scale = quantize_bias(bias, x_params.scale, wp.scale)
    bias_base = f"{node.name or base}_bias"
    bias_axis = 0 if scale.ndim else None
    scale_v, zp_v = b.params(bias_base, QuantParams(scale, np.zeros(scale.shape, np.int32),
                                                    bias_axis))
    q_value = b.const(f"{bias_base}_quantized", q_bias)
    if len(node.inputs) <= b_index:
        node.resize_inputs(b_index + 1)
    b.replace_constant(node, b_index, b.dequantize(q_value, scale_v, zp_v, bias_base, bias_axis))
    b.counts["biases"] += 1
    return BiasSite(node, q_value, bias, scale, weight, "", node.outputs[0].name or "")
