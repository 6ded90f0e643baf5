"""Dynamic int8 MatMul: the activation's range is measured on each input at run time.

For ``Y = X @ W`` with a constant float weight ``W`` of shape ``[K, N]``:

    s_n = max_k |W[k, n]| / q_max,   W_q[k, n] = round(W[k, n] / s_n)     (int8, per column)
    X_q, s_x, z_x = DynamicQuantizeLinear(X)          (uint8, from this X's own min and max)
    Y = Cast(MatMulInteger(X_q, W_q, z_x), float) * (s_x * s)

``q_max`` is 127, or 63 with ``reduce_range`` (x86 without VNNI, :mod:`.cpu`). onnxruntime
fuses the chain into one ``DynamicQuantizeMatMul`` kernel. No calibration range can be wrong
for an input it did not see: the price is one min/max pass over ``X`` per run, so it pays on
MatMuls whose activation ranges vary from input to input (attention blocks, sequence heads).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.ir import (
    FreshNames,
    const_array,
    is_standard,
    remove_unused_initializers,
    substitute,
)

#: The opset that has DynamicQuantizeLinear (MatMulInteger has been there since 10).
DYNAMIC_OPSET = 11


def dynamic_candidate(node: ir.Node) -> bool:
    """Whether ``node`` is a standard MatMul of a float activation by a constant 2-D weight."""
    if node.op_type != "MatMul" or not is_standard(node) or len(node.inputs) != 2:
        return False
    x, w = node.inputs
    weight = const_array(w)
    if x is None or w is None or weight is None or weight.ndim != 2:
        return False
    if x.producer() is None and not x.is_graph_input():
        return False  # x is itself a constant: folding, not quantization
    return weight.dtype == np.float32  # and so is x: MatMul's inputs share one type


def quantize_dynamic_matmuls(graph: ir.Graph, nodes: list[ir.Node], *,
                             reduce_range: bool) -> int:
    """Rewrite each of ``nodes`` (see :func:`dynamic_candidate`) as a dynamic int8 MatMul.

    Args:
        graph: The graph that holds the nodes.
        nodes: MatMul nodes to rewrite.
        reduce_range: 7-bit weights (``|q| <= 63``).

    Returns:
        The number of nodes rewritten.
    """
    names = FreshNames(graph)
    q_max = 63.0 if reduce_range else 127.0
    done = 0
    for node in nodes:
        if not dynamic_candidate(node):
            continue
        x, w = node.inputs
        weight = const_array(w)
        assert weight is not None and x is not None
        scale = np.abs(weight).max(axis=0) / q_max
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        w_q = np.clip(np.round(weight / scale), -q_max, q_max).astype(np.int8)
        base = node.name or "matmul"

        def const(suffix: str, array: np.ndarray, base: str = base) -> ir.Value:
            name = names(f"{base}_{suffix}")
            tensor = ir.tensor(np.ascontiguousarray(array), name=name)
            value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                             const_value=tensor)
            graph.register_initializer(value)
            return value

        dq = ir.node("DynamicQuantizeLinear", [x], num_outputs=3,
                     name=names(f"{base}_DynamicQuantizeLinear"))
        x_q, x_scale, x_zp = dq.outputs
        for value, suffix, dtype in ((x_q, "quantized", ir.DataType.UINT8),
                                     (x_scale, "scale", ir.DataType.FLOAT),
                                     (x_zp, "zero_point", ir.DataType.UINT8)):
            value.name = names(f"{x.name or base}_{suffix}")
            value.type = ir.TensorType(dtype)
        mm = ir.node("MatMulInteger", [x_q, const("weight_quantized", w_q), x_zp],
                     name=names(f"{base}_MatMulInteger"))
        mm.outputs[0].name = names(f"{base}_int32")
        mm.outputs[0].type = ir.TensorType(ir.DataType.INT32)
        cast = ir.node("Cast", [mm.outputs[0]], {"to": ir.DataType.FLOAT},
                       name=names(f"{base}_Cast"))
        cast.outputs[0].name = names(f"{base}_int32_float")
        cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        scales = ir.node("Mul", [x_scale, const("weight_scale", scale)],
                         name=names(f"{base}_scales"))
        scales.outputs[0].name = names(f"{base}_scales")
        scales.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        mul = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=names(f"{base}_Mul"))
        substitute(graph, node.outputs[0], [dq, mm, cast, scales, mul], [node])
        _drop_constant(graph, w)
        done += 1
    remove_unused_initializers(graph)
    graph.sort()
    return done


def _drop_constant(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the Constant node that produced ``value`` once nothing reads it."""
    producer = value.producer()
    if (not value.uses() and not value.is_graph_output() and producer is not None
            and producer.op_type == "Constant" and producer.graph is graph):
        graph.remove(producer)
