"""Channel ties of the weighted ops: Conv, ConvTranspose, Gemm and MatMul.

These are where groups begin and end. A weighted op with a constant weight has two ties:

- its output channels are a *producer* tie with the weight's output-channel axis and the
  bias;
- its input channels are a *consumer* tie with the weight's input-channel axis.

Which weight axis that is, per op, is the table in :mod:`onnxopt.layouts`.

A depthwise convolution (``group == C_in``, ``C_out = m * C_in``) is neither: output
channel ``o`` only reads input channel ``o // m``, so input and output are one pass-through
tie. Other grouped convolutions tie channels in blocks of unequal meaning and freeze.

A consumer is *foldable* when an input channel that is a spatially constant ``k`` can be
dropped exactly by adding ``k * sum(W[:, c])`` to the bias: Conv without padding (every
window sees the constant everywhere) and Gemm. Padded convs see zeros at the border, so a
nonzero constant channel there is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.channels.tie import (
    IN0,
    OUT0,
    NodeTie,
    Port,
    Role,
    TieEntry,
    frozen,
    identity,
    rank_of,
    size_of,
)
from onnxopt.ir import attr, const_array
from onnxopt.layouts import weight_layout
from onnxopt.provenance import why_not_constant

WEIGHT = Port(False, 1)
BIAS = Port(False, 2)


def _not_constant(node: ir.Node, index: int) -> str:
    """``Conv weight is not a constant: <why>`` for input ``index`` of ``node``."""
    role = "bias" if index == 2 else "weight" if index == 1 else f"input {index}"
    value = node.inputs[index] if index < len(node.inputs) else None
    return f"{node.op_type} {role} is not a constant: {why_not_constant(value)}"


def _bias(node: ir.Node, index: np.ndarray, axis: int = 0) -> tuple[TieEntry, ...]:
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return (TieEntry(BIAS, axis, index),)
    return ()


def unpadded(node: ir.Node) -> bool:
    """Whether a Conv never reads outside its input (no explicit or automatic padding)."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return True
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel = attr(node, "kernel_shape") or []
        return bool(kernel) and all(k == 1 for k in kernel)
    return not any(attr(node, "pads", None) or [])


def conv_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Conv and ConvTranspose: filters (producer), input channels (consumer), or depthwise
    pass-through; where the channels sit in the weight is :func:`~onnxopt.layouts.weight_layout`.
    """
    if port not in (IN0, OUT0):
        return frozen(node, port, axis, _not_constant(node, port.index))
    if axis != 1:
        return frozen(node, port, axis, f"{node.op_type} mixes axis {axis}")
    weight = const_array(node.inputs[1])
    if weight is None:
        return frozen(node, port, axis, _not_constant(node, 1))
    layout = weight_layout(node, weight.ndim)
    if layout is None:
        return frozen(node, port, axis, f"{node.op_type} weight has rank {weight.ndim}")
    group, out_axis, in_axis = layout.group, layout.out_axis, layout.in_axis
    cin, cout = layout.in_channels(weight.shape), layout.out_channels(weight.shape)
    if group == 1:
        if port.output:
            idx = np.arange(cout)
            entries = (TieEntry(OUT0, 1, idx), TieEntry(WEIGHT, out_axis, idx), *_bias(node, idx))
            return NodeTie(node, Role.PRODUCER, entries)
        idx = np.arange(cin)
        entries = (TieEntry(IN0, 1, idx), TieEntry(WEIGHT, in_axis, idx))
        return NodeTie(node, Role.CONSUMER, entries,
                       foldable=not layout.out_per_group and unpadded(node))
    if group == cin and cout % cin == 0:
        # Depthwise: weight axis 0 has one row per output (Conv) or per input (ConvTranspose).
        out_idx = np.arange(cout) // (cout // cin)
        w_idx = np.arange(cin) if layout.out_per_group else out_idx
        entries = (TieEntry(IN0, 1, np.arange(cin)), TieEntry(OUT0, 1, out_idx),
                   TieEntry(WEIGHT, 0, w_idx), *_bias(node, out_idx))
        return NodeTie(node, Role.THROUGH, entries)
    return frozen(node, port, axis,
                  f"grouped {node.op_type} (group={group}) ties channels in blocks")


def gemm_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Gemm ``alpha * A' B' + beta * C``: columns of B' (producer) or rows of B' (consumer)."""
    weight = const_array(node.inputs[1])
    if weight is None:
        return frozen(node, port, axis, _not_constant(node, 1))
    if weight.ndim != 2:
        return frozen(node, port, axis, f"Gemm weight has rank {weight.ndim}")
    layout = weight_layout(node, weight.ndim)
    k_axis, n_axis = layout.in_axis, layout.out_axis
    feature = 0 if attr(node, "transA", 0) else 1
    if port == OUT0 and axis == 1:
        n = weight.shape[n_axis]
        idx = np.arange(n)
        entries = [TieEntry(OUT0, 1, idx), TieEntry(WEIGHT, n_axis, idx)]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        c_rank = rank_of(c)
        if c is not None and c_rank and size_of(c, c_rank - 1) == n and n != 1:
            entries.append(TieEntry(BIAS, c_rank - 1, idx))
        return NodeTie(node, Role.PRODUCER, tuple(entries))
    if port == IN0 and axis == feature:
        idx = np.arange(weight.shape[k_axis])
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        foldable = float(attr(node, "beta", 1.0)) != 0.0 or not has_c
        entries = (TieEntry(IN0, feature, idx), TieEntry(WEIGHT, k_axis, idx))
        return NodeTie(node, Role.CONSUMER, entries, foldable=foldable)
    return frozen(node, port, axis, "Gemm row axis")


def matmul_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """MatMul with a constant 2-D right operand; leading axes of A pass through."""
    weight = const_array(node.inputs[1])
    ra, ro = rank_of(node.inputs[0]), rank_of(node.outputs[0])
    if weight is None or port not in (IN0, OUT0):
        return frozen(node, port, axis, "MatMul of run-time operands mixes channels: "
                      + _not_constant(node, 1))
    if weight.ndim != 2:
        return frozen(node, port, axis, f"MatMul right operand has rank {weight.ndim}")
    if ra is None or ro is None or ra < 2:
        return frozen(node, port, axis, "MatMul operand rank is unknown")
    last = ro - 1 if port.output else ra - 1
    layout = weight_layout(node, weight.ndim)
    if axis == last and port.output:
        idx = np.arange(weight.shape[layout.out_axis])
        return NodeTie(node, Role.PRODUCER,
                       (TieEntry(OUT0, axis, idx), TieEntry(WEIGHT, layout.out_axis, idx)))
    if axis == last:
        idx = np.arange(weight.shape[layout.in_axis])
        return NodeTie(node, Role.CONSUMER,
                       (TieEntry(IN0, axis, idx), TieEntry(WEIGHT, layout.in_axis, idx)))
    shift = ro - ra
    in_axis = axis - shift if port.output else axis
    if in_axis < 0:
        return frozen(node, port, axis, "MatMul broadcast axis")
    return identity(node, [(IN0, in_axis), (OUT0, in_axis + shift)])


def _weighted_seeds(node: ir.Node) -> list[tuple[Port, int]]:
    return [(OUT0, 1), (IN0, 1)]


def _gemm_seeds(node: ir.Node) -> list[tuple[Port, int]]:
    return [(OUT0, 1), (IN0, 0 if attr(node, "transA", 0) else 1)]


def _matmul_seeds(node: ir.Node) -> list[tuple[Port, int]]:
    weight = const_array(node.inputs[1])
    ra, ro = rank_of(node.inputs[0]), rank_of(node.outputs[0])
    if weight is None or weight.ndim != 2 or not ra or not ro:
        return []
    return [(OUT0, ro - 1), (IN0, ra - 1)]


LINEAR_RULES: dict[str, Callable[[ir.Node, Port, int], NodeTie]] = {
    "Conv": conv_tie,
    "ConvTranspose": conv_tie,
    "Gemm": gemm_tie,
    "MatMul": matmul_tie,
}
"""Op type -> tie rule for weighted ops."""

SEEDS: dict[str, Callable[[ir.Node], list[tuple[Port, int]]]] = {
    "Conv": _weighted_seeds,
    "ConvTranspose": _weighted_seeds,
    "Gemm": _gemm_seeds,
    "MatMul": _matmul_seeds,
}
"""Op type -> the (port, axis) pairs where channel groups start: outputs and inputs of weights."""
