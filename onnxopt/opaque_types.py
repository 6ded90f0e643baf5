"""Graph inputs and outputs of map types, which onnx_ir cannot hold, kept aside and restored.

onnx_ir (1.1) raises on map types, so an ``ai.onnx.ml`` model whose ZipMap returns
``seq(map(int64, tensor(float)))`` could not be loaded. Before deserializing, such a graph
input's or output's ``TypeProto`` is taken off the proto and kept in the value's
``meta[OPAQUE_TYPE]`` (which survives ``Model.clone``); after serializing it is written
back. Intermediate ``value_info`` entries of such types are dropped: they are optional.
Passes never need these types: no rewrite touches a map.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import onnx
import onnx_ir as ir

#: ``Value.meta`` key holding the serialized ``TypeProto`` kept aside.
OPAQUE_TYPE = "onnxopt.opaque_type"


def set_aside_opaque_types(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, bytes]]:
    """``(proto without map types, {value name: TypeProto bytes})``; ``proto`` is untouched
    (a copy is made only when it has map types)."""
    if not any(_is_map_type(info.type) for graph in _graphs(proto.graph)
               for info in (*graph.input, *graph.output, *graph.value_info)):
        return proto, {}
    proto = copy.deepcopy(proto)
    kept: dict[str, bytes] = {}
    for graph in _graphs(proto.graph):
        for info in (*graph.input, *graph.output):
            if _is_map_type(info.type):
                kept[info.name] = info.type.SerializeToString()
                info.ClearField("type")
        plain = [info for info in graph.value_info if not _is_map_type(info.type)]
        del graph.value_info[:]
        graph.value_info.extend(plain)
    return proto, kept


def attach_opaque_types(model: ir.Model, kept: dict[str, bytes]) -> None:
    """Record the types :func:`set_aside_opaque_types` took off on the model's values."""
    if not kept:
        return
    for graph in model.graphs():
        for value in (*graph.inputs, *graph.outputs):
            if value.name in kept:
                value.meta[OPAQUE_TYPE] = kept[value.name]


def has_opaque_type(value: ir.Value) -> bool:
    """Whether ``value`` has a type onnx_ir cannot hold (kept aside on load)."""
    return OPAQUE_TYPE in value.meta


def restore_opaque_types(proto: onnx.ModelProto, model: ir.Model) -> None:
    """Write the types kept aside on ``model``'s values back into ``proto``, in place."""
    kept = {value.name: value.meta[OPAQUE_TYPE] for graph in model.graphs()
            for value in (*graph.inputs, *graph.outputs) if has_opaque_type(value)}
    if not kept:
        return
    for graph in _graphs(proto.graph):
        for info in (*graph.input, *graph.output):
            if info.name in kept and not info.HasField("type"):
                info.type.ParseFromString(kept[info.name])


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _graphs(sub)


def _is_map_type(type_proto: onnx.TypeProto) -> bool:
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return True
    if kind in ("sequence_type", "optional_type"):
        return _is_map_type(getattr(type_proto, kind).elem_type)
    return False
