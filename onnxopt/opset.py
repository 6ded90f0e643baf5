"""Opset conversion: upgrade a model's default-domain opset with onnx's version converter."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from onnxopt.cost import infer_shapes
from onnxopt.ir import from_proto, opset_version
from onnxopt.large_weights import call_without_weights, is_large_weight

logger = logging.getLogger(__name__)

class OpsetConversionError(Exception):
    """onnx's version converter cannot bring a model to the wanted opset.

    ``str(error)`` is one line that names the operator blocking the conversion.

    Attributes:
        op_type: That operator, or None when it could not be found.
    """

    def __init__(self, message: str, op_type: str | None = None) -> None:
        super().__init__(message)
        self.op_type = op_type


def convert_opset(model: ir.Model, target: int) -> None:
    """Convert the default-domain opset of ``model`` to ``target`` in place.

    onnx's version converter rewrites every node (also in If/Loop bodies) whose operator
    changed between the two opsets; imports of other domains (``ai.onnx.ml``, custom ones)
    and their nodes are kept as they are. The large weights never enter the converter: it
    sees them as graph inputs, and the converted graph gets the same tensor objects back
    (memory-mapped external weights stay mapped, nothing is copied). The IR version is raised
    to the lowest one that allows ``target``.

    Raises:
        OpsetConversionError: The converter cannot convert some operator; the model is
            unchanged.
    """
    from onnx import version_converter

    current = opset_version(model)
    if current == target:
        return
    graph = model.graph
    weights = {v.name: v.const_value for v in graph.initializers.values()
               if is_large_weight(v.const_value)}
    order = list(graph.initializers)
    probe: dict[str, onnx.ModelProto] = {}

    def convert(proto: onnx.ModelProto) -> onnx.ModelProto:
        # Inferred types may not hold in the new opset (Dropout's mask turns bool at 10).
        for g in _graphs(proto.graph):
            g.ClearField("value_info")
        probe["model"] = proto
        return version_converter.convert_version(proto, target)

    try:
        converted = from_proto(call_without_weights(convert, model))
    except Exception as exc:  # the converter raises RuntimeError/ValueError and C++ asserts
        if "model" not in probe:
            raise  # not the converter: a bug
        raise _conversion_error(exc, probe["model"], current, target) from None
    new_graph = converted.graph
    for value in list(new_graph.inputs):
        if value.name in weights:
            new_graph.inputs.remove(value)
            value.const_value = weights[value.name]
            new_graph.register_initializer(value)
    rank = {name: i for i, name in enumerate(order)}
    values = sorted(new_graph.initializers.values(),
                    key=lambda v: rank.get(v.name or "", len(rank)))
    new_graph.initializers.clear()
    for value in values:
        new_graph.initializers.add(value)
    model.graph = new_graph
    model.functions.clear()
    model.functions.update(converted.functions)
    needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)])
    model.ir_version = max(model.ir_version, needed)
    infer_shapes(model)
    logger.info("converted the model from opset %d to %d", current, target)


#: Where the converter's messages name the operator: "No Adapter ... for Relu" and the
#: adapter that failed ("adapters/scan_8_9.h: adapt_scan_8_9: ...").
_NO_ADAPTER = re.compile(r"No Adapter (?:To|From|For) .*? for (\w+)")
_ADAPTER = re.compile(r"adapt(?:ers/|_)([a-z_]+?)_\d+_\d+")


def _conversion_error(exc: Exception, proto: onnx.ModelProto, current: int,
                      target: int) -> OpsetConversionError:
    text = " ".join(str(exc).split())
    detail = text.rsplit("failed: ", 1)[-1].strip() or type(exc).__name__
    found = _NO_ADAPTER.search(text)
    op = found.group(1) if found else None
    if op is None and (adapter := _ADAPTER.search(text)):
        key = adapter.group(1).replace("_", "")
        op = next((n.op_type for g in _graphs(proto.graph) for n in g.node
                   if n.domain in ("", "ai.onnx") and n.op_type.lower() == key), None)
    if op is None:  # find it by converting the nodes one at a time
        op = _probe_nodes(proto, target)
    where = f"{op} has no conversion" if op else "the converter failed"
    return OpsetConversionError(
        f"cannot convert opset {current} to {target}: {where} ({detail[:160]})", op)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                yield from _graphs(sub)


def _probe_nodes(proto: onnx.ModelProto, target: int) -> str | None:
    """The op type of the first main-graph node the converter fails on alone, if any."""
    from onnx import helper, version_converter

    known = {v.name: v for v in [*proto.graph.input, *proto.graph.value_info,
                                 *proto.graph.output]}
    inits = {t.name: t for t in proto.graph.initializer}
    tried: set[str] = set()
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in tried:
            continue
        tried.add(node.op_type)
        names = [n for n in _read_names(node) if n]
        graph = helper.make_graph(
            [node], "probe",
            [known.get(n) or helper.make_empty_tensor_value_info(n) for n in names
             if n not in inits],
            [known.get(n) or helper.make_empty_tensor_value_info(n) for n in node.output if n],
            [inits[n] for n in names if n in inits])
        single = helper.make_model(graph, opset_imports=proto.opset_import,
                                   ir_version=proto.ir_version)
        try:
            version_converter.convert_version(single, target)
        except Exception:  # this node alone fails: it is the blocker
            return node.op_type
    return None


def _read_names(node: onnx.NodeProto) -> list[str]:
    """Names ``node`` reads, its subgraphs' reads of outer-scope values included."""
    names = list(node.input)
    for a in node.attribute:
        for sub in [a.g] if a.HasField("g") else list(a.graphs):
            inner = {v.name for v in sub.input} | {t.name for t in sub.initializer}
            inner |= {o for n in sub.node for o in n.output}
            names += [n for inner_node in sub.node for n in _read_names(inner_node)
                      if n not in inner]
    return list(dict.fromkeys(names))
