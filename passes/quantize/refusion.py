"""Float nodes onnxruntime would re-fuse into integer kernels, and the readers that prevent it.

onnxruntime's QDQ fusion turns ``DQ -> X -> Q`` into an integer kernel whenever *every* float
input of ``X`` comes from a DequantizeLinear and its output goes *only* to QuantizeLinear
nodes, whether or not this pass meant ``X`` to be quantized: a Softmax between a quantized Mul
and a quantized MatMul becomes QLinearSoftmax, and a Conv left float becomes QLinearConv with
weights onnxruntime quantizes itself (per tensor). So "keep X float" must break one of the two
conditions. The inputs cannot be changed (the producer's float output no longer exists once the
producer is fused), so the output is: ``X``'s output gets no QuantizeLinear, which means its
quantized readers stay float too (their activation would not arrive through a
DequantizeLinear, so onnxruntime cannot fuse them either). Their own outputs may be quantized
again: a node whose input is float is never fused.

Only ops onnxruntime has a QDQ fusion for (:data:`FUSED_BY_ORT`, its integer kernels:
QLinearConv, QLinearSoftmax, QLinearReduceMean, ...) are at risk: a Div or HardSigmoid between
a DequantizeLinear and a QuantizeLinear stays float. Ops that only move or select elements
(Reshape, MaxPool, Slice, ...) are followed through: onnxruntime moves Q/DQ across them, and
whatever it does they compute the same values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxopt.ir import is_constant

if TYPE_CHECKING:
    from onnxopt.passes.quantize.placement import Plan

#: Ops whose result is the same on integers as on floats (they move or select values).
VALUE_PRESERVING = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Slice", "Gather",
    "Split", "Identity", "DepthToSpace", "SpaceToDepth", "Expand", "Tile", "Relu", "Clip",
    "Shape", "Size", "QuantizeLinear", "DequantizeLinear",
})


#: Ops onnxruntime fuses into an integer kernel when they sit between DQ inputs and Q outputs.
FUSED_BY_ORT = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool",
    "GlobalAveragePool", "LeakyRelu", "Sigmoid", "Softmax", "ReduceMean", "Where", "Tanh",
})


def refused_readers(graph: ir.Graph, plan: Plan) -> dict[int, str]:
    """Plan nodes that must stay float so that no float node is re-fused.

    onnxruntime moves Q/DQ pairs through value-preserving ops (its QDQ propagation), so a
    float node's inputs and outputs are followed through chains of them.

    Args:
        graph: The float graph the plan was made for.
        plan: The plan.

    Returns:
        Graph-order index of each plan node that reads (through value-preserving ops) the
        output of a float node onnxruntime would otherwise fuse, with a reason naming it.
    """
    planned = {id(p.node): p for p in plan.nodes}
    absorbed = {id(p.absorbed) for p in plan.nodes if p.absorbed is not None}
    produced = {v.name for p in plan.nodes for v in p.quantized_outputs()}
    index = {id(node): i for i, node in enumerate(graph)}

    def floating(node: ir.Node) -> bool:
        return id(node) not in planned and id(node) not in absorbed

    def arrives_quantized(value: ir.Value) -> bool:
        if value.name in produced:
            return True
        producer = value.producer()
        return (producer is not None and floating(producer)
                and producer.op_type in VALUE_PRESERVING and bool(producer.inputs)
                and producer.inputs[0] is not None and arrives_quantized(producer.inputs[0]))

    def quantized_readers(value: ir.Value) -> list[ir.Node] | None:
        """Plan nodes reading ``value`` (through value-preserving ops), None if any other."""
        if value.is_graph_output():
            return None
        found: list[ir.Node] = []
        for use in value.uses():
            p = planned.get(id(use.node))
            if p is not None and use.idx in p.activations:
                found.append(use.node)
                continue
            if (p is not None or not floating(use.node) or use.idx != 0
                    or use.node.op_type not in VALUE_PRESERVING):
                return None
            for out in use.node.outputs:
                more = quantized_readers(out) if out is not None else []
                if more is None:
                    return None
                found.extend(more)
        return found

    readers: dict[int, str] = {}
    for node in graph:
        if (not floating(node) or node.op_type not in FUSED_BY_ORT
                or node.domain not in ("", "ai.onnx")):
            continue
        inputs = [v for v in node.inputs if v is not None and not is_constant(v)
                  and v.dtype == ir.DataType.FLOAT]
        if not inputs or not all(arrives_quantized(v) for v in inputs):
            continue  # some float input is read as a float: never fused
        found: list[ir.Node] = []
        for value in node.outputs:
            if value is None or not (value.uses() or value.is_graph_output()):
                continue
            more = quantized_readers(value)
            if more is None:
                found = []
                break  # a float reader keeps the output alive: no fusion
            found.extend(more)
        why = (f"reads {node.op_type} '{node.name}', which stays float; onnxruntime would "
               "fuse it into an integer kernel if this node read it quantized")
        for reader in found:
            readers.setdefault(index[id(reader)], why)
    return readers
