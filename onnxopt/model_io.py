"""Load, save and convert models: lazy external data, old-IR inputs, atomic writes, opsets."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxopt.errors import ModelError, UserError
from onnxopt.ir import from_proto
from onnxopt.large_weights import call_without_weights, is_large_weight
from onnxopt.opaque_types import has_opaque_type, restore_opaque_types

logger = logging.getLogger(__name__)

#: Protobuf cannot serialize more than 2 GiB; above this we write external data.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
#: Tensors smaller than this stay inline when external data is written.
_INLINE_LIMIT = 1024
#: Up to this many bytes of weights, :func:`serialized_size` serializes the model to count.
_EXACT_SIZE_LIMIT = 4_000_000

ModelLike = "str | os.PathLike | onnx.ModelProto | ir.Model"
#: ``Model.meta`` key (in memory, never saved) of the bytes on disk of the file a model was
#: loaded from, with its external data: the original's size in reports, as ``onnxopt info``.
#: ``optimize`` takes it off the model it rewrites, so a second run does not reuse it.
SOURCE_BYTES = "onnxopt.source_bytes"


def load(model: str | os.PathLike | onnx.ModelProto | ir.Model,
         *, promote_initializer_inputs: bool = True) -> ir.Model:
    """Load a model into onnx_ir.

    Args:
        model: A path, a ``ModelProto`` or an ``onnx_ir.Model`` (returned as is).
        promote_initializer_inputs: Old exporters list every initializer as a graph
            input too, which makes the weights overridable and so not constants. When
            True those inputs are dropped from the input list (the IR version is raised
            to 4 when needed), which is what every runtime does when they are not fed.

    Raises:
        ModelError: The file is missing, unreadable, not ONNX, or its external data
            points outside the model's folder.
    """
    if isinstance(model, ir.Model):
        result = model
    elif isinstance(model, onnx.ModelProto):
        result = from_proto(model)
    else:
        result = _load_path(Path(model))
    if promote_initializer_inputs:
        _promote_initializer_inputs(result)
    return result


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a directory, not an .onnx file: {path}")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise ModelError(f"not a readable ONNX model: {path} ({_short(exc)})") from None
    except Exception as exc:  # protobuf raises several unrelated types on garbage input
        raise ModelError(f"not a readable ONNX model: {path} ({_short(exc)})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelError(f"not a readable ONNX model: {path} (no graph found)")
    check_external_locations(proto, path.parent)
    try:
        model = from_proto(proto)
    except Exception as exc:
        raise ModelError(f"not a valid ONNX model: {path} ({_short(exc)})") from None
    # External tensors are memory-mapped lazily relative to the model's folder.
    ir.external_data.set_base_dir(model.graph, path.parent)
    model.meta[SOURCE_BYTES] = file_size(path)
    return model


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def check_external_locations(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that are absolute or escape ``base_dir``."""
    base = base_dir.resolve()
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelError(
                f"external data of tensor {tensor.name!r} points outside the model folder: "
                f"{location!r}")
        if not target.exists():
            raise ModelError(f"external data file of tensor {tensor.name!r} not found: "
                             f"{location!r}")


def _all_tensors(proto: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(proto)


def _promote_initializer_inputs(model: ir.Model) -> None:
    graph = model.graph
    promoted = [v for v in graph.inputs if v.is_initializer()]
    if not promoted:
        return
    for value in promoted:
        graph.inputs.remove(value)
    if model.ir_version < 4:
        model.ir_version = 4
    logger.info("treating %d initializers listed as graph inputs as constants", len(promoted))


def total_weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers of the main graph."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` atomically: a temporary file in the target folder, then a rename.

    Args:
        model: The model to write.
        path: Destination ``.onnx`` path.
        external_data: Write weights to ``<name>.data`` beside the model. ``None`` means
            when the model would exceed protobuf's 2 GB limit, or when it was loaded with
            external data (its weights are then copied into the new data file, so the
            output never points at the input's files).

    Returns:
        The destination path.

    Raises:
        UserError: The destination is a directory, its folder does not exist or is not
            writable, or the disk is full. No partial file is left behind.
    """
    dest = Path(path)
    folder = check_writable(dest)
    if external_data is None:
        external_data = (total_weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
                         or has_external_weights(model))
    data_name = dest.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=folder))
    except OSError as exc:
        raise UserError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        tmp_model = tmp_dir / dest.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=_INLINE_LIMIT)
            os.replace(tmp_dir / data_name, folder / data_name)
        else:
            ir.save(model, tmp_model)
        _restore_opaque_types(tmp_model, model)
        os.replace(tmp_model, dest)
    except OSError as exc:
        raise UserError(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest


def _restore_opaque_types(path: Path, model: ir.Model) -> None:
    """Write back into a saved file the map types onnx_ir cannot hold (see ``from_proto``)."""
    if not any(has_opaque_type(v) for g in model.graphs() for v in (*g.inputs, *g.outputs)):
        return
    proto = onnx.load(os.fspath(path), load_external_data=False)
    restore_opaque_types(proto, model)
    onnx.save(proto, os.fspath(path))


def check_writable(dest: Path, *, folder_ok: bool = False) -> Path:
    """Fail early, before any work, on an output path that cannot be written.

    Args:
        dest: The file (or, with ``folder_ok``, the folder) to be written.
        folder_ok: ``dest`` may be an existing folder (a bundle is one).

    Returns:
        The folder ``dest`` is written in.

    Raises:
        UserError: ``dest`` is a directory, or its folder does not exist or is not writable.
    """
    if dest.is_dir() and not folder_ok:
        raise UserError(f"output path is a directory: {dest}")
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder is not writable: {folder}")
    return folder


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically: a temporary file beside it, then a rename.

    Raises:
        UserError: The file cannot be written (no partial file is left behind).
    """
    dest = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent or Path("."))
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; open() would not
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, dest)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise UserError(f"cannot write {dest}: {exc.strerror or exc}") from None
    return dest


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Files that ``tempfile`` creates (0600, folders 0700) and then renames into place get
    ``0o666 & ~umask`` (folders ``0o777 & ~umask``), as a plain ``open``/``mkdir`` would.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: the classic read, which sets it for an instant
    os.umask(mask)
    return mask


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus its external data files."""
    p = Path(path)
    total = p.stat().st_size
    data = p.with_name(p.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total


def has_external_weights(model: ir.Model) -> bool:
    """Whether some main-graph initializer is read lazily from an external data file."""
    return any(isinstance(v.const_value, ir.ExternalTensor)
               for v in model.graph.initializers.values())


def serialized_size(model: ir.Model) -> int:
    """Bytes the model would take on disk (protobuf size, weights included).

    Exact for small in-memory models; for models with external or more than
    ``_EXACT_SIZE_LIMIT`` bytes of weights it is the protobuf size without the large
    weights plus their bytes (a few bytes of framing per tensor off), which needs no copy
    of the weights.
    """
    from onnxopt.ir import to_proto

    if total_weight_bytes(model) <= _EXACT_SIZE_LIMIT and not has_external_weights(model):
        return to_proto(model).ByteSize()
    large = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                if is_large_weight(v.const_value))
    return call_without_weights(lambda proto: proto.ByteSize(), model) + large


def check_model(model: ir.Model, path: str | os.PathLike | None = None) -> None:
    """Refuse models that fail ``onnx.checker`` or carry non-finite weights.

    NaN in any floating-point initializer is refused. An infinity is refused only in an
    initializer that a Conv, ConvTranspose, Gemm, MatMul or normalization layer computes with
    (``_FINITE_INPUTS``): elsewhere ``-inf`` is a legitimate constant (a mask, the start of a
    running max, a clip bound), as in models exported from JAX or TensorFlow.

    Args:
        model: The loaded model.
        path: Its file, if any; the checker then reads it from disk, which also works for
            models with external data over 2 GB.

    Raises:
        ModelError: With the checker's first line, or the name of the non-finite weight.
    """
    try:
        if path is not None:
            onnx.checker.check_model(os.fspath(path))
        else:
            from onnxopt.ir import to_proto

            onnx.checker.check_model(to_proto(model))
    except Exception as exc:  # the checker raises several exception types
        raise ModelError(f"model fails onnx.checker: {_short(exc)} "
                         f"(--no-check proceeds anyway)") from None
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or not tensor.dtype.is_floating_point():
            continue
        infinite_ok = not any(
            index in _FINITE_INPUTS.get(node.op_type, ()) for node, index in value.uses()
            if node.domain in ("", "ai.onnx"))
        try:
            bad = _non_finite(tensor.numpy(), infinite_ok=infinite_ok)
        except Exception:  # exotic dtypes numpy cannot hold; the runtime will judge them
            continue
        if isinstance(tensor, ir.ExternalTensor):
            # Unmap what the scan read (it maps its file again on next use), unless someone
            # else still holds a view of the mapping.
            with contextlib.suppress(BufferError):
                tensor.release()
        if bad:
            raise ModelError(f"weight {name!r} contains {bad} (--no-check proceeds anyway)")


#: Inputs (by index) whose values a layer multiplies or divides with: an infinity there
#: makes every output it reaches NaN or Inf, so it is a broken model, not a mask.
_FINITE_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
}


def _non_finite(array: np.ndarray, *, infinite_ok: bool, chunk: int = 1 << 22) -> str:
    """``"NaN"`` or ``"Inf"`` if the array holds one (Inf only when not ``infinite_ok``),
    else ``""``; scanned in chunks, so a huge weight needs no huge temporary."""
    flat = array.reshape(-1)
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk].astype(np.float32, copy=False)
        if np.isnan(part).any():
            return "NaN"
        if not infinite_ok and np.isinf(part).any():
            return "Inf"
    return ""
