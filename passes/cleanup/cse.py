"""Common subexpressions: nodes that compute the same thing from the same inputs become one.

Two nodes of the same op, domain and attributes whose inputs are the same values compute the
same outputs, so readers of the second may read the first and the second goes. Constant
inputs count as the same when their contents are equal (same dtype, shape and bytes), since
exporters often write one initializer per use; the second node's constants are then dropped
with it, so no weight becomes shared. Not merged: random ops, custom-domain ops (they may have
side effects), nodes with subgraphs, and a node whose output is a graph output. Visiting the
nodes in order makes chains of duplicates collapse in one sweep. Main graph only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable

import numpy as np
import onnx_ir as ir

from onnxopt.ir import const_array, is_constant, is_standard, subgraphs
from onnxopt.provenance import RANDOM_OPS


def _attribute_key(attribute: ir.Attr) -> Hashable:
    value = attribute.value
    if attribute.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS,
                          ir.AttributeType.STRINGS):
        return tuple(value)
    if attribute.type == ir.AttributeType.TENSOR:
        array = value.numpy()
        return (str(array.dtype), array.shape, array.tobytes())
    if attribute.type in (ir.AttributeType.FLOAT,):
        return np.float32(value).tobytes()  # -0.0 and NaN are compared bit by bit
    return value


class _ConstantKeys:
    """Content keys of constant values, computed once each."""

    def __init__(self) -> None:
        self._keys: dict[int, Hashable] = {}

    def __call__(self, value: ir.Value) -> Hashable:
        key = self._keys.get(id(value))
        if key is None:
            array = np.ascontiguousarray(const_array(value))
            digest = hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()
            key = ("const", str(array.dtype), array.shape, digest)
            self._keys[id(value)] = key
        return key


def _mergeable(node: ir.Node) -> bool:
    return (is_standard(node) and bool(node.outputs) and not subgraphs(node)
            and node.op_type not in RANDOM_OPS
            and not any(out.is_graph_output() for out in node.outputs))


def eliminate_common_subexpressions(graph: ir.Graph) -> int:
    """Merge duplicate nodes of ``graph`` (not its bodies); returns how many were removed."""
    constant_key = _ConstantKeys()
    # Nodes are first bucketed with constants known only by dtype and shape, so contents are
    # hashed only when two candidates could match.
    seen: dict[Hashable, list[ir.Node]] = {}
    removed = 0
    for node in list(graph):
        if not _mergeable(node):
            continue
        try:
            attributes = tuple(sorted((name, _attribute_key(a))
                                      for name, a in node.attributes.items()))
        except (TypeError, AttributeError):  # unhashable or reference attributes
            continue
        inputs = tuple(
            None if v is None else
            ("const", v.const_value.dtype if v.const_value is not None else None,
             tuple(v.shape) if v.shape is not None else None)
            if is_constant(v) else id(v)
            for v in node.inputs)
        key = (node.domain or "", node.op_type, node.overload, len(node.outputs), attributes,
               inputs)
        try:
            candidates = seen.setdefault(key, [])
        except TypeError:  # an attribute value that cannot be hashed
            continue
        twin = next((c for c in candidates if _same_inputs(c, node, constant_key)), None)
        if twin is None:
            candidates.append(node)
            continue
        for old, new in zip(node.outputs, twin.outputs, strict=True):
            old.replace_all_uses_with(new)
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)
        graph.remove(node)
        removed += 1
    return removed


def _same_inputs(a: ir.Node, b: ir.Node, constant_key: _ConstantKeys) -> bool:
    for x, y in zip(a.inputs, b.inputs, strict=True):
        if x is y:
            continue
        if x is None or y is None or not (is_constant(x) and is_constant(y)):
            return False
        if constant_key(x) != constant_key(y):
            return False
    return True
