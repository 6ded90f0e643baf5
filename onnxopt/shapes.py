"""Concrete value shapes for costing: input dims from ``--input-shape`` or data, then inferred.

Costs (MACs) need concrete dims. A dim that is symbolic (``N``, ``H``) or ``-1`` in the model
is not a number to multiply in, so the dims of the graph inputs are fixed first and ONNX shape
inference (with data propagation, so ``Shape -> Gather -> Concat -> Reshape`` chains resolve)
derives every other dim from them, on a weightless copy. The input dims come, per input, from
``--input-shape``, else from the first chunk of the data given (calibration, validation), else
from the model. Costs are per sample: an input's batch axis (as :mod:`~onnxopt.inputs` finds
it, e.g. axis 1 of a recurrent state ``[2, batch, 128]``), when dynamic in the model, is costed
at 1. A dim none of these fixes stays unknown (``None``), and a cost that needs it is unknown,
never a guess.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import UserError
from onnxopt.inputs import InputSpec, input_specs
from onnxopt.large_weights import call_without_weights
from onnxopt.shape_values import propagate_shape_values, type_dims

if TYPE_CHECKING:
    from onnxopt.feeds import FeedSource

__all__ = ["Dims", "ShapeTable", "concrete_shapes", "format_dims", "numel", "resolve_input_shapes",
           "static_dims"]

logger = logging.getLogger(__name__)

Dims = tuple[int | None, ...]
"""Dims of one value; ``None`` where a dim is unknown."""


def static_dims(value: ir.Value | None) -> Dims | None:
    """The dims of ``value`` as the IR has them: ints >= 0 known, symbolic and -1 unknown."""
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)


def format_dims(dims: Dims | None) -> str:
    """``[1, 3, ?, ?]`` (``[?]`` when even the rank is unknown)."""
    if dims is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _cost_inputs(model: ir.Model) -> list[tuple[ir.Value, InputSpec]]:
    """The graph inputs that are fed (not initializers), tensors only, with their specs."""
    specs = {s.name: s for s in input_specs(model)}
    return [(v, specs[v.name or ""]) for v in model.graph.inputs if not v.is_initializer()
            and (v.type is None or isinstance(v.type, ir.TensorType)) and v.name in specs]


def _per_sample(dims: Dims, model_dims: Dims | None, batch_axis: int | None) -> Dims:
    """``dims`` with the batch axis at 1 when the model leaves it dynamic."""
    if batch_axis is None or batch_axis >= len(dims) or (
            model_dims is not None and model_dims[batch_axis] is not None):
        return dims
    return (*dims[:batch_axis], 1, *dims[batch_axis + 1:])


def _first_chunks(data: Iterable[FeedSource | None]) -> Iterator[Mapping[str, object]]:
    for source in data:
        if source is None:
            continue
        try:
            feeds, _ = next(iter(source.chunks()))
        except StopIteration:
            continue
        except UserError as exc:  # the pass that reads the data reports it properly
            logger.debug("no input shapes from %s: %s", source.description, exc)
            continue
        yield feeds


def resolve_input_shapes(model: ir.Model,
                         input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                         data: Iterable[FeedSource | None] = ()) -> dict[str, tuple[int, ...]]:
    """The per-sample shapes to cost each input at, for the inputs whose dims can be fixed.

    Per input: ``input_shapes`` (``--input-shape``), else the first chunk of the first of
    ``data`` that holds it (read only when the model leaves a dim other than the batch axis
    unknown), else the model's own dims. An input whose batch axis is dynamic in the model
    gets 1 there (costs are per sample). Inputs with a dim still unknown are left out.

    Raises:
        UserError: ``input_shapes`` names no input of the model, or gives the wrong rank or a
            dim the model fixes to another value.
    """
    given = dict(input_shapes or {})
    inputs = _cost_inputs(model)
    names = [v.name or "" for v, _ in inputs]
    for name in given:
        if name not in names:
            raise UserError(f"--input-shape {name}:...: the model has no input {name!r} "
                            f"(inputs: {', '.join(names) or 'none'})")
    firsts: list[Mapping[str, object]] | None = None
    resolved: dict[str, tuple[int, ...]] = {}
    for value, spec in inputs:
        name = value.name or ""
        model_dims = static_dims(value)
        dims: Dims | None = model_dims
        if name in given:
            dims = tuple(given[name])
            _check_fits(name, dims, model_dims)
        elif model_dims is None or None in _per_sample(model_dims, None, spec.batch_axis):
            if firsts is None:
                firsts = list(_first_chunks(data))
            array = next((c[name] for c in firsts if isinstance(c.get(name), np.ndarray)), None)
            if array is not None and (model_dims is None or array.ndim == len(model_dims)):
                dims = tuple(int(d) for d in array.shape)
        if dims is None:
            continue
        dims = _per_sample(dims, model_dims, spec.batch_axis if model_dims is not None else 0)
        if None not in dims:
            resolved[name] = tuple(int(d) for d in dims if d is not None)
    return resolved


def _check_fits(name: str, dims: Dims, model_dims: Dims | None) -> None:
    if model_dims is None:
        return
    text = "x".join(str(d) for d in dims)
    if len(dims) != len(model_dims):
        raise UserError(f"--input-shape {name}:{text} has rank {len(dims)}; input {name!r} "
                        f"is {format_dims(model_dims)}")
    fixed = [i for i, (d, m) in enumerate(zip(dims, model_dims, strict=True))
             if m is not None and d != m]
    if fixed:
        raise UserError(f"--input-shape {name}:{text} does not fit input {name!r} "
                        f"{format_dims(model_dims)} (axis {fixed[0]} is fixed)")


@dataclass
class ShapeTable:
    """Concrete dims of a model's values, from shape inference with the inputs' dims fixed.

    Attributes:
        inputs: Dims each fed input was costed at (``None`` where a dim stayed unknown).
        values: Value name -> dims found by inference (subgraphs included).
        examples: For inputs with unknown dims, an ``--input-shape`` value to fill in.
    """

    inputs: dict[str, Dims | None] = field(default_factory=dict)
    values: dict[str, Dims] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def dims(self, value: ir.Value | None) -> Dims | None:
        """The dims of ``value``: inferred ones, else (per axis) the IR's static ones."""
        if value is None:
            return None
        own = static_dims(value)
        found = self.values.get(value.name or "")
        if found is None:
            return own
        if own is None or len(own) != len(found):
            return found
        return tuple(f if f is not None else o for f, o in zip(found, own, strict=True))

    def unknown_inputs(self) -> dict[str, Dims | None]:
        """The inputs with a dim (or their rank) still unknown."""
        return {k: d for k, d in self.inputs.items() if d is None or None in d}

    def costed_at(self) -> str:
        """``x:1x3x48x320, y:1x10`` for the inputs (not scalars) whose dims are all known."""
        return ", ".join(f"{k}:{'x'.join(map(str, d))}" for k, d in self.inputs.items()
                         if d and None not in d)

    def why_unknown(self, where: str) -> str:
        """Why a cost at ``where`` (a node label) is unknown, with what to give."""
        missing = self.unknown_inputs()
        if not missing:
            return (f"shape inference leaves a dim unknown at {where} even with every input "
                    f"dim known")
        items = " ".join(f"--input-shape {name}:{self.examples.get(name) or '...'}"
                         for name in missing)
        names = ", ".join(f"{k} {format_dims(d)}" for k, d in missing.items())
        return f"input {names} has unknown dims; give {items}"


def concrete_shapes(model: ir.Model,
                    input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> ShapeTable:
    """Infer every value's dims with the inputs fixed as :func:`resolve_input_shapes` says.

    Runs on a weightless serialized copy; ``model`` is not changed. Stale or ``-1`` dims in
    the model's value infos and declared outputs are dropped first, so inference is not held
    to them. Inference that fails leaves the table with the inputs only (a warning is logged).
    """
    resolved = resolve_input_shapes(model, input_shapes)
    table = ShapeTable()
    for value, spec in _cost_inputs(model):
        name = value.name or ""
        dims = resolved.get(name) or static_dims(value)
        if dims is not None and name not in resolved:
            dims = _per_sample(dims, static_dims(value), spec.batch_axis)
        table.inputs[name] = dims
        if dims is None or None in dims:
            table.examples[name] = replace(spec, dims=dims).example_shape() if dims else ""
    inputs = table.inputs

    def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
        _fix_inputs(proto.graph, inputs)
        _widen_row_subsets(proto.graph)
        propagate_shape_values(proto)
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)

    try:
        inferred = call_without_weights(infer, model)
    except Exception as exc:  # inference failing must not stop the cost; dims stay unknown
        logger.warning("shape inference for the cost failed (%s); MACs may be unknown",
                       " ".join(str(exc).split())[:200])
        return table
    _collect(inferred.graph, table.values)
    return table


def _fix_inputs(graph: onnx.GraphProto, inputs: Mapping[str, Dims | None]) -> None:
    """Set the inputs' dims and drop every other declared shape that could contradict them."""
    _drop_value_infos(graph)
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    for value in graph.input:
        dims = inputs.get(value.name)
        if dims is None or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for i, d in enumerate(dims):
            dim = shape.dim.add()
            if d is None:
                dim.dim_param = f"{value.name}_dim{i}"
            else:
                dim.dim_value = d


def _widen_row_subsets(graph: onnx.GraphProto) -> None:
    """Cost a data-dependent subset of rows as all of them (the worst case).

    ``GatherND(data, Transpose(NonZero(mask)))`` picks the rows of ``data`` whose mask is set
    (early exit's batched form passes on only the samples that did not exit); their count is
    known only at run time, so inference leaves it unknown and every cost after it too. In the
    weightless copy used for inference the pick becomes ``Identity(data)``: every row goes on,
    as an ``If`` is costed by its costliest branch. The model itself is not changed.
    """
    made_by = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "GatherND" or len(node.input) != 2:
            continue
        if any(a.name == "batch_dims" and a.i != 0 for a in node.attribute):
            continue
        transpose = made_by.get(node.input[1])
        nonzero = made_by.get(transpose.input[0]) if transpose is not None and \
            transpose.op_type == "Transpose" else None
        if nonzero is None or nonzero.op_type != "NonZero":
            continue
        data = node.input[0]
        node.op_type = "Identity"
        del node.input[:]
        del node.attribute[:]
        node.input.append(data)
    for sub in _subgraphs(graph):
        _widen_row_subsets(sub)


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                yield from attribute.graphs


def _drop_value_infos(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for sub in _subgraphs(graph):
        _drop_value_infos(sub)


def _collect(graph: onnx.GraphProto, found: dict[str, Dims]) -> None:
    for value in chain(graph.input, graph.value_info, graph.output):
        dims = type_dims(value.type)
        if dims is not None:
            found[value.name] = dims
    for sub in _subgraphs(graph):
        _collect(sub, found)


def numel(dims: Dims | None) -> int | None:
    """Number of elements, or None when a dim (or the rank) is unknown."""
    if dims is None or None in dims:
        return None
    return math.prod(d for d in dims if d is not None)
