"""Parameter, MAC and size counts per node and per model.

MACs are multiply-accumulates for one inference at the shapes shape inference gives;
symbolic dims (usually the batch) count as 1, so the numbers are per sample.

- Conv: ``out_elems * (C_in / groups) * prod(kernel)``
- ConvTranspose: ``in_elems * (C_out / groups) * prod(kernel)``
- Gemm / MatMul: ``M * N * K`` (per batch of the MatMul broadcast)
- pooling: ``out_elems * prod(kernel)``; global pooling: ``in_elems``
- elementwise ops and activations: ``out_elems``
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxopt.ir import attr, const_array, is_standard, subgraphs
from onnxopt.layouts import weight_layout


def _numel(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    total = 1
    for d in value.shape:
        total *= d if isinstance(d, int) else 1
    return total


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in value.shape]


def _conv(node: ir.Node) -> int | None:
    out, weight = _numel(node.outputs[0]), _dims(node.inputs[1])
    if out is None or weight is None:
        return None
    return out * math.prod(weight[1:])


def _conv_transpose(node: ir.Node) -> int | None:
    inp, weight = _numel(node.inputs[0]), _dims(node.inputs[1])
    if inp is None or weight is None:
        return None
    return inp * math.prod(weight[1:])


def _gemm(node: ir.Node) -> int | None:
    a, b = _dims(node.inputs[0]), _dims(node.inputs[1])
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
    n = weight_layout(node, 2).out_channels(b)
    return m * n * k


def _matmul(node: ir.Node) -> int | None:
    out, a = _numel(node.outputs[0]), _dims(node.inputs[0])
    if out is None or a is None or not a:
        return None
    return out * a[-1]


def _pool(node: ir.Node) -> int | None:
    out = _numel(node.outputs[0])
    kernel = attr(node, "kernel_shape")
    if out is None or kernel is None:
        return None
    return out * math.prod(kernel)


def _global_pool(node: ir.Node) -> int | None:
    return _numel(node.inputs[0])


def _elementwise(node: ir.Node) -> int | None:
    return _numel(node.outputs[0]) if node.outputs else None


_MACS: dict[str, Callable[[ir.Node], int | None]] = {
    "Conv": _conv,
    "ConvInteger": _conv,
    "QLinearConv": lambda n: _numel(n.outputs[0]) and _conv_q(n),
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "LpPool": _pool,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    "GlobalLpPool": _global_pool,
}

_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Relu", "LeakyRelu",
    "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Gelu",
    "Softmax", "LogSoftmax", "Exp", "Log", "Sqrt", "Erf", "BatchNormalization",
    "InstanceNormalization", "LayerNormalization", "QuantizeLinear", "DequantizeLinear",
})


def _conv_q(node: ir.Node) -> int | None:
    out, weight = _numel(node.outputs[0]), _dims(node.inputs[3])
    if out is None or weight is None:
        return None
    return out * math.prod(weight[1:])


def node_macs(node: ir.Node) -> int:
    """MACs of one node per sample (0 for shape ops or when shapes are unknown).

    A node with subgraphs costs its costliest branch (If) or one trip of its body
    (Loop, Scan): an upper bound for If, a lower bound for loops.
    """
    if not is_standard(node):
        return 0
    bodies = subgraphs(node)
    if bodies:
        return max(sum(node_macs(n) for n in body) for body in bodies)
    fn = _MACS.get(node.op_type)
    if fn is None and node.op_type in _ELEMENTWISE:
        fn = _elementwise
    if fn is None:
        return 0
    try:
        return int(fn(node) or 0)
    except (IndexError, TypeError):
        return 0


@dataclass
class ModelCost:
    """Cost summary of a model.

    Attributes:
        params: Number of elements in all initializers and numeric Constant nodes (weights),
            subgraphs included.
        weight_bytes: Bytes of those tensors.
        macs: Total MACs per sample; an If counts its costliest branch (worst case).
        nodes: Node count of the main graph.
        per_node: MACs per node name (or output name when unnamed).
        op_histogram: Node count per op type.
    """

    params: int
    weight_bytes: int
    macs: int
    nodes: int
    per_node: dict[str, int] = field(default_factory=dict)
    op_histogram: Counter = field(default_factory=Counter)


def model_cost(model: ir.Model) -> ModelCost:
    """Parameters, MACs per node and in total, and op histogram of ``model``.

    Shapes are read from the IR; run :func:`infer_shapes` first if they may be stale.
    """
    params = 0
    weight_bytes = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            n = math.prod(d if isinstance(d, int) else 1 for d in tensor.shape)
            params += n
            weight_bytes += tensor.nbytes
        for node in graph:  # weights that exporters keep in Constant nodes count too
            if node.op_type == "Constant" and is_standard(node):
                array = const_array(node.outputs[0])
                if array is not None:
                    params += array.size
                    weight_bytes += array.nbytes
    per_node: dict[str, int] = {}
    hist: Counter = Counter()
    total = 0
    for i, node in enumerate(model.graph):
        hist[node.op_type] += 1
        macs = node_macs(node)
        key = node.name or (node.outputs[0].name if node.outputs else f"node{i}") or f"node{i}"
        per_node[key] = macs
        total += macs
    return ModelCost(params, weight_bytes, total, model.graph.num_nodes(), per_node, hist)


def infer_shapes(model: ir.Model) -> ir.Model:
    """Run ONNX shape inference and return a model whose values carry the shapes.

    Returns the input model unchanged if inference fails (shapes stay as they were).
    Unlike ``onnx_ir``'s ``ShapeInferencePass`` merge, which sets only ``dtype`` and so
    turns an untyped sequence or optional value into a tensor, a value without a type
    takes the whole inferred type.
    """
    import onnx

    from onnxopt.ir import call_without_weights, from_proto

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                                 data_prop=True)

    try:
        inferred = from_proto(call_without_weights(infer, model))
    except Exception:  # inference failing must not stop analysis; shapes stay unknown
        return model
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs(), strict=False):
        found = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            new = found.get(name)
            if new is None or new.type is None:
                continue
            tensors = isinstance(value.type, ir.TensorType) and isinstance(new.type, ir.TensorType)
            if value.type is None or tensors:
                value.type = new.type
            if new.shape is not None and value.shape != new.shape:
                value.shape = new.shape
    return model
