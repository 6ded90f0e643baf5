"""Why a value is not a constant: the graph input, subgraph op or unfolded node it comes from.

Passes that need a constant weight refuse when it is not one; this says why in words a user
can act on ("'W' is produced by Mul 'scale' from graph input 'x'"), instead of only "not a
constant". The search walks the producers backwards, breadth first, and names the nearest
cause: a graph input (or an overridable initializer), a node with subgraphs (If, Loop,
Scan), a random op, or a custom-domain op. When every path ends in constants the value could
be folded and simply was not (``cleanup`` folds such chains, weights whatever their size).
"""

from __future__ import annotations

from collections import deque

import onnx_ir as ir

from onnxopt.ir import const_array, is_standard, node_label, subgraphs

#: Ops whose value differs from run to run, so never a constant.
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                        "RandomUniformLike", "Multinomial", "Bernoulli"})

#: Nodes visited at most before the search gives up naming a cause.
_SEARCH_LIMIT = 10_000


def _quoted(value: ir.Value) -> str:
    return f"'{value.name}'" if value.name else "an unnamed value"


def _overridable(value: ir.Value) -> str:
    return " (an initializer that callers may override)" if value.is_initializer() else ""


def _input_cause(value: ir.Value) -> str:
    return f"graph input {_quoted(value)}{_overridable(value)}"


def _node_cause(node: ir.Node) -> str | None:
    """Why ``node``'s outputs are not constants by the node alone, or None."""
    if subgraphs(node):
        return f"computed by {node_label(node)}"
    if not is_standard(node):
        return f"computed by custom op {node.domain}::{node.op_type}"
    if node.op_type in RANDOM_OPS:
        return f"drawn at random by {node_label(node)}"
    return None


def why_not_constant(value: ir.Value | None) -> str:
    """Say why ``value`` is not a (non-overridable) constant.

    Args:
        value: A value that :func:`onnxopt.ir.is_constant` rejects.

    Returns:
        A phrase such as ``"'W' is a graph input"``, ``"'W' is produced by Mul 'm' from graph
        input 'x'"``, ``"'W' is produced by Add 'a', computed by Loop 'l'"`` or ``"'W' is
        produced by ConstantOfShape 'c' from constants only and was not folded"``.
    """
    if value is None:
        return "the input is missing"
    if value.is_graph_input():
        return f"{_quoted(value)} is a graph input{_overridable(value)}"
    producer = value.producer()
    if producer is None:
        if value.is_initializer() and const_array(value) is None:
            return f"{_quoted(value)} is a non-numeric initializer"
        return f"{_quoted(value)} has no producer in its graph"
    own = _node_cause(producer)
    if own is not None:
        return f"{_quoted(value)} is {own}"
    if producer.op_type == "Constant":
        return f"{_quoted(value)} is a non-numeric or sparse Constant"
    head = f"{_quoted(value)} is produced by {node_label(producer)}"
    cause = _nearest_cause(producer)
    if cause is None:
        return f"{head} from constants only and was not folded (cleanup folds it)"
    return f"{head} from {cause}" if cause.startswith("graph input") else f"{head}, {cause}"


def _nearest_cause(start: ir.Node) -> str | None:
    """The nearest non-constant source upstream of ``start``'s inputs, or None."""
    queue: deque[ir.Node] = deque([start])
    seen = {id(start)}
    while queue and len(seen) <= _SEARCH_LIMIT:
        node = queue.popleft()
        for value in node.inputs:
            if value is None:
                continue
            if value.is_graph_input():
                return _input_cause(value)
            producer = value.producer()
            if producer is None or id(producer) in seen:
                continue
            seen.add(id(producer))
            cause = _node_cause(producer)
            if cause is not None:
                return cause
            queue.append(producer)
    return None
