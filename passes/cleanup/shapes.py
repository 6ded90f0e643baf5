"""Shape computations resolved from the dims that are static: the partial evaluation of ``cleanup``.

Exporters compute reshape targets at run time: ``Shape(x) -> Gather/Slice -> Cast ->
Concat -> Reshape``. Once shape inference knows some dims of ``x`` (a channel count set by a
weight, a graph input dim the model declares), parts of those small integer vectors are
constants for *every* input the model accepts, although the whole is not. This step tracks
each small 1-D (or 0-D) integer tensor entry by entry, known or not:

* a value whose entries are all known becomes an initializer (``Shape`` of a tensor whose
  dims are all static, a ``Gather`` of its static channel dim, ...);
* a ``Reshape`` target with exactly one unknown entry, every other entry a known positive
  size and no ``-1``, becomes a constant with ``-1`` in the unknown place: Reshape infers
  that entry as ``numel / product(others)``, which is the value the graph computed since
  the original target was valid. A ``0`` (copy the input dim) is not taken as known, so an
  empty batch keeps its behaviour.

Dynamic dims stay dynamic: nothing here assumes a concrete input size (``--input-shape``
only chooses the size of validation data, it is not a promise about future inputs). Dims come
from a fresh ONNX shape inference (with data propagation) that ignores the model's own
``value_info`` annotations, and from the declared dims of graph inputs, which onnxruntime
enforces; a negative declared dim counts as unknown. Main graph only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.ir import FreshNames, attr, const_array, is_constant, is_standard, opset_version
from onnxopt.large_weights import call_without_weights

logger = logging.getLogger(__name__)

#: Longest integer vector tracked entry by entry.
_MAX_ENTRIES = 64

_INT_TYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32})

Dims = tuple[int | None, ...]


@dataclass(frozen=True)
class Partial:
    """A small integer tensor known entry by entry.

    Attributes:
        entries: The values (None where unknown), flattened.
        rank: 0 for a scalar, 1 for a vector.
        dtype: The numpy dtype of the tensor.
    """

    entries: Dims
    rank: int
    dtype: np.dtype

    @property
    def complete(self) -> bool:
        """Whether every entry is known."""
        return all(e is not None for e in self.entries)

    def array(self) -> np.ndarray:
        """The value as an array (only when complete)."""
        data = np.array(self.entries, dtype=self.dtype)
        return data.reshape(()) if self.rank == 0 else data


@dataclass(frozen=True)
class Inferred:
    """What shape inference says about the main graph's values, by value name.

    Attributes:
        dims: Dims (None where not a known non-negative int), of inferred values and graph
            inputs (declared dims, which onnxruntime enforces).
        dtypes: ONNX element types of inferred values and graph inputs.
    """

    dims: dict[str, Dims]
    dtypes: dict[str, int]


def infer_values(model: ir.Model) -> Inferred:
    """Run a fresh ONNX shape inference (data propagation on) over ``model``'s main graph.

    The model's own ``value_info`` annotations are left out, so that stale ones do not count
    as facts. Nothing is changed; empty results if inference fails.
    """
    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        del proto.graph.value_info[:]
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)

    try:
        proto = call_without_weights(infer, model)
    except Exception as error:  # inference failing only means nothing is resolved
        logger.debug("shape inference failed: %s", error)
        return Inferred({}, {})
    dims: dict[str, Dims] = {}
    dtypes: dict[str, int] = {}
    for info in proto.graph.value_info:
        if not info.type.HasField("tensor_type"):
            continue
        tensor = info.type.tensor_type
        if tensor.elem_type:
            dtypes[info.name] = tensor.elem_type
        if tensor.HasField("shape"):
            dims[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                for d in tensor.shape.dim)
    for value in model.graph.inputs:
        if value.shape is not None:
            dims[value.name] = tuple(d if isinstance(d, int) and d >= 0 else None
                                     for d in value.shape)
        if value.dtype is not None:
            dtypes[value.name] = int(value.dtype)
    return Inferred(dims, dtypes)


def rank_of(value: ir.Value | None, dims: dict[str, Dims]) -> int | None:
    """The rank of ``value`` from its own shape or from the inferred ``dims``, else None."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    found = dims.get(value.name) if value.name else None
    return None if found is None else len(found)


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The value of a true constant (not an overridable initializer), else None."""
    return const_array(value) if is_constant(value) else None


def _from_constant(value: ir.Value) -> Partial | None:
    array = _const(value)
    if array is None or array.dtype.kind not in "iu" or array.ndim > 1 \
            or array.size > _MAX_ENTRIES:
        return None
    return Partial(tuple(int(v) for v in array.reshape(-1)), array.ndim, array.dtype)


class _Context:
    """The partial values found so far and the dims inference gave."""

    def __init__(self, dims: dict[str, Dims], opset: int) -> None:
        self.dims = dims
        self.opset = opset
        self.known: dict[int, Partial] = {}

    def of(self, value: ir.Value | None) -> Partial | None:
        if value is None:
            return None
        found = self.known.get(id(value))
        return found if found is not None else _from_constant(value)

    def ints(self, value: ir.Value | None) -> list[int] | None:
        """A constant integer input as a list (starts, axes, ...)."""
        array = _const(value)
        if array is None or array.dtype.kind not in "iu":
            return None
        return [int(v) for v in array.reshape(-1)]


def _vector(entries: Dims, like: Partial | None = None) -> Partial:
    return Partial(tuple(entries), 1, like.dtype if like else np.dtype(np.int64))


def _shape(node: ir.Node, ctx: _Context) -> Partial | None:
    x = node.inputs[0]
    dims = ctx.dims.get(x.name) if x is not None and x.name else None
    if dims is None:
        return None
    start, end = attr(node, "start", 0), attr(node, "end", None)
    return _vector(dims[start:end])


def _size(node: ir.Node, ctx: _Context) -> Partial | None:
    dims = _shape(node, ctx)
    if dims is None or not dims.complete:
        return None
    return Partial((int(np.prod(dims.entries, dtype=np.int64)),), 0, np.dtype(np.int64))


def _cast(node: ir.Node, ctx: _Context) -> Partial | None:
    data = ctx.of(node.inputs[0])
    to = ir.DataType(attr(node, "to", 0))
    if data is None or to not in _INT_TYPES:
        return None
    info = np.iinfo(to.numpy())
    if any(e is not None and not info.min <= e <= info.max for e in data.entries):
        return None
    return Partial(data.entries, data.rank, to.numpy())


def _gather(node: ir.Node, ctx: _Context) -> Partial | None:
    data, indices = ctx.of(node.inputs[0]), _const(node.inputs[1])
    if data is None or data.rank != 1 or indices is None or indices.dtype.kind not in "iu" \
            or indices.ndim > 1 or attr(node, "axis", 0) not in (0, -1):
        return None
    n = len(data.entries)
    picked = []
    for i in indices.reshape(-1).tolist():
        if not -n <= i < n:
            return None
        picked.append(data.entries[i])
    return Partial(tuple(picked), indices.ndim, data.dtype)


def _slice(node: ir.Node, ctx: _Context) -> Partial | None:
    data = ctx.of(node.inputs[0])
    if data is None or data.rank != 1:
        return None
    if ctx.opset < 10:
        starts, ends, axes, steps = (attr(node, "starts"), attr(node, "ends"),
                                     attr(node, "axes"), None)
    else:
        inputs = [*node.inputs, None, None][1:5]
        starts, ends, axes, steps = (None if v is None else ctx.ints(v) for v in inputs)
        if (inputs[2] is not None and axes is None) or (inputs[3] is not None and steps is None):
            return None
    if not starts or not ends or len(starts) != 1 or len(ends) != 1:
        return None
    if axes is not None and list(axes) not in ([0], [-1]):
        return None
    step = steps[0] if steps else 1
    if step == 0:
        return None
    # Python slicing clamps negative and out-of-range bounds as ONNX Slice does.
    return _vector(data.entries[starts[0]:ends[0]:step], data)


def _concat(node: ir.Node, ctx: _Context) -> Partial | None:
    parts = [ctx.of(v) for v in node.inputs]
    if any(p is None or p.rank != 1 for p in parts) or attr(node, "axis", 0) not in (0, -1):
        return None
    if len({p.dtype for p in parts}) != 1:
        return None
    return _vector(sum((p.entries for p in parts), ()), parts[0])


def _axes(node: ir.Node, ctx: _Context) -> list[int] | None:
    if ctx.opset < 13:
        return attr(node, "axes")
    return ctx.ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None


def _unsqueeze(node: ir.Node, ctx: _Context) -> Partial | None:
    data = ctx.of(node.inputs[0])
    if data is None or data.rank != 0 or list(_axes(node, ctx) or []) not in ([0], [-1]):
        return None
    return Partial(data.entries, 1, data.dtype)


def _squeeze(node: ir.Node, ctx: _Context) -> Partial | None:
    data = ctx.of(node.inputs[0])
    axes = _axes(node, ctx)
    if data is None or data.rank != 1 or len(data.entries) != 1 \
            or (axes is not None and list(axes) not in ([0], [-1])):
        return None
    return Partial(data.entries, 0, data.dtype)


def _identity(node: ir.Node, ctx: _Context) -> Partial | None:
    return ctx.of(node.inputs[0])


#: Op type -> its partial value from the partial values of its inputs (None: unknown).
_RULES: dict[str, Callable[[ir.Node, _Context], Partial | None]] = {
    "Shape": _shape,
    "Size": _size,
    "Cast": _cast,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Identity": _identity,
}


def _reshape_target(node: ir.Node, ctx: _Context) -> np.ndarray | None:
    """A constant Reshape target with ``-1`` for its one unknown entry, or None."""
    if node.op_type != "Reshape" or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    target = ctx.known.get(id(node.inputs[1]))
    if target is None or target.rank != 1:
        return None
    unknown = [i for i, e in enumerate(target.entries) if e is None]
    if len(unknown) != 1 or any(e is not None and e < 1 for e in target.entries):
        return None
    entries = [-1 if e is None else e for e in target.entries]
    return np.array(entries, dtype=target.dtype)


def resolve_shapes(model: ir.Model,
                   replace: Callable[[ir.Graph, ir.Node, list[np.ndarray | None], FreshNames],
                                     None]) -> tuple[int, int]:
    """Fold the shape values of the main graph that static dims determine.

    Args:
        model: The model, changed in place.
        replace: Swaps a node for initializers holding its output values (the folding step's
            ``replace_by_constants``).

    Returns:
        How many nodes were replaced by constants, and how many Reshape targets were made
        constant with a ``-1``.
    """
    graph = model.graph
    ctx = _Context(infer_values(model).dims, opset_version(model))
    if not ctx.dims:
        return 0, 0
    for node in graph:
        rule = _RULES.get(node.op_type) if is_standard(node) else None
        if rule is None or not node.inputs or len(node.outputs) != 1:
            continue
        partial = rule(node, ctx)
        if partial is not None and len(partial.entries) <= _MAX_ENTRIES:
            ctx.known[id(node.outputs[0])] = partial
    names = FreshNames(graph, values_only=True)
    resolved = targets = 0
    for node in list(graph):
        if len(node.outputs) != 1:
            continue
        partial = ctx.known.get(id(node.outputs[0]))
        # Nodes that read only constants are the folding step's; here only what it cannot do.
        if partial is not None and partial.complete and not all(
                v is None or is_constant(v) for v in node.inputs):
            replace(graph, node, [partial.array()], names)
            resolved += 1
            continue
        target = _reshape_target(node, ctx)
        if target is not None and not is_constant(node.inputs[1]):
            value = ir.Value(name=names(f"{node.inputs[1].name or 'shape'}_static"),
                             shape=ir.Shape(list(target.shape)),
                             type=ir.TensorType(ir.DataType.from_numpy(target.dtype)),
                             const_value=ir.tensor(target))
            graph.register_initializer(value)
            node.replace_input_with(1, value)
            targets += 1
    return resolved, targets
