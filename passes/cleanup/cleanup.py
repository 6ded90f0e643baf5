"""The ``cleanup`` pass: exact graph hygiene before and after the real rewrites.

Each step is an identity of the computed function, so the pass is exact:

* Constant nodes become initializers of their graph (:mod:`~onnxopt.passes.cleanup.weights`),
  so weights kept in them are visible as weights.
* ``Identity(x) = x`` and inference-mode ``Dropout(x) = x`` (ratio is irrelevant when the
  mask output is unused and ``training_mode`` is absent or constant false): readers of the
  output read ``x`` instead. When the output is a graph output, ``x`` takes over its name
  (``onnxopt.ir.replace_value``); when that is impossible (``x`` is a graph input, an
  initializer or already an output) the node stays and a refusal is recorded. This step also
  runs inside If/Loop/Scan bodies, where a body output must come from a node of that body.
* Dead nodes: a node none of whose outputs reaches a graph output is removed; a node with
  subgraphs is removed as a whole, together with the outer-scope reads of its bodies.
* Constant folding: a node whose inputs are all true constants becomes initializers holding
  its value; ``Shape``/``Size`` of a graph input with a static declared shape fold too. What
  is not folded is counted per reason in ``fold_skipped``. ``max_fold_elements`` does not
  apply to weights (``weights_materialized`` counts those above it). Models older than IR 4
  are not folded (every initializer there must be a graph input, hence overridable).
* Shape values that static dims determine are folded, and a Reshape target with one dynamic
  entry becomes a constant with ``-1`` (:mod:`~onnxopt.passes.cleanup.shapes`).
* ``If(c)`` with a constant condition ``c`` is replaced by its taken branch. Folding and
  inlining alternate, so a condition computed from folded shapes is resolved. Both steps,
  and why inlining matters, are described in :mod:`onnxopt.passes.cleanup.folding`.
* A Cast to the type its input already has is an identity and goes (``casts``).
* A hard swish written out as ``x * Clip(x + 3, 0, 6) / 6`` becomes one HardSwish (opset 14
  on) or ``x * HardSigmoid(x)`` (:mod:`~onnxopt.passes.cleanup.activations`).
* Consecutive Slices over different axes become one (:mod:`~onnxopt.passes.cleanup.slices`).
* A per-channel constant Mul/Div/Add/Sub after a Conv, ConvTranspose, Gemm, MatMul or
  BatchNormalization folds into its weight and bias (:mod:`~onnxopt.passes.cleanup.affine`).
* Nodes that compute the same thing from the same inputs are merged
  (:mod:`~onnxopt.passes.cleanup.cse`).
* Unused initializers are dropped; a graph input nobody reads is dropped only when it is
  backed by an initializer of the same name (old-IR overridable weight), never a real input.
* A final stable topological sort.

Dead-node removal, folding, shapes, affine folding, merging and If inlining work on the main
graph only; the number of
subgraphs they did not enter is reported as ``subgraphs_skipped``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.ir import (
    const_array,
    detach_node,
    is_constant,
    is_standard,
    node_label,
    opset_version,
    remove_dead_nodes,
    remove_unused_initializers,
    replace_value,
    subgraphs,
)
from onnxopt.options import option
from onnxopt.pass_base import Pass, PassContext, PassResult, register_pass
from onnxopt.passes.cleanup.activations import fuse_hard_swish
from onnxopt.passes.cleanup.affine import fold_affine
from onnxopt.passes.cleanup.cse import eliminate_common_subexpressions
from onnxopt.passes.cleanup.folding import (
    fold_constants,
    inline_constant_ifs,
    replace_by_constants,
)
from onnxopt.passes.cleanup.shapes import infer_values, resolve_shapes
from onnxopt.passes.cleanup.slices import merge_slices
from onnxopt.passes.cleanup.weights import lift_constants


@dataclass(frozen=True)
class CleanupOptions:
    """Options of the ``cleanup`` pass.

    Attributes:
        lift_constants: Whether to turn Constant nodes into initializers.
        fold_constants: Whether to fold nodes whose inputs are all constants.
        max_fold_elements: Largest folded result (elements per output) to materialize,
            except weights (inputs of Conv, ConvTranspose, Gemm, MatMul, BatchNormalization
            computed from constants), which are materialized whatever their size.
        resolve_shapes: Whether to fold shape computations that static dims determine
            (and make a Reshape target with one dynamic entry a constant with ``-1``);
            only with ``fold_constants``.
        fold_affine: Whether to fold a Mul/Div/Add/Sub by a per-channel constant into the
            Conv, ConvTranspose, Gemm (or, scales only, MatMul) before it.
        merge_slices: Whether to merge consecutive Slices over different axes.
        merge_duplicates: Whether to merge nodes that compute the same thing from the
            same inputs (constants compared by content).
        fuse_activations: Whether to make a hard swish written out as arithmetic
            (``x * Clip(x + 3, 0, 6) / 6``) one HardSwish, or ``x * HardSigmoid(x)`` before
            opset 14.
    """

    lift_constants: bool = True
    fold_constants: bool = True
    max_fold_elements: int = option(1_000_000, within="[0, inf)")
    resolve_shapes: bool = True
    fold_affine: bool = True
    merge_slices: bool = True
    merge_duplicates: bool = True
    fuse_activations: bool = True


@register_pass
class CleanupPass(Pass):
    """Removes Identity/Dropout, dead nodes and unused weights; folds constants; sorts.

    Stats: ``constants_lifted``, ``identities``, ``dropouts``, ``dead_nodes``, ``folded``,
    ``weights_materialized`` (folded weights above ``max_fold_elements``),
    ``shapes_resolved``, ``reshape_targets``, ``ifs_inlined``, ``casts``, ``hard_swish_fused``,
    ``affine_folded``,
    ``slices_merged``, ``duplicates_merged``, ``inputs_removed``,
    ``initializers_removed`` (including those of removed inputs), ``reordered`` (0/1),
    ``fold_skipped`` (reason -> count) and ``subgraphs_skipped``.
    """

    name = "cleanup"
    description = ("lift Constant nodes; remove Identity/Dropout/no-op Cast, dead nodes and "
                   "unused initializers; fold constants, shapes and per-channel affine ops; "
                   "merge Slices and duplicates; written-out hard swish made one op")
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

        if self.options.lift_constants:
            stats["constants_lifted"] = lift_constants(model)
        _bypass_passthroughs(ir.traversal.RecursiveGraphIterator(graph), opset, stats, kept)
        stats["dead_nodes"] += remove_dead_nodes(graph)
        # Before IR 4 every initializer must also be a graph input, so a folded result could
        # only be added as an overridable input: not a constant any more.
        if self.options.fold_constants and model.ir_version >= 4:
            tried_folds: set[int] = set()
            tried_ifs: set[int] = set()
            while True:
                folded, materialized = fold_constants(
                    model, self.options.max_fold_elements, skipped, tried_folds)
                stats["folded"] += folded
                stats["weights_materialized"] += materialized
                resolved = 0
                if self.options.resolve_shapes:
                    resolved, targets = resolve_shapes(model, replace_by_constants)
                    stats["shapes_resolved"] += resolved
                    stats["reshape_targets"] += targets
                inlined, moved = inline_constant_ifs(model, result, tried_ifs)
                stats["ifs_inlined"] += inlined
                _bypass_passthroughs(moved, opset, stats, kept)
                if not (resolved or inlined):
                    break
            stats["dead_nodes"] += remove_dead_nodes(graph)
        inferred = infer_values(model)
        stats["casts"] = _bypass_noop_casts(graph, inferred.dtypes, kept)
        if self.options.fuse_activations:
            stats["hard_swish_fused"] = fuse_hard_swish(model, opset)
        if model.ir_version >= 4:  # both add initializers
            if self.options.fold_affine:
                stats["affine_folded"] = fold_affine(model, result, inferred.dims)
            if self.options.merge_slices:
                stats["slices_merged"] = merge_slices(model, inferred.dims)
        if self.options.merge_duplicates:
            stats["duplicates_merged"] = eliminate_common_subexpressions(graph)
            stats["dead_nodes"] += remove_dead_nodes(graph)
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


#: Stats that count changes to the model; ``modified`` is true when any is non-zero.
_CHANGE_COUNTS = ("constants_lifted", "identities", "dropouts", "dead_nodes", "folded",
                  "weights_materialized", "shapes_resolved", "reshape_targets", "ifs_inlined",
                  "casts", "hard_swish_fused", "affine_folded", "slices_merged",
                  "duplicates_merged",
                  "initializers_removed", "inputs_removed", "reordered")


# -- Identity / Dropout -----------------------------------------------------------------------


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


def _bypass_passthroughs(nodes: Iterable[ir.Node], opset: int, stats: dict[str, Any],
                         kept: dict[int, tuple[ir.Node, str]]) -> None:
    """Remove the Identity and inference Dropout nodes among ``nodes``.

    A node that must stay is recorded in ``kept`` with the reason; a later call (after If
    inlining moved it) may still remove it, so refusals are reported at the end.
    """
    for node in list(nodes):
        entry = _BYPASS.get(node.op_type)
        if entry is None or not is_standard(node):
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
    detach_node(node)
    owner.remove(node)
    return None


def _bypass_noop_casts(graph: ir.Graph, dtypes: dict[str, int],
                       kept: dict[int, tuple[ir.Node, str]]) -> int:
    """Remove the Casts of ``graph`` to the type their input already has; returns how many.

    The input type comes from shape inference (``dtypes`` by value name), else from the
    value itself. A Cast that must stay (it feeds a graph output straight from a graph input)
    is recorded in ``kept``.
    """
    removed = 0
    for node in list(graph):
        if node.op_type != "Cast" or not is_standard(node) or not node.inputs \
                or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        dtype = dtypes.get(x.name) if x.name else None
        if dtype is None and x.dtype is not None:
            dtype = int(x.dtype)
        if dtype is None or dtype != node.attributes.get_int("to", 0):
            continue
        reason = _bypass(node)
        if reason is None:
            removed += 1
        else:
            kept[id(node)] = (node, reason)
    return removed


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
