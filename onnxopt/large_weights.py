"""Large weights kept out of protos and memory: calls on a weightless proto, unmapping."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import onnx
import onnx_ir as ir

from onnxopt.ir import to_proto

#: Initializers at most this large stay in the proto :func:`call_without_weights` builds.
SMALL_WEIGHT_BYTES = 1024

_R = TypeVar("_R")


def is_large_weight(tensor: ir.TensorProtocol | None) -> bool:
    """Whether :func:`call_without_weights` leaves this initializer out of the proto."""
    return tensor is not None and (isinstance(tensor, ir.ExternalTensor)
                                   or tensor.nbytes > SMALL_WEIGHT_BYTES)


def call_without_weights(func: Callable[[onnx.ModelProto], _R], model: ir.Model) -> _R:
    """Call ``func`` on a ``ModelProto`` of ``model`` that leaves the large weights out.

    Main-graph initializers above :data:`SMALL_WEIGHT_BYTES`, and every external one, become
    graph inputs of the same type and shape for the call. The checker and shape inference
    need no weight values, so this serves them without a second copy of the weights, works
    past protobuf's 2 GB limit, and never resolves external data against the working
    directory. The model is restored afterwards, initializer order included.
    """
    graph = model.graph
    order = list(graph.initializers.values())
    large = [v for v in order if is_large_weight(v.const_value)]
    tensors = {id(v): v.const_value for v in large}
    inputs = list(graph.inputs)
    try:
        for value in large:
            tensor = value.const_value
            if value.shape is None:
                value.shape = tensor.shape
            if value.dtype is None:
                value.dtype = tensor.dtype
            del graph.initializers[value.name]
            value.const_value = None
            if not value.is_graph_input():
                graph.inputs.append(value)
        proto = to_proto(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        for value in large:
            value.const_value = tensors[id(value)]
        graph.initializers.clear()
        for value in order:
            graph.initializers.add(value)
    return func(proto)


def release_mapped_weights(model: ir.Model) -> None:
    """Unmap the external-data files that the model's weights have been read from so far.

    The data stays on disk and is mapped again on the next read. Pages read for one
    onnxruntime run would otherwise stay resident (and count against the process) until the
    end, beside the new weights a later pass writes. A mapping someone still reads through
    is left alone.
    """
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                with contextlib.suppress(BufferError):
                    value.const_value.release()
