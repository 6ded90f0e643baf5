"""Linear consumers seen as matrices, and their input rows and outputs at sampled positions.

A linear consumer (Conv with ``group == 1``, Gemm, MatMul with a constant weight) computes, at
every output position ``s`` (a sample and, for Conv, a spatial location)

    y_s = sum_p sum_k M[:, p, k] * x_s[p, k] + b

where ``p`` runs over the ``P`` positions of its input channel axis and ``k`` over the ``K``
values each position contributes: the kernel window for Conv (``K = prod(kernel)``, im2col at
one location, zero padding included), a single value for Gemm and MatMul. ``M`` is the weight
seen as ``[O, P, K]`` and ``b`` the effective bias.

:class:`LinearView` extracts ``x_s`` and ``y_s`` only at sampled positions, so statistics and
least-squares fits never build the full im2col matrix: memory is bounded by ``positions per
sample x batch``. Views are built from a table keyed by op type (:data:`VIEWS`); each view can
also write a refitted ``M`` and ``b`` back into its node.

Activations themselves are captured with :func:`onnxopt.session.stream_tensors`
(intermediate tensors as extra outputs of a copy of the model, run batch by batch in
onnxruntime).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.channels.surgery import set_weight
from onnxopt.ir import (
    attr,
    clone_model,
    const_array,
    is_standard,
    iter_values,
    remove_dead_nodes,
    remove_unused_initializers,
)
from onnxopt.layouts import WeightLayout, gemm_bias, weight_layout
from onnxopt.provenance import why_not_constant

__all__ = ["VIEWS", "LinearView", "linear_view", "sample_rows", "truncated_copy"]


def truncated_copy(model: ir.Model, names: list[str]) -> ir.Model:
    """A copy of ``model`` whose outputs are the tensors ``names`` and nothing after them.

    Graph inputs among ``names`` are not made outputs (callers read them from the feeds);
    when only those remain, the copy keeps the original outputs.

    Raises:
        KeyError: A name is not a tensor of the main graph.
    """
    copy = clone_model(model)
    values = {v.name: v for v in iter_values(copy.graph) if v.name}
    inputs = {v.name for v in copy.graph.inputs}
    wanted = [values[n] for n in dict.fromkeys(names) if n not in inputs]
    if not wanted:
        return copy
    for value in wanted:
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(wanted)
    remove_dead_nodes(copy.graph)
    remove_unused_initializers(copy.graph)
    return copy


def sample_rows(count: int, per_row: int, rng: np.random.Generator) -> np.ndarray:
    """``per_row`` random indices below ``count``, sorted (all of them if there are fewer)."""
    if per_row >= count:
        return np.arange(count)
    return np.sort(rng.choice(count, size=per_row, replace=False))


@dataclass(eq=False)
class LinearView:
    """A linear consumer as ``y = M x + b`` (see the module docstring).

    Attributes:
        node: The consumer.
        weight: ``M`` as ``[O, P, K]`` (float64).
        bias: The effective bias ``b`` (``[O]``), or None when the op has no bias slot.
    """

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None

    @property
    def fits_bias(self) -> bool:
        """Whether a refit may change the bias (the op has a bias slot)."""
        return self.bias is not None

    def sample(self, out_shape: tuple[int, ...], per_sample: int,
               rng: np.random.Generator) -> np.ndarray:
        """Sampled output positions: ``[S, rank]`` indices into the output, channel axis 0."""
        raise NotImplementedError

    def rows(self, x: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """The input rows ``x_s`` at ``coords``: ``[S, P, K]``."""
        raise NotImplementedError

    def outputs(self, y: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """The outputs ``y_s`` at ``coords``: ``[S, O]``."""
        raise NotImplementedError

    def write(self, graph: ir.Graph, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Make the node compute ``weight`` (``[O, P, K]``) and ``bias`` (``[O]``)."""
        raise NotImplementedError


# -- Conv -------------------------------------------------------------------------------------


@dataclass(eq=False)
class ConvView(LinearView):
    """Conv with ``group == 1``: rows are kernel windows (im2col) at sampled locations."""

    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = None
    auto_pad: str = "NOTSET"
    dtype: np.dtype = np.dtype(np.float32)

    def sample(self, out_shape: tuple[int, ...], per_sample: int,
               rng: np.random.Generator) -> np.ndarray:
        batch, spatial = out_shape[0], out_shape[2:]
        locations = math.prod(spatial)
        if per_sample >= locations:
            flat = np.tile(np.arange(locations), (batch, 1))
        else:  # per_sample distinct locations of each sample, in order
            keys = rng.random((batch, locations))
            flat = np.sort(np.argpartition(keys, per_sample, axis=1)[:, :per_sample], axis=1)
        n = np.repeat(np.arange(batch), flat.shape[1])
        return np.stack([n, *np.unravel_index(flat.reshape(-1), spatial)], axis=1)

    def _pads(self, x: np.ndarray) -> list[tuple[int, int]]:
        nd = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = []
            for d in range(nd):
                size, s = x.shape[2 + d], self.strides[d]
                extent = (self.kernel[d] - 1) * self.dilations[d] + 1
                total = max(0, (-(-size // s) - 1) * s + extent - size)
                small, large = total // 2, total - total // 2
                pads.append((small, large) if self.auto_pad == "SAME_UPPER" else (large, small))
            return pads
        if self.auto_pad == "VALID" or not self.pads:
            return [(0, 0)] * nd
        return [(self.pads[d], self.pads[d + nd]) for d in range(nd)]

    def rows(self, x: np.ndarray, coords: np.ndarray) -> np.ndarray:
        # Gathered from x itself with the padding as a mask: padding a whole large map
        # copied it once per consumer and batch.
        pads = self._pads(x)
        n, where = coords[:, 0], coords[:, 1:]
        columns = []
        for offset in itertools.product(*(range(k) for k in self.kernel)):
            index, inside = [], np.ones(len(coords), dtype=bool)
            for d in range(len(self.kernel)):
                at = where[:, d] * self.strides[d] + offset[d] * self.dilations[d] - pads[d][0]
                inside &= (at >= 0) & (at < x.shape[2 + d])
                index.append(np.clip(at, 0, x.shape[2 + d] - 1))
            column = x[(n, slice(None), *index)]  # [S, P]
            columns.append(column if inside.all() else column * inside[:, None])
        return np.stack(columns, axis=2)

    def outputs(self, y: np.ndarray, coords: np.ndarray) -> np.ndarray:
        return y[(coords[:, 0], slice(None), *coords[:, 1:].T)]

    def write(self, graph: ir.Graph, weight: np.ndarray, bias: np.ndarray | None) -> None:
        shape = (weight.shape[0], weight.shape[1], *self.kernel)
        set_weight(graph, self.node, 1, weight.reshape(shape).astype(self.dtype))
        if bias is not None:
            set_weight(graph, self.node, 2, bias.astype(self.dtype))


def _conv_view(node: ir.Node) -> LinearView | str:
    weight = const_array(node.inputs[1])
    if weight is None:
        return f"Conv weight is not a constant: {why_not_constant(node.inputs[1])}"
    if weight.ndim < 3:
        return f"Conv weight has rank {weight.ndim}"
    layout = weight_layout(node, weight.ndim)
    if layout.group != 1:
        return "grouped Conv"
    nd = weight.ndim - 2
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if len(node.inputs) > 2 and node.inputs[2] is not None and bias is None:
        return f"Conv bias is not a constant: {why_not_constant(node.inputs[2])}"
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    out, cin = layout.out_channels(weight.shape), layout.in_channels(weight.shape)
    return ConvView(
        node, layout.by_output(weight).reshape(out, cin, -1).astype(np.float64),
        np.zeros(out) if bias is None else bias.astype(np.float64).reshape(out),
        kernel=tuple(weight.shape[2:]),
        strides=tuple(attr(node, "strides", None) or [1] * nd),
        dilations=tuple(attr(node, "dilations", None) or [1] * nd),
        pads=tuple(attr(node, "pads", None) or []) or None, auto_pad=auto_pad,
        dtype=weight.dtype)


# -- Gemm and MatMul --------------------------------------------------------------------------


@dataclass(eq=False)
class GemmView(LinearView):
    """Gemm ``alpha * A' B' + beta * C``: one row per sample (transposed when ``transA``)."""

    trans_a: bool = False
    layout: WeightLayout = WeightLayout(1, 0)
    dtype: np.dtype = np.dtype(np.float32)

    def sample(self, out_shape: tuple[int, ...], per_sample: int,
               rng: np.random.Generator) -> np.ndarray:
        return np.arange(out_shape[0])[:, None]

    def rows(self, x: np.ndarray, coords: np.ndarray) -> np.ndarray:
        a = x.T if self.trans_a else x
        return a[coords[:, 0], :, None]

    def outputs(self, y: np.ndarray, coords: np.ndarray) -> np.ndarray:
        return y[coords[:, 0]]

    def write(self, graph: ir.Graph, weight: np.ndarray, bias: np.ndarray | None) -> None:
        node = self.node
        matrix = weight[:, :, 0]  # [O, F]: alpha and beta become 1
        set_weight(graph, node, 1, self.layout.from_output(matrix).astype(self.dtype))
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        if bias is not None:
            set_weight(graph, node, 2, bias.astype(self.dtype))


def _gemm_view(node: ir.Node) -> LinearView | str:
    b = const_array(node.inputs[1])
    if b is None:
        return f"Gemm weight is not a constant: {why_not_constant(node.inputs[1])}"
    if b.ndim != 2:
        return "Gemm weight is not a matrix"
    layout = weight_layout(node, b.ndim)
    alpha = float(attr(node, "alpha", 1.0))
    matrix = alpha * layout.by_output(b).astype(np.float64)  # [O, F]
    out = matrix.shape[0]
    bias = np.zeros(out)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = const_array(node.inputs[2])
        if c is None:
            return f"Gemm bias is not a constant: {why_not_constant(node.inputs[2])}"
        bias = gemm_bias(node, c.astype(np.float64), out)
        if isinstance(bias, str):
            return bias
        bias = bias.copy()
    return GemmView(node, matrix[:, :, None], bias, trans_a=bool(attr(node, "transA", 0)),
                    layout=layout, dtype=b.dtype)


@dataclass(eq=False)
class MatMulView(LinearView):
    """MatMul ``A @ B`` with a constant 2-D ``B``: rows are the vectors along A's last axis."""

    layout: WeightLayout = WeightLayout(1, 0)
    dtype: np.dtype = np.dtype(np.float32)

    def sample(self, out_shape: tuple[int, ...], per_sample: int,
               rng: np.random.Generator) -> np.ndarray:
        batch = out_shape[0] if len(out_shape) > 2 else 1
        inner = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else out_shape[0]
        if len(out_shape) == 2:
            return np.arange(inner)[:, None]
        parts = [n * inner + sample_rows(inner, per_sample, rng) for n in range(batch)]
        return np.concatenate(parts)[:, None]

    def rows(self, x: np.ndarray, coords: np.ndarray) -> np.ndarray:
        return x.reshape(-1, x.shape[-1])[coords[:, 0], :, None]

    def outputs(self, y: np.ndarray, coords: np.ndarray) -> np.ndarray:
        return y.reshape(-1, y.shape[-1])[coords[:, 0]]

    def write(self, graph: ir.Graph, weight: np.ndarray, bias: np.ndarray | None) -> None:
        set_weight(graph, self.node, 1, self.layout.from_output(weight[:, :, 0]).astype(self.dtype))


def _matmul_view(node: ir.Node) -> LinearView | str:
    b = const_array(node.inputs[1])
    if b is None:
        return f"MatMul weight is not a constant: {why_not_constant(node.inputs[1])}"
    if b.ndim != 2:
        return "MatMul weight is not a matrix"
    layout = weight_layout(node, b.ndim)
    return MatMulView(node, layout.by_output(b).astype(np.float64)[:, :, None], None,
                      layout=layout, dtype=b.dtype)


VIEWS: dict[str, Callable[[ir.Node], LinearView | str]] = {
    "Conv": _conv_view,
    "Gemm": _gemm_view,
    "MatMul": _matmul_view,
}
"""Op type -> its :class:`LinearView`, or the reason it has none."""


def linear_view(node: ir.Node) -> LinearView | str:
    """The linear view of a consumer node, or why there is none."""
    if not is_standard(node):
        return f"{node.domain}::{node.op_type} is not a linear consumer"
    build = VIEWS.get(node.op_type)
    if build is None:
        return f"{node.op_type} is not a linear consumer"
    return build(node)
