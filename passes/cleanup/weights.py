"""Weights made visible: Constant nodes lifted to initializers, and where computed weights are.

* Lifting: a ``Constant`` node (main graph or body) becomes an initializer of its graph under
  the same name, so the weights that exporters such as Paddle2ONNX keep in ``Constant`` nodes
  count as parameters and every later pass sees them as weights. A Constant that is a graph
  output stays (a graph output must be produced by a node), and so do string and sparse
  constants. onnx-ir's ``LiftConstantsToInitializersPass`` does the same job but raises on a
  ``sparse_value`` Constant and knows nothing of the pre-IR-4 rule below, hence this loop.
* Weight cone: the node outputs that are computable from constants alone and reach a weight or
  bias input of a weighted op (:data:`WEIGHT_INPUTS`) through such nodes. Constant folding
  materializes these whatever their size (``max_fold_elements`` holds for every other
  constant): a Conv weight built by ``ConstantOfShape`` and ``Cast``/``Reshape``/``Transpose``
  of initializers is a weight, and passes that rewrite weights need it as one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.ir import FreshNames, is_constant, is_standard, static_shape, subgraphs

#: Op type -> the inputs that hold its weights (weight, bias, normalization parameters).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "BatchNormalization": (1, 2, 3, 4),
}

#: Numeric ``Constant`` attributes other than ``value``, with the dtype ONNX gives them.
_LISTED = {"value_float": ir.DataType.FLOAT, "value_floats": ir.DataType.FLOAT,
           "value_int": ir.DataType.INT64, "value_ints": ir.DataType.INT64}


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor a Constant node holds, or None for string, sparse or reference ones."""
    if len(node.attributes) != 1:
        return None
    (name, attribute), = node.attributes.items()
    if attribute.is_ref():
        return None
    if name == "value":
        tensor = attribute.as_tensor()
        return None if tensor.dtype == ir.DataType.STRING else tensor
    if name in _LISTED:
        return ir.tensor(np.array(attribute.value, dtype=_LISTED[name].numpy()))
    return None


def lift_constants(model: ir.Model) -> int:
    """Turn the Constant nodes of ``model`` (bodies included) into initializers.

    Each becomes an initializer of the graph that held it, keeping its output name, so
    outer-scope reads from bodies still resolve. Models older than IR 4 are left alone (an
    initializer there must also be a graph input, which callers may override).

    Returns:
        How many Constant nodes were lifted.
    """
    if model.ir_version < 4:
        return 0
    lifted = 0
    names: FreshNames | None = None
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Constant" or not is_standard(node) or node.graph is None:
            continue
        out = node.outputs[0]
        tensor = _constant_tensor(node)
        if tensor is None or out.is_graph_output():
            continue
        graph = node.graph
        name = out.name
        if not name or name in graph.initializers:  # unnamed, or a (malformed) clash
            names = names or FreshNames(model.graph)
            name = names(name or "constant")
        value = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)),
                         type=ir.TensorType(tensor.dtype), const_value=tensor)
        out.replace_all_uses_with(value)
        graph.remove(node)
        graph.register_initializer(value)
        lifted += 1
    return lifted


def _computable_outputs(graph: ir.Graph, never_fold: set[str] | None) -> set[int]:
    """Ids of node outputs computable from constants (and static input shapes) alone."""
    computable: set[int] = set()

    def known(value: ir.Value | None) -> bool:
        return value is None or id(value) in computable or is_constant(value)

    for node in graph:
        if not is_standard(node) or subgraphs(node) or node.op_type in (never_fold or ()):
            continue
        static_shape_read = (node.op_type in ("Shape", "Size") and len(node.inputs) == 1
                             and node.inputs[0] is not None
                             and static_shape(node.inputs[0]) is not None)
        if static_shape_read or all(known(v) for v in node.inputs):
            computable.update(id(v) for v in node.outputs)
    return computable


def weight_cone(graph: ir.Graph, never_fold: set[str] | None = None) -> set[int]:
    """Ids of the node outputs of ``graph`` that compute a weight from constants.

    Args:
        graph: The graph (main graph; bodies are not entered).
        never_fold: Op types that folding never evaluates; the cone does not pass them.

    Returns:
        The ids of node outputs computable from constants alone that reach an input listed
        in :data:`WEIGHT_INPUTS` through nodes that are computable too.
    """
    computable = _computable_outputs(graph, never_fold)
    stack: list[ir.Value] = []
    for node in graph:
        for index in WEIGHT_INPUTS.get(node.op_type, ()) if is_standard(node) else ():
            if index < len(node.inputs) and node.inputs[index] is not None:
                stack.append(node.inputs[index])
    cone: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in cone or id(value) not in computable:
            continue
        cone.add(id(value))
        producer = value.producer()
        if producer is not None:
            stack.extend(v for v in producer.inputs if v is not None)
    return cone
