"""Constant folding and constant-condition If inlining: the evaluating steps of ``cleanup``.

* Constant folding: ``f(c1, ..., cn)`` with every input a true constant (initializer that is
  not a graph input, or Constant output) becomes one new initializer holding ``f``'s value,
  computed by onnxruntime on a one-node model (the ONNX reference evaluator if onnxruntime
  cannot run it). ``Shape``/``Size`` of a graph input with a static declared shape fold too,
  since onnxruntime enforces declared input dims. Not folded, and counted per reason in
  ``fold_skipped``: custom domains, nodes with subgraphs, random ops, quantize/dequantize
  (onnxruntime needs those patterns to pick integer kernels), results above
  ``max_fold_elements``, non-numeric results and evaluation failures. A folded graph output
  becomes a ``Constant`` node of the same name (a graph output must be produced by a node).
* ``If(c)`` with a constant condition ``c`` is its taken branch: the branch's nodes and
  initializers move into the main graph (renamed if a name is taken anywhere in the model)
  and readers of the If outputs read the branch outputs. The ``cleanup`` pass alternates
  folding and inlining, so a condition computed from folded shapes is resolved. This matters
  beyond tidiness: onnxruntime inlines such an If itself when it loads the model, and then
  runs data-dependent shape inference on the branch with constant inputs it never saw as
  constants before (an exported ``Range`` fed a ``[1]`` tensor instead of a scalar is
  rejected at load time). Inlining it here lets folding evaluate those nodes with the kernels
  instead.

Both work on the main graph only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from onnxopt.ir import (
    FreshNames,
    add_initializer,
    const_array,
    detach_node,
    is_constant,
    is_standard,
    iter_values,
    node_label,
    opset_version,
    replace_value,
    static_shape,
    subgraphs,
)
from onnxopt.pass_base import PassResult
from onnxopt.passes.cleanup.weights import weight_cone
from onnxopt.session import make_session

logger = logging.getLogger(__name__)

#: Op types that are never folded, with the reason counted in ``fold_skipped``.
_NEVER_FOLD: dict[str, str] = {
    "RandomNormal": "random",
    "RandomUniform": "random",
    "RandomNormalLike": "random",
    "RandomUniformLike": "random",
    "Multinomial": "random",
    "Bernoulli": "random",
    "Dropout": "random",  # only training-mode Dropout survives the bypass step
    "QuantizeLinear": "quantization",
    "DequantizeLinear": "quantization",
    "DynamicQuantizeLinear": "quantization",
}


def _shape_of(shape: tuple[int, ...], node: ir.Node) -> np.ndarray:
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    return np.array(shape[start:end], dtype=np.int64)


def _size_of(shape: tuple[int, ...], node: ir.Node) -> np.ndarray:
    return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)


#: Ops whose value depends only on the (static) shape of their single input.
_SHAPE_OPS: dict[str, Callable[[tuple[int, ...], ir.Node], np.ndarray]] = {
    "Shape": _shape_of,
    "Size": _size_of,
}


# -- constant folding -------------------------------------------------------------------------


def fold_constants(model: ir.Model, max_elements: int, skipped: dict[str, int],
                   seen: set[int]) -> tuple[int, int]:
    """Fold main-graph nodes with constant inputs into initializers.

    ``max_elements`` does not apply to nodes that compute a weight
    (:func:`~onnxopt.passes.cleanup.weights.weight_cone`): those are materialized whatever
    their size. ``seen`` holds the ids of nodes already tried (kept across calls, so a
    refusal is counted once).

    Returns:
        How many nodes were folded, and how many of them were weights above the limit.
    """
    graph = model.graph
    # The value names of the main graph, kept current below: one scan per call, not per fold.
    names = FreshNames(graph, values_only=True)
    cone = weight_cone(graph, set(_NEVER_FOLD))
    folded = materialized = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if id(node) in seen or node.op_type == "Constant":
                continue
            shape_input = _static_graph_input(node)
            if shape_input is None and not all(
                    v is None or is_constant(v) for v in node.inputs):
                continue
            seen.add(id(node))
            weight = any(id(out) in cone for out in node.outputs)
            limit = None if weight else max_elements
            reason = _fold_blocker(node, limit)
            arrays = None
            if reason is None:
                if shape_input is not None:
                    arrays = [_SHAPE_OPS[node.op_type](shape_input, node)]
                else:
                    arrays = _evaluate(model, node)
                reason = _result_blocker(arrays, limit)
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                logger.debug("not folding %s: %s", node_label(node), reason)
                continue
            if weight and any(a is not None and a.size > max_elements for a in arrays):
                materialized += 1
            replace_by_constants(graph, node, arrays, names)
            folded += 1
            changed = True
    return folded, materialized


def _static_graph_input(node: ir.Node) -> tuple[int, ...] | None:
    """The static shape of a Shape/Size node's input when that input is a graph input."""
    if node.op_type not in _SHAPE_OPS or not is_standard(node):
        return None
    if len(node.inputs) != 1 or node.inputs[0] is None or not node.inputs[0].is_graph_input():
        return None
    return static_shape(node.inputs[0])


def _fold_blocker(node: ir.Node, max_elements: int | None) -> str | None:
    """Why ``node`` must not be folded, judged before evaluating it (None: no size limit)."""
    if not is_standard(node):
        return "custom_domain"
    if subgraphs(node):
        return "subgraph"
    if node.op_type in _NEVER_FOLD:
        return _NEVER_FOLD[node.op_type]
    if any(out.type is not None and not isinstance(out.type, ir.TensorType)
           for out in node.outputs):
        return "unsupported_type"
    for out in node.outputs:
        shape = static_shape(out)
        if (max_elements is not None and shape is not None
                and int(np.prod(shape, dtype=np.int64)) > max_elements):
            return "too_large"
    return None


def _result_blocker(arrays: list[np.ndarray] | None, max_elements: int | None) -> str | None:
    if arrays is None:
        return "failed"
    for array in arrays:
        if array is None:
            continue
        if array.dtype.kind in "OSUV":
            return "unsupported_type"
        if max_elements is not None and array.size > max_elements:
            return "too_large"
    return None


def _evaluate(model: ir.Model, node: ir.Node) -> list[np.ndarray] | None:
    """Run ``node`` alone on its constant inputs; None if no evaluator can."""
    feeds: dict[str, np.ndarray] = {}
    inputs: list[onnx.ValueInfoProto] = []
    input_names: list[str] = []
    for i, value in enumerate(node.inputs):
        array = const_array(value)
        if array is None:
            input_names.append("")
            continue
        name = f"in{i}"
        input_names.append(name)
        feeds[name] = array
        inputs.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape))
    # An unnamed output slot is one the op must not compute: keep it unnamed.
    output_names = [f"out{i}" if value.name else "" for i, value in enumerate(node.outputs)]
    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend(input_names)
    del proto.output[:]
    proto.output.extend(output_names)
    outputs = [onnx.ValueInfoProto(name=name) for name in output_names if name]
    tiny = helper.make_model(
        helper.make_graph([proto], "fold", inputs, outputs),
        opset_imports=[helper.make_opsetid("", opset_version(model))],
        ir_version=model.ir_version,
    )
    values: list[np.ndarray] | None = None
    try:
        session = make_session(tiny, threads=1,
                               graph_optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        values = session.run(None, feeds)
    except Exception as error:  # unsupported by onnxruntime: try the reference evaluator
        logger.debug("onnxruntime cannot fold %s (%s)", node_label(node), error)
        try:
            from onnx.reference import ReferenceEvaluator

            values = list(ReferenceEvaluator(tiny).run(None, feeds))
        except Exception as error2:
            logger.debug("reference evaluator cannot fold %s (%s)", node_label(node), error2)
            return None
    # Sequences, maps and optionals come back as lists, dicts or None: not initializers.
    named = iter(np.asarray(v) if isinstance(v, np.ndarray | np.generic)
                 else np.empty(0, dtype=object) for v in values)
    return [next(named) if name else None for name in output_names]


def replace_by_constants(graph: ir.Graph, node: ir.Node, arrays: list[np.ndarray | None],
                          names: FreshNames) -> None:
    """Swap ``node`` for one initializer per used output (keeping the output names).

    A graph output becomes the output of a new ``Constant`` node instead, which takes over
    its name and its place in the output list. ``names`` holds the value names of ``graph``
    and is kept so.
    """
    olds = list(node.outputs)
    for old, array in zip(olds, arrays, strict=True):
        if array is not None and old.is_graph_output():
            constant = ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor(array))])
            graph.insert_before(node, constant)
            replaced = replace_value(graph, old, constant.outputs[0])
            assert replaced, "a new Constant output is neither a graph input nor an output"
    detach_node(node)
    graph.remove(node)
    for old in olds:
        if old.name:  # not handed to a Constant: it left the graph with the node
            names.release(old.name)
    for old, array in zip(olds, arrays, strict=True):
        if array is None or not old.uses():
            continue
        new = add_initializer(graph, old.name or "folded", array, names=names)
        old.replace_all_uses_with(new)


# -- If with a constant condition ---------------------------------------------------------------


def inline_constant_ifs(model: ir.Model, result: PassResult,
                        tried: set[int]) -> tuple[int, list[ir.Node]]:
    """Replace main-graph If nodes whose condition is constant by their taken branch.

    Returns how many were inlined and the nodes moved into the main graph. An If that
    cannot be inlined is refused once (its id goes into ``tried``).
    """
    graph = model.graph
    inlined = 0
    moved: list[ir.Node] = []
    for node in list(graph):
        if (node.op_type != "If" or not is_standard(node) or id(node) in tried
                or not node.inputs or not is_constant(node.inputs[0])):
            continue
        cond = const_array(node.inputs[0])
        if cond is None or cond.size != 1:
            continue
        tried.add(id(node))
        attribute = node.attributes.get("then_branch" if bool(cond.reshape(-1)[0])
                                        else "else_branch")
        branch = attribute.as_graph() if attribute is not None else None
        reason = "it has no such branch" if branch is None else _inline_blocker(node, branch)
        if reason is not None:
            result.refuse(node_label(node), f"If with a constant condition kept: {reason}")
            continue
        moved.extend(_inline_branch(model, node, branch))
        inlined += 1
    return inlined, moved


def _inline_blocker(node: ir.Node, branch: ir.Graph) -> str | None:
    """Why ``branch`` cannot replace ``node`` in the main graph, or None."""
    if branch.inputs or len(branch.outputs) != len(node.outputs):
        return "its branch does not match its outputs"
    taken: set[int] = set()
    for out, inner in zip(node.outputs, branch.outputs, strict=True):
        if not out.is_graph_output():
            continue
        producer = inner.producer()
        if producer is None or producer.graph is not branch or id(inner) in taken:
            return ("a graph output would come straight from an outer value, an initializer "
                    "or a second output")
        taken.add(id(inner))
    return None


def _model_names(model: ir.Model, skip: ir.Node) -> set[str]:
    """Every value name of ``model`` outside the subgraphs of ``skip``."""
    names: set[str] = set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        names.update(v.name for v in iter_values(graph) if v.name)
        for node in graph:
            if node is not skip:
                graphs.extend(subgraphs(node))
    return names


def _inline_branch(model: ir.Model, node: ir.Node, branch: ir.Graph) -> list[ir.Node]:
    """Move ``branch`` into the main graph in place of ``node``; returns the moved nodes."""
    graph = model.graph
    taken = _model_names(model, node)

    def fresh(value: ir.Value) -> None:
        if value.name and value.name in taken:
            base, i = value.name, 1
            while f"{base}_{i}" in taken:
                i += 1
            value.name = f"{base}_{i}"
        if value.name:
            taken.add(value.name)

    for value in list(branch.initializers.values()):
        branch.initializers.pop(value.name)
        fresh(value)
        graph.register_initializer(value)
    nodes = list(branch)
    for inner in nodes:
        branch.remove(inner)
        for value in inner.outputs:
            fresh(value)
    graph.insert_before(node, nodes)
    inner_outputs = list(branch.outputs)
    branch.outputs.clear()
    for out, inner in zip(node.outputs, inner_outputs, strict=True):
        if inner.type is None:
            inner.type = out.type
        if out.is_graph_output():
            replaced = replace_value(graph, out, inner)
            assert replaced, "checked by _inline_blocker"
        else:
            out.replace_all_uses_with(inner)
    detach_node(node)
    graph.remove(node)
    return nodes
