"""Channels that are provably constant: per position of every grouped axis, its value or NaN.

A position of a channel axis is *constant* when the tensor holds the same value ``k`` at that
position for every input and every index of the other axes. One topological sweep computes a
float64 vector per activation axis (NaN = unknown) with a transfer rule per op type:

- Conv, output ``o``: ``b[o] + sum_c k_c * sum(W[o, c])`` when every input channel the filter
  reads with a nonzero weight is constant and the conv is unpadded, and ``b[o]`` (0 without
  bias) when all of them are 0, padded or not; depthwise convs the same per channel.
  ConvTranspose only in the all-zero case (its border outputs see fewer inputs).
- Gemm ``alpha * A B + beta * C`` and MatMul: column ``j`` from the constant inputs it reads.
- Everything else works in the tie's slot space: activations apply their function, BN gives
  ``gamma * (k - mean) / sqrt(var + eps) + beta`` and ``beta`` whenever ``gamma == 0``,
  InstanceNorm ``beta`` when its input is constant or ``gamma == 0``, binary ops broadcast
  with ``0 * x = 0``, index maps (Concat, Split, Slice, reshapes) move values, and
  zero-preserving ops (padded averages, constant Pad, sums) keep only zeros.

Activations are assumed finite, so ``0 * x`` is 0 (as every exact zero-removal must assume).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.channels.groups import ChannelAnalysis, GroupTie, Member
from onnxopt.channels.linear import unpadded
from onnxopt.channels.tie import Port, Role, norm_axis, rank_of
from onnxopt.ir import attr, const_array
from onnxopt.layouts import weight_layout

Vector = np.ndarray
SlotRule = Callable[[ir.Node, GroupTie, list[Vector]], Vector]


class ChannelConstants:
    """Constant values per position of every grouped activation axis (NaN: unknown)."""

    def __init__(self) -> None:
        self._values: dict[tuple[int, int], Vector] = {}

    def of(self, value: ir.Value | None, axis: int, size: int | None = None) -> Vector | None:
        """The vector of ``(value, axis)``; all-NaN of ``size`` when unknown and size given."""
        found = None if value is None else self._values.get((id(value), axis))
        if found is None and size is not None:
            return np.full(size, np.nan)
        return found

    def member(self, member: Member) -> Vector:
        """The vector of an activation member (all NaN when unknown)."""
        return self.of(member.value, member.axis, member.size or 0)  # type: ignore[return-value]

    def set(self, value: ir.Value, axis: int, vector: Vector) -> None:
        """Record the constants of ``(value, axis)``."""
        self._values[(id(value), axis)] = vector


def uniform_along(array: np.ndarray, axis: int) -> Vector:
    """Per index of ``axis``, the value when it is the same everywhere else, else NaN.

    Works through the array in blocks of indices, so a large weight is never copied whole.
    """
    moved = np.moveaxis(np.asarray(array), axis, 0)
    out = np.full(moved.shape[0], np.nan)
    for rows, block in _blocks(moved, 0):
        flat = block.reshape(block.shape[0], -1)
        if flat.shape[1] == 0:
            continue
        first = flat[:, :1]
        same = np.all(flat == first, axis=1)
        out[rows] = np.where(same, first[:, 0].astype(np.float64), np.nan)
    return out


#: Bytes of weight looked at per step when scanning large weights.
_BLOCK_BYTES = 1 << 25


def _blocks(array: np.ndarray, axis: int):
    """``(slice, view)`` pairs covering ``array`` along ``axis`` in blocks of bounded size."""
    n = array.shape[axis]
    per_index = max(1, array.nbytes // max(n, 1))
    step = max(1, _BLOCK_BYTES // per_index)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        index = [slice(None)] * array.ndim
        index[axis] = rows
        yield rows, array[tuple(index)]


def _scalar(value: ir.Value | None) -> float:
    array = const_array(value)
    if array is None or array.size == 0:
        return np.nan
    flat = np.asarray(array).ravel()
    return float(flat[0]) if np.all(flat == flat[0]) else np.nan


# -- slot-space rules ---------------------------------------------------------------------------


def _first(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    return ins[0]


def _zero_only(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    return np.where(ins[0] == 0, 0.0, np.nan)


def _unary(fn: Callable[[Vector], Vector]) -> SlotRule:
    def rule(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
        with np.errstate(all="ignore"):
            return fn(ins[0])
    return rule


def _leaky_relu(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    alpha = float(attr(node, "alpha", 0.01))
    return np.where(ins[0] < 0, alpha * ins[0], ins[0])


def _hard_sigmoid(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    alpha, beta = float(attr(node, "alpha", 0.2)), float(attr(node, "beta", 0.5))
    return np.clip(alpha * ins[0] + beta, 0.0, 1.0)


def _clip(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    if len(node.inputs) == 1:
        lo = np.full_like(ins[0], float(attr(node, "min", -np.inf)))
        hi = np.full_like(ins[0], float(attr(node, "max", np.inf)))
    else:
        lo = ins[1] if node.inputs[1] is not None else np.full_like(ins[0], -np.inf)
        has_max = len(node.inputs) > 2 and node.inputs[2] is not None
        hi = ins[2] if has_max else np.full_like(ins[0], np.inf)
    return np.minimum(np.maximum(ins[0], lo), hi)


def _elu(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    alpha = float(attr(node, "alpha", 1.0))
    with np.errstate(all="ignore"):
        return np.where(ins[0] > 0, ins[0], alpha * (np.exp(ins[0]) - 1.0))


def _mul(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    a, b = ins
    with np.errstate(all="ignore"):
        return np.where((a == 0) | (b == 0), 0.0, a * b)


def _binary(fn: Callable[[Vector, Vector], Vector]) -> SlotRule:
    def rule(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
        with np.errstate(all="ignore"):
            return fn(ins[0], ins[1])
    return rule


def _variadic(fn: Callable[[Sequence[Vector]], Vector]) -> SlotRule:
    def rule(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
        return fn(ins)
    return rule


def _prelu(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    return np.where(ins[0] < 0, ins[0] * ins[1], ins[0])


def _batch_norm(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    x, gamma, beta, mean, var = ins[:5]
    eps = float(attr(node, "epsilon", 1e-5))
    with np.errstate(all="ignore"):
        normed = gamma * (x - mean) / np.sqrt(var + eps) + beta
    return np.where(gamma == 0, beta, normed)


def _instance_norm(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    x, gamma, beta = ins[:3]
    return np.where((gamma == 0) | ~np.isnan(x), beta, np.nan)


def _concat(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    rank = rank_of(node.outputs[0]) or 1
    along = tie.tie.entries[-1].axis == norm_axis(int(attr(node, "axis", 0)), rank)
    if along:  # each slot is covered by exactly one input; uncovered slots are NaN elsewhere
        out = np.full_like(ins[0], np.nan)
        for v in ins:
            out = np.where(np.isnan(out), v, out)
        return out
    out = ins[0]
    for v in ins[1:]:
        out = np.where(out == v, out, np.nan)
    return out


def _average_pool(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    padded = any(attr(node, "pads", None) or []) or attr(node, "auto_pad", "NOTSET") != "NOTSET"
    if padded and attr(node, "count_include_pad", 0):
        return _zero_only(node, tie, ins)
    return ins[0]


def _pad(node: ir.Node, tie: GroupTie, ins: list[Vector]) -> Vector:
    mode = attr(node, "mode", "constant")
    if mode != "constant":
        return ins[0]
    fill = _scalar(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else 0.0
    fill = float(attr(node, "value", fill)) if len(node.inputs) == 1 else fill
    return np.where(ins[0] == fill, fill, np.nan)


_IDENTITY = ("Identity", "Dropout", "MaxPool", "GlobalMaxPool", "GlobalAveragePool", "Resize",
             "Upsample", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice",
             "Split", "ReduceMean", "ReduceMax", "ReduceMin")
_ZERO_PRESERVING = ("LpPool", "GlobalLpPool", "ReduceSum", "ReduceL1", "ReduceL2",
                    "ReduceSumSquare", "ReduceProd", "Cast", "Selu", "Celu", "Gelu", "Softsign",
                    "Mish", "ThresholdedRelu", "Erf", "Floor", "Ceil", "Round", "Sign", "Sin")

SLOT_RULES: dict[str, SlotRule] = {
    **dict.fromkeys(_IDENTITY, _first),
    **dict.fromkeys(_ZERO_PRESERVING, _zero_only),
    "Relu": _unary(lambda x: np.maximum(x, 0.0)),
    "Sigmoid": _unary(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "Tanh": _unary(np.tanh),
    "HardSwish": _unary(lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)),
    "Softplus": _unary(lambda x: np.log1p(np.exp(x))),
    "Neg": _unary(np.negative),
    "Abs": _unary(np.abs),
    "Exp": _unary(np.exp),
    "Sqrt": _unary(np.sqrt),
    "LeakyRelu": _leaky_relu,
    "HardSigmoid": _hard_sigmoid,
    "Clip": _clip,
    "Elu": _elu,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Div": _binary(np.divide),
    "Pow": _binary(np.power),
    "Max": _variadic(lambda v: np.max(np.stack(v), axis=0)),
    "Min": _variadic(lambda v: np.min(np.stack(v), axis=0)),
    "Sum": _variadic(lambda v: np.sum(np.stack(v), axis=0)),
    "Mean": _variadic(lambda v: np.mean(np.stack(v), axis=0)),
    "Mul": _mul,
    "PRelu": _prelu,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "Concat": _concat,
    "AveragePool": _average_pool,
    "Pad": _pad,
}
"""Op type -> constant transfer in slot space for pass-through ties."""


# -- weighted ops ------------------------------------------------------------------------------


def _reads(reads: np.ndarray, summed: np.ndarray, x: Vector) -> tuple[Vector, Vector, Vector]:
    """Outputs whose inputs are all 0, all known, and ``sum_c summed[o, c] * x_c``.

    Args:
        reads: ``[out, in]``, whether output ``o`` reads input ``c`` with any nonzero weight.
        summed: ``[out, in]``, the sum of those weights.
        x: Constant per input (NaN unknown).
    """
    zero = np.all(~reads | (x == 0)[None, :], axis=1)
    known = np.all(~reads | ~np.isnan(x)[None, :], axis=1)
    total = np.where(reads, summed * np.nan_to_num(x)[None, :], 0.0).sum(axis=1)
    return zero, known, total


def _reads_by_block(weight: np.ndarray, out_axis: int, x: Vector,
                    to_matrix: Callable[[np.ndarray], np.ndarray]) -> tuple[Vector, Vector, Vector]:
    """:func:`_reads` over blocks of output channels, so no full-size temporary is made.

    ``to_matrix`` turns a block of the weight into ``[out_block, in, ...]`` (the trailing
    axes are summed).
    """
    parts = []
    for _, block in _blocks(weight, out_axis):
        matrix = to_matrix(block)
        axes = tuple(range(2, matrix.ndim))
        reads = np.any(matrix != 0, axis=axes) if axes else matrix != 0
        summed = matrix.sum(axis=axes, dtype=np.float64) if axes else matrix.astype(np.float64)
        parts.append(_reads(reads, summed, x))
    if not parts:
        empty = np.zeros(0)
        return empty.astype(bool), empty.astype(bool), empty
    zero, known, total = (np.concatenate(p) for p in zip(*parts, strict=True))
    return zero, known, total


def _bias_of(node: ir.Node, index: int, size: int) -> Vector:
    b = const_array(node.inputs[index]) if len(node.inputs) > index else None
    if b is None:
        has = len(node.inputs) > index and node.inputs[index] is not None
        return np.full(size, np.nan if has else 0.0)
    return np.broadcast_to(uniform_along(np.atleast_2d(b), -1), (size,)).astype(np.float64)


def _conv(node: ir.Node, tie: GroupTie, consts: ChannelConstants) -> Vector:
    weight = np.asarray(const_array(node.inputs[1]))
    layout = weight_layout(node, weight.ndim)
    transpose, group = layout.out_per_group, layout.group
    cout, cin = layout.out_channels(weight.shape), layout.in_channels(weight.shape)
    bias = _bias_of(node, 2, cout)
    x = consts.of(node.inputs[0], 1, cin)
    if group == 1:  # by_output: [out, in, k...]
        zero, known, total = _reads_by_block(weight, layout.out_axis, x, layout.by_output)
    else:  # depthwise: output o reads input o // m through its own filter (row o of both layouts)
        flat = weight.reshape(cout, -1)
        reads = flat.any(axis=1)
        xo = x[np.arange(cout) // (cout // cin)]
        zero = ~reads | (xo == 0)
        known = ~reads | ~np.isnan(xo)
        total = np.where(reads, flat.sum(axis=1, dtype=np.float64) * np.nan_to_num(xo), 0.0)
    exact_sum = not transpose and unpadded(node)
    return np.where(zero, bias, np.where(known & exact_sum, bias + total, np.nan))


def _gemm(node: ir.Node, tie: GroupTie, consts: ChannelConstants) -> Vector:
    b = np.asarray(const_array(node.inputs[1]))
    b = weight_layout(node, b.ndim).by_input(b)  # [in, out] (a view)
    if node.op_type == "MatMul":
        feature = (rank_of(node.inputs[0]) or 1) - 1
    else:
        feature = 1 - int(attr(node, "transA", 0))
    a = consts.of(node.inputs[0], feature, b.shape[0])
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    c = beta * _bias_of(node, 2, b.shape[1]) if node.op_type == "Gemm" else np.zeros(b.shape[1])
    if node.op_type == "MatMul":
        alpha = 1.0
    zero, known, total = _reads_by_block(b, 1, a, lambda block: block.T)
    return np.where(zero, c, np.where(known, c + alpha * total, np.nan))


PRODUCER_RULES: dict[str, Callable[[ir.Node, GroupTie, ChannelConstants], Vector]] = {
    "Conv": _conv,
    "ConvTranspose": _conv,
    "Gemm": _gemm,
    "MatMul": _gemm,
}
"""Op type -> constant output vector of weighted ops (producers and depthwise convs)."""


# -- the sweep ---------------------------------------------------------------------------------


def _slot_inputs(tie: GroupTie, consts: ChannelConstants) -> list[Vector]:
    """Each input of the node as a vector over the tie's slots (NaN where unknown)."""
    node = tie.node
    size = 1 + max((int(e.index.max()) for e in tie.tie.entries
                    if e.index is not None and len(e.index)), default=0)
    ins = []
    for i, value in enumerate(node.inputs):
        entry = next(((e, m) for e, m in zip(tie.tie.entries, tie.members, strict=True)
                      if e.port == Port(False, i)), None)
        if entry is None or entry[0].index is None or entry[1] is None:
            ins.append(np.full(size, _scalar(value)))
            continue
        e, member = entry
        if member.is_weight:
            local = uniform_along(const_array(value), e.axis)  # type: ignore[arg-type]
        else:
            local = consts.member(member)
        low, high = np.full(size, np.inf), np.full(size, -np.inf)
        with np.errstate(invalid="ignore"):
            np.minimum.at(low, e.index, local)
            np.maximum.at(high, e.index, local)
        ins.append(np.where(low == high, low, np.nan))
    return ins


def _depthwise(node: ir.Node) -> bool:
    return node.op_type in ("Conv", "ConvTranspose") and int(attr(node, "group", 1)) > 1


def channel_constants(analysis: ChannelAnalysis) -> ChannelConstants:
    """Constant channels of every grouped activation axis of ``analysis.model``."""
    consts = ChannelConstants()
    by_node: dict[int, list[GroupTie]] = {}
    for group in analysis.groups:
        for tie in group.ties:
            by_node.setdefault(id(tie.node), []).append(tie)
    for node in analysis.model.graph:
        for tie in by_node.get(id(node), ()):
            outputs = [(e, m) for e, m in zip(tie.tie.entries, tie.members, strict=True)
                       if e.port.output and m is not None and e.index is not None]
            if not outputs or tie.tie.frozen:
                continue
            producer = PRODUCER_RULES.get(node.op_type)
            if producer is not None and (tie.tie.role is Role.PRODUCER or _depthwise(node)):
                member = outputs[0][1]
                consts.set(member.value, member.axis, producer(node, tie, consts))
                continue
            rule = SLOT_RULES.get(node.op_type)
            if rule is None:
                continue
            slot = rule(node, tie, _slot_inputs(tie, consts))
            for e, member in outputs:
                consts.set(member.value, member.axis, slot[e.index])
    return consts


def is_zero_constant(vector: Vector | None) -> bool:
    """Whether every position of a constant vector is known to be exactly 0."""
    return vector is not None and len(vector) > 0 and bool(np.all(vector == 0))

