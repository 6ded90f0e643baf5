"""Shape-value propagation: the small shape computations ONNX inference leaves unknown, evaluated.

ONNX's data propagation stops at many ops exporters put in shape computations (Cast, Slice of
int32 shapes, ReduceProd, ...), so a Reshape target built from ``Shape`` often stays unknown
even when every input dim is fixed. With the input dims fixed, those small tensors have values:
each graph is walked in order, each node's output types are inferred by its schema with the
values of its inputs known, and a node whose inputs all have values (and whose outputs are
small) is evaluated by onnx's reference implementation. Subgraphs are walked with their outer
scope; an If whose condition has a value takes its branch's types and values, else the dims
both branches agree on. The types found become value infos, for one last full inference.
"""

from __future__ import annotations

import math
import warnings
from collections import ChainMap
from collections.abc import Mapping, MutableMapping

import numpy as np
import onnx

__all__ = ["propagate_shape_values", "type_dims"]

#: Tensors with at most this many elements have their values propagated.
MAX_VALUE_ELEMENTS = 1024

_NON_DETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                                "RandomUniformLike", "Multinomial", "Bernoulli"})

_Types = MutableMapping[str, onnx.TypeProto]
_Values = MutableMapping[str, np.ndarray]


def type_dims(type_: onnx.TypeProto | None) -> tuple[int | None, ...] | None:
    """Dims of a tensor type (``None`` for symbolic or -1 dims), or None without a shape."""
    if type_ is None or not type_.HasField("tensor_type"):
        return None
    tensor_type = type_.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                 for d in tensor_type.shape.dim)


def propagate_shape_values(proto: onnx.ModelProto) -> None:
    """Add value infos, found with shape values evaluated, to ``proto``'s graphs (in place).

    Expects the graphs to carry no stale value infos (drop them first).
    """
    _walk(proto.graph, {}, {}, proto)


def _walk(graph: onnx.GraphProto, types: _Types, values: _Values,
          proto: onnx.ModelProto) -> None:
    """Walk ``graph`` with ``types``/``values`` as its scope; add value infos for what it finds."""
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    for value in graph.input:
        types[value.name] = value.type
    for init in graph.initializer:
        types[init.name] = onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims))
        if math.prod(init.dims) <= MAX_VALUE_ELEMENTS:
            values[init.name] = onnx.numpy_helper.to_array(init)
    declared = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    found_types: dict[str, onnx.TypeProto] = {}
    for node in graph.node:
        if _has_subgraphs(node):
            new_types, new_values = _control_flow(node, types, values, proto)
        else:
            new_values = _node_values(node, types, values, opsets)
            new_types = {name: _array_type(array) for name, array in new_values.items()}
            if any(o and o not in new_values for o in node.output):
                inferred = _node_types(node, types, values, proto)
                new_types.update({k: t for k, t in inferred.items() if k not in new_values})
        values.update(new_values)
        types.update(new_types)
        found_types.update({k: t for k, t in new_types.items() if k not in declared})
    graph.value_info.extend(onnx.helper.make_value_info(name, type_)
                            for name, type_ in found_types.items())


def _has_subgraphs(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


def _control_flow(node: onnx.NodeProto, types: _Types, values: _Values,
                  proto: onnx.ModelProto) -> tuple[dict[str, onnx.TypeProto],
                                                   dict[str, np.ndarray]]:
    """Walk the node's subgraphs in their scope; an If's outputs from its branches."""
    scopes = {}
    for attribute in node.attribute:
        bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else (
            list(attribute.graphs) if attribute.type == onnx.AttributeProto.GRAPHS else [])
        for body in bodies:
            inner_types, inner_values = ChainMap({}, types), ChainMap({}, values)
            _walk(body, inner_types, inner_values, proto)
            scopes[attribute.name] = (body, inner_types, inner_values)
    if node.op_type != "If" or node.domain not in ("", "ai.onnx") or len(scopes) != 2:
        return {}, {}
    cond = values.get(node.input[0])
    if cond is not None and cond.size == 1:
        body, inner_types, inner_values = scopes["then_branch" if bool(cond.reshape(-1)[0])
                                                 else "else_branch"]
        outs = list(zip(node.output, (o.name for o in body.output), strict=False))
        return ({k: inner_types[n] for k, n in outs if n in inner_types},
                {k: inner_values[n] for k, n in outs if n in inner_values})
    (then, then_types, _), (other, other_types, _) = scopes["then_branch"], scopes["else_branch"]
    merged = {}
    for name, a, b in zip(node.output, then.output, other.output, strict=False):
        type_ = _common_type(then_types.get(a.name), other_types.get(b.name))
        if type_ is not None:
            merged[name] = type_
    return merged, {}


def _common_type(a: onnx.TypeProto | None, b: onnx.TypeProto | None) -> onnx.TypeProto | None:
    """The tensor type both branches agree on: dims they differ in become unknown."""
    dims_a, dims_b = type_dims(a), type_dims(b)
    if a is None or b is None or dims_a is None or dims_b is None or len(dims_a) != len(dims_b) \
            or a.tensor_type.elem_type != b.tensor_type.elem_type:
        return None
    dims = [x if x == y else None for x, y in zip(dims_a, dims_b, strict=True)]
    return onnx.helper.make_tensor_type_proto(a.tensor_type.elem_type, dims)


def _array_type(array: np.ndarray) -> onnx.TypeProto:
    return onnx.helper.make_tensor_type_proto(
        onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))


def _node_types(node: onnx.NodeProto, types: Mapping[str, onnx.TypeProto],
                values: Mapping[str, np.ndarray],
                proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The output types the node's schema infers from its input types and values."""
    if node.domain not in ("", "ai.onnx") or any(i and i not in types for i in node.input):
        return {}
    try:
        version = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        schema = onnx.defs.get_schema(node.op_type, version, "")
        return onnx.shape_inference.infer_node_outputs(
            schema, node, {i: types[i] for i in node.input if i},
            {i: onnx.numpy_helper.from_array(values[i], i) for i in node.input if i in values},
            opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    except Exception:  # an op onnx cannot infer here; the full inference may still do it
        return {}


def _node_values(node: onnx.NodeProto, types: Mapping[str, onnx.TypeProto],
                 values: Mapping[str, np.ndarray], opsets: Mapping[str, int],
                 ) -> dict[str, np.ndarray]:
    """The node's output values when they are small and follow from known values."""
    if node.domain not in ("", "ai.onnx") or node.op_type in _NON_DETERMINISTIC:
        return {}
    if node.op_type in ("Shape", "Size"):
        dims = type_dims(types.get(node.input[0]))
        if dims is None or None in dims:
            return {}
        if node.op_type == "Size":
            return {node.output[0]: np.array(math.prod(d for d in dims if d is not None),
                                             dtype=np.int64)}
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(dims))
        return {node.output[0]: np.array(dims[start:end], dtype=np.int64)}
    if node.op_type == "Constant":
        if any(a.type == onnx.AttributeProto.SPARSE_TENSOR or (
                a.type == onnx.AttributeProto.TENSOR and math.prod(a.t.dims) > MAX_VALUE_ELEMENTS)
               for a in node.attribute):
            return {}
    elif not node.input or any(i and i not in values for i in node.input):
        return {}
    try:
        from onnx.reference import ReferenceEvaluator

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # e.g. casts of NaN constants: their business
            outputs = ReferenceEvaluator(node, opsets=dict(opsets)).run(
                None, {i: values[i] for i in node.input if i})
    except Exception:  # an op the reference implementation lacks or refuses: no values
        return {}
    found = {}
    for name, array in zip(node.output, outputs, strict=False):
        array = np.asarray(array)
        if name and array.size <= MAX_VALUE_ELEMENTS and array.dtype != object:
            found[name] = array
    return found
