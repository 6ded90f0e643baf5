"""What a model expects of its inputs (dtype, dims, batch axis), and whether data fits them.

The batch axis of each input is read from the model's dims, so inputs that do not carry
the batch first are fed right: a recurrent state ``[2, batch, 128]`` is batched along axis
1, a 0-d sample rate is fed as given. The rules, in order, for an input of known rank:

1. the axis holding the model's batch symbol (the symbol at axis 0 of the first input
   whose axis 0 is symbolic, e.g. ``batch``);
2. axis 0 if it is dynamic;
3. the axis holding the first input's static batch size, when that is static;
4. the one unnamed dynamic axis, if there is exactly one;
5. none: the input is fed as given with every batch (states of fixed shape, scalars,
   sequences, optionals and maps always are).

Data types are checked, not coerced: float data of another width is cast to the model's
float type with a note; integer data for a float input (raw uint8 pixels, say) is an
error that says how to normalise it, unless ``cast_inputs`` asks to convert values as
they are; integers are converted between widths only when every value fits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import DataError
from onnxopt.opaque_types import has_opaque_type

logger = logging.getLogger(__name__)

#: A model dim as read here: a size, a symbol, or None (dynamic, unnamed).
Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """What the model expects of one input.

    Attributes:
        name: The graph input's name.
        dtype: Its numpy dtype (None when numpy has no plain equivalent).
        dims: Its dims after ``--input-shape`` overrides (None = dynamic), or None when
            the rank is unknown.
        is_tensor: False for sequences, optionals and maps (fed as given, not checked).
        batch_axis: The axis that holds the batch, or None if the input has none.
        symbols: The model's symbolic dim names (None where a dim has none), for messages.
        kind: What the input is, for messages ("tensor", "sequence", ...).
    """

    name: str
    dtype: Any
    dims: tuple[int | None, ...] | None
    is_tensor: bool = True
    batch_axis: int | None = 0
    symbols: tuple[str | None, ...] | None = None
    kind: str = "tensor"

    def shape_text(self) -> str:
        """The expected shape: sizes, ``N`` at the batch axis, other dynamic dims by name."""
        if not self.is_tensor:
            return self.kind
        if self.dims is None:
            return "[?]"
        return "[" + ", ".join(self._dim_text(i) for i in range(len(self.dims))) + "]"

    def example_shape(self) -> str:
        """An ``--input-shape`` value with the dims to fill in spelt out (``1xSEQUENCE``)."""
        parts = []
        for axis, dim in enumerate(self.dims or ()):
            symbol = self.symbols[axis] if self.symbols else None
            parts.append(str(dim) if dim is not None else "1" if axis == self.batch_axis
                         else (symbol or f"D{axis}").upper())
        return "x".join(parts)

    def _dim_text(self, axis: int) -> str:
        dim = self.dims[axis] if self.dims else None
        if dim is not None:
            return str(dim)
        if axis == self.batch_axis:
            return "N"
        symbol = self.symbols[axis] if self.symbols else None
        return symbol or "?"


def _numpy_dtype(dtype: ir.DataType | None) -> Any:
    """The numpy dtype of an ONNX element type, or None if numpy has no plain equivalent."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype.numpy())
    except Exception:  # string and exotic types: no dtype check
        return None


def _model_dims(value: ir.Value) -> tuple[Dim, ...] | None:
    if value.shape is None:
        return None
    # a negative dim (-1, as some exporters write a dynamic one) is unknown, not a size
    return tuple((d if d >= 0 else None) if isinstance(d, int)
                 else (d.value if isinstance(d, ir.SymbolicDim) else None)
                 for d in value.shape)


def batch_axes(shapes: Sequence[tuple[Dim, ...] | None]) -> list[int | None]:
    """The batch axis of each input from the model's dims (rules in the module docstring).

    Args:
        shapes: Per input, its dims (sizes, symbols or None), or None when the input is
            not a tensor or its rank is unknown.
    """
    ranked = [s for s in shapes if s]
    symbol = next((s[0] for s in ranked if isinstance(s[0], str)), None)
    reference = ranked[0][0] if ranked else None
    axes: list[int | None] = []
    for dims in shapes:
        if not dims:
            axes.append(None)
        elif symbol is not None and symbol in dims:
            axes.append(dims.index(symbol))
        elif not isinstance(dims[0], int):
            axes.append(0)
        elif isinstance(reference, int) and reference in dims:
            axes.append(dims.index(reference))
        else:
            unnamed = [i for i, d in enumerate(dims) if d is None]
            axes.append(unnamed[0] if len(unnamed) == 1 else None)
    return axes


def output_batch_axes(model: ir.Model) -> list[int]:
    """The batch axis of each graph output, by the rules for inputs applied to the outputs'
    dims beside the inputs' (the model's batch symbol, else axis 0)."""
    inputs = [_model_dims(v) for v in model.graph.inputs if not v.is_initializer()
              and _kind(v) == "tensor"]
    outputs = [_model_dims(v) for v in model.graph.outputs]
    axes = batch_axes([*inputs, *outputs])[len(inputs):]
    return [0 if axis is None else axis for axis in axes]


def input_specs(model: ir.Model, overrides: Mapping[str, tuple[int, ...]] | None = None,
                ) -> list[InputSpec]:
    """The feedable inputs of ``model`` with dims from the model or ``--input-shape``.

    The batch axis always comes from the model's own dims, so an override that fixes the
    batch (``input:1x576``) keeps it where the model has it.

    Raises:
        DataError: An override's rank differs from the model input's.
    """
    overrides = overrides or {}
    values = [v for v in model.graph.inputs if not v.is_initializer()]
    kinds = [_kind(v) for v in values]
    model_dims = [_model_dims(v) if kind == "tensor" else None
                  for v, kind in zip(values, kinds, strict=True)]
    axes = batch_axes(model_dims)
    specs = []
    for value, kind, dims, axis in zip(values, kinds, model_dims, axes, strict=True):
        name = value.name or ""
        symbols = None if dims is None else tuple(d if isinstance(d, str) else None for d in dims)
        shape: tuple[int | None, ...] | None = None if dims is None else tuple(
            d if isinstance(d, int) else None for d in dims)
        if name in overrides:
            given = tuple(overrides[name])
            if shape is not None and len(given) != len(shape):
                spec = InputSpec(name, None, shape, batch_axis=axis, symbols=symbols)
                raise DataError(f"--input-shape {name}:{'x'.join(map(str, given))} has "
                                f"{len(given)} dims; input '{name}' has {len(shape)} "
                                f"({spec.shape_text()})")
            if shape is None:
                axis = 0
            shape = given
        specs.append(InputSpec(name, _numpy_dtype(value.dtype) if kind == "tensor" else None,
                               shape, kind == "tensor", axis if kind == "tensor" else None,
                               symbols, kind))
    return specs


def _kind(value: ir.Value) -> str:
    if isinstance(value.type, ir.SequenceType):
        return "sequence"
    if isinstance(value.type, ir.OptionalType):
        return "optional"
    if value.type is None and has_opaque_type(value):
        return "map"
    if value.type is not None and not isinstance(value.type, ir.TensorType):
        return "non-tensor"
    return "tensor"


# -- shapes and names -------------------------------------------------------------------------


def fits(shape: tuple[int, ...], dims: tuple[int | None, ...], skip: int | None = None) -> bool:
    """Whether ``shape`` matches every static dim of ``dims`` (but the one at ``skip``)."""
    return len(shape) == len(dims) and all(
        d is None or i == skip or s == d for i, (s, d) in enumerate(zip(shape, dims, strict=True)))


def shape_error(where: str, spec: InputSpec, shape: tuple[int, ...]) -> DataError:
    """The error for data of ``shape``: its shape, its sample count, what the model expects."""
    axis = spec.batch_axis
    samples = (f" ({shape[axis]} samples)" if axis is not None and len(shape) > axis
               else f" ({shape[0]} samples)" if shape else "")
    return DataError(f"{where}: input '{spec.name}' has shape {list(shape)}{samples}; "
                     f"the model expects {spec.shape_text()}")


def check_names(feeds: Mapping[str, Any], specs: list[InputSpec], where: str) -> None:
    """Refuse data that lacks a model input (naming the arrays it has instead)."""
    unknown = sorted(set(feeds) - {s.name for s in specs} - {"labels"})
    for spec in specs:
        if spec.name not in feeds:
            hint = f" (it has {', '.join(unknown)})" if unknown else ""
            raise DataError(f"{where}: no data for model input '{spec.name}' "
                            f"(expected shape {spec.shape_text()}){hint}")


# -- data types -----------------------------------------------------------------------------


def conform_dtype(array: np.ndarray, spec: InputSpec, where: str, *, cast_inputs: bool = False,
                  ) -> tuple[np.ndarray, tuple[int, str] | None]:
    """``array`` in the model's dtype, and ``(log level, note)`` when it was converted.

    Args:
        array: The data for ``spec``.
        spec: The model input.
        where: The data's source, for messages.
        cast_inputs: Convert any numeric data to the model's dtype, values as they are.

    Raises:
        DataError: The data's type does not fit and is not converted (the message says
            what to do).
    """
    want, have = spec.dtype, array.dtype
    if want is None or have == want:
        return array, None
    if want.kind == "O" and have.kind in "USO":  # strings: numpy's str or object arrays
        return array.astype(object), None
    name, numeric = spec.name, "biuf"
    kinds = dtype_kind(want), dtype_kind(have)
    if kinds == ("f", "f"):
        return array.astype(want), (logging.WARNING, f"{where}: input '{name}' is {have}; "
                                    f"cast to {want}, the model's type")
    if kinds[0] in "biu" and kinds[1] in "biu":
        if np.can_cast(have, want, casting="safe"):
            return array.astype(want), (logging.INFO, f"{where}: input '{name}' is {have}; "
                                        f"converted to {want}, the model's type")
        if kinds[0] in "iu" and kinds[1] in "iu" and (array.size == 0 or (
                int(array.min()) >= np.iinfo(want).min and int(array.max()) <= np.iinfo(want).max)):
            return array.astype(want), (logging.INFO, f"{where}: input '{name}' is {have}; "
                                        f"its values fit {want}, the model's type, and are "
                                        f"converted")
    if cast_inputs and kinds[0] in numeric and kinds[1] in numeric:
        return array.astype(want), (logging.INFO, f"{where}: input '{name}' is {have}; "
                                    f"converted to {want} as cast_inputs asks")
    hint = " (--cast-inputs, or cast_inputs=True in Python, converts the values as they are)"
    if kinds[0] == "f" and kinds[1] in "biu":
        raise DataError(f"{where}: input '{name}' is {have} but the model takes {want}: "
                        f"convert and normalise it the way the model was trained "
                        f"(e.g. x.astype('{want}') / 255){hint}")
    if kinds[0] in "iu" and kinds[1] in "iu":
        raise DataError(f"{where}: input '{name}' is {have} with values outside the range of "
                        f"{want}, the model's type")
    if kinds[0] in "biu" and kinds[1] in numeric:
        raise DataError(f"{where}: input '{name}' is {have} but the model takes {want}: give "
                        f"{want} data (indices, ids or flags as the model was trained){hint}")
    raise DataError(f"{where}: input '{name}' is {have} but the model takes {want}")


def dtype_kind(dtype: np.dtype) -> str:
    """numpy's kind letter, with ml_dtypes' bfloat16 and float8 types counted as floats."""
    return "f" if dtype.kind == "V" and "float" in dtype.name else dtype.kind
