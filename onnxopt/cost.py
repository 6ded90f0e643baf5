"""Parameter, MAC and size counts per node and per model.

MACs are multiply-accumulates per sample at concrete shapes (:mod:`~onnxopt.shapes`: input
dims from ``--input-shape`` or the data, a dynamic leading axis at 1, the rest inferred). A
node whose MACs need a dim that stays unknown has unknown MACs (None), and so has the model:
a symbolic or -1 dim is never multiplied in.

- Conv: ``out_elems * (C_in / groups) * prod(kernel)``
- ConvTranspose: ``in_elems * (C_out / groups) * prod(kernel)``
- Gemm / MatMul: ``M * N * K`` (per batch of the MatMul broadcast)
- pooling: ``out_elems * prod(kernel)``; global pooling: ``in_elems``
- elementwise ops and activations: ``out_elems``
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxopt.ir import attr, const_array, is_standard, node_label, subgraphs
from onnxopt.layouts import weight_layout
from onnxopt.shapes import Dims, ShapeTable, concrete_shapes, numel, static_dims

_DimsOf = Callable[[ir.Value | None], Dims | None]


def _known(dims: Dims | None) -> list[int] | None:
    """``dims`` as ints, or None when the rank or any dim is unknown."""
    if dims is None or None in dims:
        return None
    return [d for d in dims if d is not None]


def _numel(dims_of: _DimsOf, value: ir.Value | None) -> int | None:
    return numel(dims_of(value))


def _conv(node: ir.Node, dims_of: _DimsOf, weight_index: int = 1) -> int | None:
    out, weight = _numel(dims_of, node.outputs[0]), _known(dims_of(node.inputs[weight_index]))
    if out is None or weight is None:
        return None
    return out * math.prod(weight[1:])


def _conv_transpose(node: ir.Node, dims_of: _DimsOf) -> int | None:
    inp, weight = _numel(dims_of, node.inputs[0]), _known(dims_of(node.inputs[1]))
    if inp is None or weight is None:
        return None
    return inp * math.prod(weight[1:])


def _gemm(node: ir.Node, dims_of: _DimsOf) -> int | None:
    a, b = _known(dims_of(node.inputs[0])), _known(dims_of(node.inputs[1]))
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if attr(node, "transA", 0) else (a[0], a[1])
    n = weight_layout(node, 2).out_channels(b)
    return m * n * k


def _matmul(node: ir.Node, dims_of: _DimsOf) -> int | None:
    out, a = _numel(dims_of, node.outputs[0]), _known(dims_of(node.inputs[0]))
    if out is None or a is None or not a:
        return None
    return out * a[-1]


def _pool(node: ir.Node, dims_of: _DimsOf) -> int | None:
    out = _numel(dims_of, node.outputs[0])
    kernel = attr(node, "kernel_shape")
    if out is None or kernel is None:
        return None
    return out * math.prod(kernel)


def _global_pool(node: ir.Node, dims_of: _DimsOf) -> int | None:
    return _numel(dims_of, node.inputs[0])


def _elementwise(node: ir.Node, dims_of: _DimsOf) -> int | None:
    return _numel(dims_of, node.outputs[0]) if node.outputs else 0


_MACS: dict[str, Callable[[ir.Node, _DimsOf], int | None]] = {
    "Conv": _conv,
    "ConvInteger": _conv,
    "QLinearConv": lambda n, dims_of: _conv(n, dims_of, weight_index=3),
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


def node_macs(node: ir.Node, shapes: ShapeTable | None = None) -> int | None:
    """MACs of one node per sample; 0 for ops without arithmetic, None when unknown.

    Dims come from ``shapes`` (see :func:`~onnxopt.shapes.concrete_shapes`), else from the
    IR, where a symbolic or -1 dim is unknown. A node with subgraphs costs its costliest
    branch (If) or one trip of its body (Loop, Scan): an upper bound for If, a lower bound
    for loops; unknown when any branch is.
    """
    if not is_standard(node):
        return 0
    dims_of: _DimsOf = static_dims if shapes is None else shapes.dims
    bodies = subgraphs(node)
    if bodies:
        costs = [[node_macs(n, shapes) for n in body] for body in bodies]
        if any(None in c for c in costs):
            return None
        return max(sum(c for c in body if c is not None) for body in costs)
    fn = _MACS.get(node.op_type)
    if fn is None and node.op_type in _ELEMENTWISE:
        fn = _elementwise
    if fn is None:
        return 0
    try:
        macs = fn(node, dims_of)
    except IndexError:  # an optional input or output the op needs is missing
        return None
    return None if macs is None or macs < 0 else int(macs)


@dataclass
class ModelCost:
    """Cost summary of a model.

    Attributes:
        params: Number of elements in all initializers and numeric Constant nodes (weights),
            subgraphs included.
        weight_bytes: Bytes of those tensors.
        macs: Total MACs per sample; an If counts its costliest branch (worst case).
            None when a node's MACs need a dim that is unknown (see ``macs_unknown``).
        nodes: Node count of the main graph.
        per_node: MACs per node name (or output name when unnamed); None where unknown.
        op_histogram: Node count per op type.
        macs_counted: MACs of the nodes whose MACs are known: ``macs`` when it is known,
            else a lower bound.
        macs_unknown: Why ``macs`` is unknown and what to give (empty when known).
        costed_at: The input shapes the MACs are for (``x:1x3x224x224``).
    """

    params: int
    weight_bytes: int
    macs: int | None
    nodes: int
    per_node: dict[str, int | None] = field(default_factory=dict)
    op_histogram: Counter = field(default_factory=Counter)
    macs_counted: int = 0
    macs_unknown: str = ""
    costed_at: str = ""


def model_cost(model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
               *, shapes: ShapeTable | None = None) -> ModelCost:
    """Parameters, MACs per node and in total, and op histogram of ``model``.

    MACs are per sample at concrete shapes: ``shapes`` if given, else those
    :func:`~onnxopt.shapes.concrete_shapes` infers with ``input_shapes`` (``--input-shape``,
    or shapes taken from the data) fixed. The IR's own shapes are not relied on.

    Raises:
        UserError: ``input_shapes`` does not fit the model's inputs.
    """
    if shapes is None:
        shapes = concrete_shapes(model, input_shapes)
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
    per_node: dict[str, int | None] = {}
    hist: Counter = Counter()
    total = 0
    unknown = ""
    for i, node in enumerate(model.graph):
        hist[node.op_type] += 1
        macs = node_macs(node, shapes)
        key = node.name or (node.outputs[0].name if node.outputs else f"node{i}") or f"node{i}"
        per_node[key] = macs
        if macs is None:
            unknown = unknown or shapes.why_unknown(node_label(node))
        else:
            total += macs
    return ModelCost(params, weight_bytes, None if unknown else total, model.graph.num_nodes(),
                     per_node, hist, macs_counted=total, macs_unknown=unknown,
                     costed_at=shapes.costed_at())


def macs_saved(before: ModelCost, after: ModelCost) -> int | None:
    """``before.macs - after.macs``, or None when either is unknown."""
    if before.macs is None or after.macs is None:
        return None
    return before.macs - after.macs


def infer_shapes(model: ir.Model) -> ir.Model:
    """Run ONNX shape inference and return a model whose values carry the shapes.

    Returns the input model unchanged if inference fails (shapes stay as they were).
    Unlike ``onnx_ir``'s ``ShapeInferencePass`` merge, which sets only ``dtype`` and so
    turns an untyped sequence or optional value into a tensor, a value without a type
    takes the whole inferred type.
    """
    import onnx

    from onnxopt.ir import from_proto
    from onnxopt.large_weights import call_without_weights

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
