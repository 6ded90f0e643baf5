"""Small helpers over onnx_ir: constants, initializers, uses, and safe value replacement."""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.opaque_types import (
    attach_opaque_types,
    restore_opaque_types,
    set_aside_opaque_types,
)

#: The names of the default ONNX operator domain.
STANDARD_DOMAINS = ("", "ai.onnx")


def is_standard(node: ir.Node) -> bool:
    """Whether ``node`` is an operator of the default ONNX domain."""
    return node.domain in STANDARD_DOMAINS


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize to ``ModelProto`` (to hand to onnxruntime, the checker or a file)."""
    proto = ir.serde.serialize_model(model)
    restore_opaque_types(proto, model)
    return proto


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    """Deserialize a ``ModelProto`` into onnx_ir (map-typed graph inputs and outputs are
    kept aside and written back by :func:`to_proto`, see :mod:`onnxopt.opaque_types`)."""
    proto, kept = set_aside_opaque_types(proto)
    model = ir.serde.deserialize_model(proto)
    attach_opaque_types(model, kept)
    return model


def clone_model(model: ir.Model) -> ir.Model:
    """A copy of ``model``'s graphs, nodes and values that shares its weight tensors.

    Tensors are never modified in place (passes write new initializers, and
    :func:`const_array` hands out read-only arrays), so sharing them is safe, costs no memory
    for big models, and keeps memory-mapped external weights working (a protobuf round trip
    would lose the folder they are read from).
    """
    return model.clone()


#: Numeric ``Constant`` attributes other than ``value``, with the dtype ONNX gives them.
_CONSTANT_LISTS = {"value_float": np.float32, "value_floats": np.float32,
                   "value_int": np.int64, "value_ints": np.int64}


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant content of ``value`` (initializer or Constant node output), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Constant" or not is_standard(producer):
            return None
        for name, dtype in _CONSTANT_LISTS.items():
            listed = producer.attributes.get(name)
            if listed is not None and not listed.is_ref():
                return np.array(listed.value, dtype=dtype)
        attr = producer.attributes.get("value")
        if attr is None or attr.is_ref():
            return None
        tensor = attr.as_tensor()
    try:
        array = tensor.numpy()
    except Exception:  # string or unsupported tensors are not numeric constants
        return None
    if array.flags.writeable:  # the tensor may be shared with a snapshot: never write into it
        array = array.view()
        array.flags.writeable = False
    return array


def is_constant(value: ir.Value | None) -> bool:
    """Whether ``value`` is an initializer that is not overridable, or a Constant output."""
    if value is None:
        return False
    if value.is_graph_input():
        return False
    return const_array(value) is not None


def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes that read ``value``, in first-use order."""
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


def used_only_by(value: ir.Value, nodes: Iterable[ir.Node]) -> bool:
    """True if every reader of ``value`` is one of ``nodes`` and it is not a graph output."""
    allowed = {id(n) for n in nodes}
    if value.is_graph_output():
        return False
    return all(id(use.node) in allowed for use in value.uses())


def attr(node: ir.Node, name: str, default=None):
    """The Python value of attribute ``name`` of ``node``, or ``default``."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name that no value in ``graph`` uses yet.

    Scans the graph on every call; to name many values, ask one
    ``FreshNames(graph, values_only=True)`` instead (same names).
    """
    taken = {v.name for v in iter_values(graph)}
    if base not in taken:
        return base
    for i in itertools.count(1):
        candidate = f"{base}_{i}"
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")


def iter_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """Every value of the graph: inputs, initializers and node outputs."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def unmatched(graph: ir.Graph, wanted: Iterable[str], *, patterns: bool = False,
              values: bool = False) -> list[str]:
    """Those of ``wanted`` that name no node of ``graph`` (nor, with ``values``, no value).

    For options that name parts of the model (a pass's exclude lists), so that a misspelt
    name is an error instead of an option that silently does nothing. With ``patterns`` the
    entries are fnmatch patterns, else exact names.
    """
    names = {node.name for node in graph if node.name}
    if values:
        names |= {v.name for v in iter_values(graph) if v.name}
    if not patterns:
        return [w for w in wanted if w not in names]
    return [w for w in wanted if not any(fnmatch.fnmatchcase(n, w) for n in names)]


def add_initializer(graph: ir.Graph, base_name: str, array: np.ndarray, *,
                    names: FreshNames | None = None) -> ir.Value:
    """Register ``array`` as a new initializer with a unique name derived from ``base_name``.

    Args:
        graph: The graph that receives the initializer.
        base_name: The name wanted; a ``_<i>`` suffix is added if it is taken.
        array: The initializer's value.
        names: Names already taken, at least every value name of ``graph``; the new name is
            drawn from it and recorded in it. Without it :func:`unique_name` scans the whole
            graph, which is costly when adding many initializers.

    Returns:
        The new initializer value.
    """
    name = unique_name(graph, base_name) if names is None else names(base_name)
    # ascontiguousarray alone turns a 0-d array into shape (1,); keep scalars scalar.
    tensor = ir.tensor(np.ascontiguousarray(array).reshape(np.shape(array)), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def detach_node(node: ir.Node) -> None:
    """Drop every read of ``node`` and of the nodes in its subgraphs (before removing it)."""
    for i in range(len(node.inputs)):
        node.replace_input_with(i, None)
    for sub in subgraphs(node):
        for inner in ir.traversal.RecursiveGraphIterator(sub):
            for i in range(len(inner.inputs)):
                inner.replace_input_with(i, None)


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> bool:
    """Make every reader of ``old`` read ``new``, keeping graph output names stable.

    If ``old`` is a graph output, ``new`` takes its place (and its name) in the output
    list, which is only allowed when ``new`` is a node output that is neither a graph
    input nor already a graph output. Returns False (and changes nothing) otherwise.
    """
    was_output = old.is_graph_output()
    if was_output:
        if new.is_graph_input() or new.is_graph_output() or new.is_initializer():
            return False
        if new.producer() is None:
            return False
        # Swap the output first: onnx_ir refuses replace_all_uses_with on a graph output.
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new
    old.replace_all_uses_with(new)
    if was_output:
        name = old.name
        old.name = None
        new.name = name
        # A graph output must stay typed even when the new producer was never annotated.
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape
    return True


def substitute(graph: ir.Graph, out: ir.Value, nodes: Sequence[ir.Node],
               removed: Sequence[ir.Node]) -> ir.Value:
    """Compute ``out`` with ``nodes`` instead, and remove the nodes that computed it.

    ``nodes`` go right after ``out``'s producer; the first output of the last of them takes
    over ``out``: its readers, its place among the graph outputs, its type, shape and name.
    Then ``removed`` (which nothing else may read) leave the graph.

    Returns:
        The value that now holds ``out``'s name.
    """
    result = nodes[-1].outputs[0]
    result.type, result.shape = out.type, out.shape
    producer = out.producer()
    assert producer is not None, "substitute() replaces a node output"
    graph.insert_after(producer, list(nodes))
    name = out.name
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(list(removed), safe=True)
    result.name = name
    return result


def remove_dead_nodes(graph: ir.Graph) -> int:
    """Remove the nodes of ``graph`` none of whose outputs reaches a graph output.

    A node with subgraphs goes as a whole, together with the outer-scope reads of its
    bodies. A custom-domain node without outputs stays (it may exist for a side effect).
    Nodes inside bodies are not visited. Returns how many nodes were removed.
    """
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if not node.outputs and not is_standard(node):
                continue
            if any(out.uses() or out.is_graph_output() for out in node.outputs):
                continue
            detach_node(node)
            graph.remove(node)
            removed += 1
            changed = True
    return removed


def remove_unused_initializers(graph: ir.Graph) -> int:
    """Drop initializers nobody reads (and that are not graph inputs/outputs)."""
    removed = 0
    for name, value in list(graph.initializers.items()):
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        del graph.initializers[name]
        removed += 1
    return removed


def node_label(node: ir.Node) -> str:
    """A short human label: ``Conv 'name'`` or ``Conv -> out``."""
    if node.name:
        return f"{node.op_type} '{node.name}'"
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type} -> {out}"


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The shape of ``value`` as ints if fully known, else None.

    A negative dim (some exporters write ``-1`` for a dynamic one) is not known.
    """
    if value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int) or d < 0:
            return None
        dims.append(d)
    return tuple(dims)


def opset_version(model: ir.Model, domain: str = "") -> int:
    """The imported opset of ``domain`` (default ONNX), or 0 if not imported."""
    if domain in STANDARD_DOMAINS:
        return int(next((model.opset_imports[d] for d in STANDARD_DOMAINS
                         if d in model.opset_imports), 0))
    return int(model.opset_imports.get(domain, 0))


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held by ``node``'s attributes (If branches, Loop/Scan bodies)."""
    graphs: list[ir.Graph] = []
    for attribute in node.attributes.values():
        if attribute.type == ir.AttributeType.GRAPH:
            graphs.append(attribute.as_graph())
        elif attribute.type == ir.AttributeType.GRAPHS:
            graphs.extend(attribute.as_graphs())
    return graphs


class FreshNames:
    """Hands out names no value or node of a graph (subgraphs included) uses yet.

    Collect once, then ask many times: cheaper than :func:`unique_name` in a loop.

    Args:
        graph: The graph whose names are taken.
        taken: More names to treat as taken.
        values_only: Take only the value names of ``graph`` itself (inputs, initializers and
            node outputs), as :func:`unique_name` does: no node names, no subgraphs.
    """

    def __init__(self, graph: ir.Graph, *, taken: Iterable[str] = (),
                 values_only: bool = False) -> None:
        self.taken: set[str] = {v.name for v in iter_values(graph) if v.name}
        if not values_only:
            for node in ir.traversal.RecursiveGraphIterator(graph):
                self.taken.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self.taken.add(node.name)
                for sub in subgraphs(node):
                    self.taken.update(v.name for v in iter_values(sub) if v.name)
        self.taken.update(taken)

    def __call__(self, base: str) -> str:
        """``base``, or ``base_<i>`` with the smallest free ``i``; the name is then taken."""
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def release(self, name: str) -> None:
        """Make ``name`` free again (the value that held it has left the graph)."""
        self.taken.discard(name)
