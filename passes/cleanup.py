"""The ``cleanup`` pass: exact graph hygiene before and after the real rewrites.

Each step is an identity of the computed function, so the pass is exact:

* ``Identity(x) = x`` and inference-mode ``Dropout(x) = x`` (ratio is irrelevant when the
  mask output is unused and ``training_mode`` is absent or constant false): readers of the
  output read ``x`` instead. When the output is a graph output, ``x`` takes over its name
  (``onnxopt.ir.replace_value``); when that is impossible (``x`` is a graph input, an
  initializer or already an output) the node stays and a refusal is recorded. This step also
  runs inside If/Loop/Scan bodies, where a body output must come from a node of that body.
* Dead nodes: a node none of whose outputs reaches a graph output is removed; a node with
  subgraphs is removed as a whole, together with the outer-scope reads of its bodies.
* Constant folding: ``f(c1, ..., cn)`` with every input a true constant (initializer that is
  not a graph input, or Constant output) becomes one new initializer holding ``f``'s value,
  computed by onnxruntime on a one-node model (the ONNX reference evaluator if onnxruntime
  cannot run it). ``Shape``/``Size`` of a graph input with a static declared shape fold too,
  since onnxruntime enforces declared input dims. Not folded, and counted per reason in
  ``fold_skipped``: custom domains, nodes with subgraphs, random ops, quantize/dequantize
  (onnxruntime needs those patterns to pick integer kernels), results above
  ``max_fold_elements``, non-numeric results and evaluation failures. A folded graph output
  becomes a ``Constant`` node of the same name (a graph output must be produced by a node).
  Models older than IR 4 are not folded (every initializer there must be a graph input, hence
  overridable).
* ``If(c)`` with a constant condition ``c`` is its taken branch: the branch's nodes and
  initializers move into the main graph (renamed if a name is taken anywhere in the model)
  and readers of the If outputs read the branch outputs. Folding and inlining alternate, so
  a condition computed from folded shapes is resolved. This matters beyond tidiness:
  onnxruntime inlines such an If itself when it loads the model, and then runs data-dependent
  shape inference on the branch with constant inputs it never saw as constants before (an
  exported ``Range`` fed a ``[1]`` tensor instead of a scalar is rejected at load time).
  Inlining it here lets folding evaluate those nodes with the kernels instead.
* Unused initializers are dropped; a graph input nobody reads is dropped only when it is
  backed by an initializer of the same name (old-IR overridable weight), never a real input.
* A final stable topological sort.

Dead-node removal, folding and If inlining work on the main graph only; the number of
subgraphs they did not enter is reported as ``subgraphs_skipped``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from onnxopt.ir import (
    add_initializer,
    const_array,
    is_constant,
    iter_values,
    node_label,
    opset_version,
    remove_unused_initializers,
    replace_value,
    static_shape,
    subgraphs,
)
from onnxopt.pass_base import Pass, PassContext, PassResult, register_pass
from onnxopt.validate import make_session

logger = logging.getLogger(__name__)

_STANDARD_DOMAINS = ("", "ai.onnx")

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


def _dropout_blocker(node: ir.Node, opset: int) -> str | None:
    """Why this Dropout is not an identity in inference, or None if it is."""
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return "its mask output is used"
    if opset < 7 and node.attributes.get_int("is_test", 0) != 1:
        return "is_test is not 1 (training form, opset < 7)"
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None:
        flag = const_array(training) if is_constant(training) else None
        if flag is None:
            return "training_mode is not a constant"
        if bool(np.asarray(flag).any()):
            return "training_mode is true"
    return None


#: Single-input pass-through ops: op type -> (stats key, check returning a refusal reason).
_BYPASS: dict[str, tuple[str, Callable[[ir.Node, int], str | None]]] = {
    "Identity": ("identities", lambda node, opset: None),
    "Dropout": ("dropouts", _dropout_blocker),
}


#: Stats that count changes to the model; ``modified`` is true when any is non-zero.
_CHANGE_COUNTS = ("identities", "dropouts", "dead_nodes", "folded", "ifs_inlined",
                  "initializers_removed", "inputs_removed", "reordered")


@dataclass(frozen=True)
class CleanupOptions:
    """Options of the ``cleanup`` pass.

    Attributes:
        fold_constants: Whether to fold nodes whose inputs are all constants.
        max_fold_elements: Largest folded result (elements per output) to materialize.
    """

    fold_constants: bool = True
    max_fold_elements: int = 1_000_000


@register_pass
class CleanupPass(Pass):
    """Removes Identity/Dropout, dead nodes and unused weights; folds constants; sorts.

    Stats: ``identities``, ``dropouts``, ``dead_nodes``, ``folded``, ``ifs_inlined``,
    ``inputs_removed``,
    ``initializers_removed`` (including those of removed inputs), ``reordered`` (0/1),
    ``fold_skipped`` (reason -> count) and ``subgraphs_skipped``.
    """

    name = "cleanup"
    description = "remove Identity/Dropout, dead nodes and unused initializers; fold constants"
    Options = CleanupOptions
    exact = True
    needs_data = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Clean ``model`` in place; see the module docstring for the steps."""
        graph = model.graph
        result = PassResult(modified=False)
        stats: dict[str, Any] = dict.fromkeys(_CHANGE_COUNTS, 0)
        skipped: dict[str, int] = {}
        opset = opset_version(model)
        kept: dict[int, tuple[ir.Node, str]] = {}

        _bypass_passthroughs(ir.traversal.RecursiveGraphIterator(graph), opset, stats, kept)
        stats["dead_nodes"] += _remove_dead_nodes(graph)
        # Before IR 4 every initializer must also be a graph input, so a folded result could
        # only be added as an overridable input: not a constant any more.
        if self.options.fold_constants and model.ir_version >= 4:
            tried_folds: set[int] = set()
            tried_ifs: set[int] = set()
            while True:
                stats["folded"] += _fold_constants(model, self.options.max_fold_elements,
                                                   skipped, tried_folds)
                inlined, moved = _inline_constant_ifs(model, result, tried_ifs)
                if not inlined:
                    break
                stats["ifs_inlined"] += inlined
                _bypass_passthroughs(moved, opset, stats, kept)
            stats["dead_nodes"] += _remove_dead_nodes(graph)
        stats["inputs_removed"] = _remove_backed_unused_inputs(graph)
        stats["initializers_removed"] = stats["inputs_removed"] + remove_unused_initializers(graph)
        stats["reordered"] = _sort(graph)
        stats["fold_skipped"] = skipped
        stats["subgraphs_skipped"] = sum(1 for node in graph for _ in subgraphs(node))
        present = {id(node) for node in ir.traversal.RecursiveGraphIterator(graph)}
        for node, reason in kept.values():
            if id(node) in present:
                result.refuse(node_label(node), f"kept: {reason}")
        result.modified = any(stats[key] for key in _CHANGE_COUNTS)
        result.stats = stats
        return result


# -- Identity / Dropout -----------------------------------------------------------------------


def _bypass_passthroughs(nodes: Iterable[ir.Node], opset: int, stats: dict[str, Any],
                         kept: dict[int, tuple[ir.Node, str]]) -> None:
    """Remove the Identity and inference Dropout nodes among ``nodes``.

    A node that must stay is recorded in ``kept`` with the reason; a later call (after If
    inlining moved it) may still remove it, so refusals are reported at the end.
    """
    for node in list(nodes):
        entry = _BYPASS.get(node.op_type)
        if entry is None or node.domain not in _STANDARD_DOMAINS:
            continue
        key, blocker = entry
        reason = blocker(node, opset) or _bypass(node)
        if reason is None:
            stats[key] += 1
            kept.pop(id(node), None)
        else:
            kept[id(node)] = (node, reason)


def _bypass(node: ir.Node) -> str | None:
    """Make readers of ``node``'s first output read its first input; None on success."""
    owner = node.graph
    if owner is None or not node.inputs or node.inputs[0] is None:
        return "no data input"
    x, y = node.inputs[0], node.outputs[0]
    if y.is_graph_output():
        producer = x.producer()
        if producer is None or producer.graph is not owner:
            return "it feeds a graph output directly from a graph input, initializer or outer scope"
        if not replace_value(owner, y, x):
            return "its input is already a graph output"
    else:
        y.replace_all_uses_with(x)
    if x.type is None:
        x.type = y.type
    if x.shape is None:
        x.shape = y.shape
    _detach(node)
    owner.remove(node)
    return None


# -- dead nodes -------------------------------------------------------------------------------


def _detach(node: ir.Node) -> None:
    """Drop every read of ``node`` and of the nodes in its subgraphs (before removing it)."""
    for i in range(len(node.inputs)):
        node.replace_input_with(i, None)
    for sub in subgraphs(node):
        for inner in ir.traversal.RecursiveGraphIterator(sub):
            for i in range(len(inner.inputs)):
                inner.replace_input_with(i, None)


def _is_dead(node: ir.Node) -> bool:
    if not node.outputs and node.domain not in _STANDARD_DOMAINS:
        return False  # a custom op without outputs may exist for its side effect
    return not any(out.uses() or out.is_graph_output() for out in node.outputs)


def _remove_dead_nodes(graph: ir.Graph) -> int:
    """Remove main-graph nodes that reach no graph output; returns how many."""
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if _is_dead(node):
                _detach(node)
                graph.remove(node)
                removed += 1
                changed = True
    return removed


# -- constant folding -------------------------------------------------------------------------


def _fold_constants(model: ir.Model, max_elements: int, skipped: dict[str, int],
                    seen: set[int]) -> int:
    """Fold main-graph nodes with constant inputs into initializers; returns how many.

    ``seen`` holds the ids of nodes already tried (kept across calls, so a refusal is
    counted once).
    """
    graph = model.graph
    folded = 0
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
            reason = _fold_blocker(node, max_elements)
            arrays = None
            if reason is None:
                if shape_input is not None:
                    arrays = [_SHAPE_OPS[node.op_type](shape_input, node)]
                else:
                    arrays = _evaluate(model, node)
                reason = _result_blocker(arrays, max_elements)
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                logger.debug("not folding %s: %s", node_label(node), reason)
                continue
            _replace_by_constants(graph, node, arrays)
            folded += 1
            changed = True
    return folded


def _static_graph_input(node: ir.Node) -> tuple[int, ...] | None:
    """The static shape of a Shape/Size node's input when that input is a graph input."""
    if node.op_type not in _SHAPE_OPS or node.domain not in _STANDARD_DOMAINS:
        return None
    if len(node.inputs) != 1 or node.inputs[0] is None or not node.inputs[0].is_graph_input():
        return None
    return static_shape(node.inputs[0])


def _fold_blocker(node: ir.Node, max_elements: int) -> str | None:
    """Why ``node`` must not be folded, judged before evaluating it."""
    if node.domain not in _STANDARD_DOMAINS:
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
        if shape is not None and int(np.prod(shape, dtype=np.int64)) > max_elements:
            return "too_large"
    return None


def _result_blocker(arrays: list[np.ndarray] | None, max_elements: int) -> str | None:
    if arrays is None:
        return "failed"
    for array in arrays:
        if array is None:
            continue
        if array.dtype.kind in "OSUV":
            return "unsupported_type"
        if array.size > max_elements:
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


def _replace_by_constants(graph: ir.Graph, node: ir.Node,
                          arrays: list[np.ndarray | None]) -> None:
    """Swap ``node`` for one initializer per used output (keeping the output names).

    A graph output becomes the output of a new ``Constant`` node instead, which takes over
    its name and its place in the output list.
    """
    olds = list(node.outputs)
    for old, array in zip(olds, arrays, strict=True):
        if array is not None and old.is_graph_output():
            constant = ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor(array))])
            graph.insert_before(node, constant)
            replaced = replace_value(graph, old, constant.outputs[0])
            assert replaced, "a new Constant output is neither a graph input nor an output"
    _detach(node)
    graph.remove(node)
    for old, array in zip(olds, arrays, strict=True):
        if array is None or not old.uses():
            continue
        new = add_initializer(graph, old.name or "folded", array)
        old.replace_all_uses_with(new)


# -- If with a constant condition ---------------------------------------------------------------


def _inline_constant_ifs(model: ir.Model, result: PassResult,
                         tried: set[int]) -> tuple[int, list[ir.Node]]:
    """Replace main-graph If nodes whose condition is constant by their taken branch.

    Returns how many were inlined and the nodes moved into the main graph. An If that
    cannot be inlined is refused once (its id goes into ``tried``).
    """
    graph = model.graph
    inlined = 0
    moved: list[ir.Node] = []
    for node in list(graph):
        if (node.op_type != "If" or node.domain not in _STANDARD_DOMAINS or id(node) in tried
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
    _detach(node)
    graph.remove(node)
    return nodes


# -- inputs, initializers, order --------------------------------------------------------------


def _remove_backed_unused_inputs(graph: ir.Graph) -> int:
    """Drop unread graph inputs that are backed by an initializer (old-IR weights)."""
    removed = 0
    for value in list(graph.inputs):
        if not value.is_initializer() or value.uses() or value.is_graph_output():
            continue
        graph.inputs.remove(value)
        del graph.initializers[value.name]
        removed += 1
    return removed


def _sort(graph: ir.Graph) -> int:
    """Topologically sort ``graph`` (stable); 1 if the node order changed, else 0."""
    before = [id(n) for n in ir.traversal.RecursiveGraphIterator(graph)]
    graph.sort()
    after = [id(n) for n in ir.traversal.RecursiveGraphIterator(graph)]
    return int(before != after)
