"""Cross-layer equalization (Nagel et al. 2019): rescale channels between consecutive linear ops.

For ``y = W2 f(W1 x + b1) + b2`` where ``f`` is positively homogeneous per channel,
``f(x / s) = f(x) / s`` for ``s > 0`` (Relu, LeakyRelu, PRelu, max/average pooling, Identity,
a Flatten of 1x1 maps), any positive per-channel ``s`` gives the same ``y`` with

    W1'[i] = W1[i] / s_i,   b1'[i] = b1[i] / s_i,   W2'[:, i] = W2[:, i] * s_i

(``W1[i]`` = everything producing output channel ``i``, ``W2[:, i]`` = everything reading input
channel ``i``, which for a grouped or depthwise second conv is one slice of one group).
With ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|``, ``s_i = sqrt(r1_i / r2_i)`` makes both
ranges ``sqrt(r1_i * r2_i)``, so one per-tensor weight scale fits every channel about equally.
Chains (1x1 expand -> depthwise -> 1x1 project) are swept pair by pair until the scales settle.
Clip with an upper bound (Relu6) is not homogeneous, so chains through it are left alone.

Activation-range equalization (:func:`equalize_activations`) uses the same pairs and the same
exact rescaling, but chooses the factors from the calibration data instead of the weights:
with ``R_i`` the largest ``|x_i|`` of channel ``i`` of the tensor the second op reads, over the
calibration samples, and ``R = max_i R_i``, channel ``i`` is multiplied by

    k_i = min(max_scale, (R / R_i) ** alpha),  alpha = 1 (depthwise second op) or 1/2

(``W1[i] * k_i``, ``b1[i] * k_i``, ``W2[:, i] / k_i``), so one per-tensor activation scale
fits every channel about equally. A depthwise second op (every output reads one input
channel) absorbs ``1 / k_i`` in its per-output-channel weight scale exactly, so the ranges
are made equal (up to ``max_scale``); any other second op mixes channels, and each of its
output channels' weight range is set by its largest ``|W2[o, i] / k_i|``, so the factors are
only the square root (the SmoothQuant middle). The first op's per-output-channel weight scale
absorbs ``k_i`` exactly. It needs per-channel weight scales; with one scale per weight the
factors would widen it, so the pass does not run it then.

The rewrite is exact in real arithmetic; new weights are written as new initializers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.data import FeedSource
from onnxopt.ir import (
    FreshNames,
    add_initializer,
    attr,
    const_array,
    is_constant,
    is_standard,
    node_label,
    static_shape,
)
from onnxopt.layouts import WeightLayout, weight_layout
from onnxopt.pass_base import PassResult
from onnxopt.passes.quantize.tensor_stats import collect_activation_stats

logger = logging.getLogger(__name__)


#: The linear ops equalized (where their channels are: :mod:`onnxopt.layouts`).
_EQUALIZED = frozenset({"Conv", "Gemm"})


def _layout(node: ir.Node, w: np.ndarray) -> WeightLayout:
    layout = weight_layout(node, w.ndim)
    assert layout is not None, "Conv and Gemm weights always have one"
    return layout


def _flatten_of_1x1(node: ir.Node) -> bool:
    shape = static_shape(node.inputs[0]) if node.inputs[0] is not None else None
    return attr(node, "axis", 1) == 1 and shape is not None and math.prod(shape[2:]) == 1


def _relu_like_clip(node: ir.Node) -> bool:
    lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    has_max = len(node.inputs) > 2 and node.inputs[2] is not None
    return not has_max and (lo is None or float(lo) == 0.0)


#: Ops with ``f(x / s) = f(x) / s`` per channel for ``s > 0`` (with an extra check).
HOMOGENEOUS: dict[str, Callable[[ir.Node], bool]] = {
    "Relu": lambda n: True,
    "LeakyRelu": lambda n: True,
    "PRelu": lambda n: True,
    "Identity": lambda n: True,
    "MaxPool": lambda n: len(n.outputs) == 1 or not n.outputs[1].uses(),
    "AveragePool": lambda n: True,
    "GlobalAveragePool": lambda n: True,
    "GlobalMaxPool": lambda n: True,
    "Flatten": _flatten_of_1x1,
    "Clip": _relu_like_clip,
}


@dataclass(frozen=True)
class _Pair:
    first: ir.Node
    second: ir.Node


def _linear(node: ir.Node) -> bool:
    if node.op_type not in _EQUALIZED or not is_standard(node):
        return False
    if len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return bias is None or is_constant(bias)


def find_pairs(graph: ir.Graph, result: PassResult) -> list[_Pair]:
    """Consecutive linear ops joined only through homogeneous ops, each read by nothing else."""
    pairs = []
    for node in graph:
        if not _linear(node):
            continue
        value = node.outputs[0]
        while not value.is_graph_output() and len(value.uses()) == 1:
            reader, index = value.uses()[0].node, value.uses()[0].idx
            check = HOMOGENEOUS.get(reader.op_type)
            if index == 0 and check is not None and check(reader):
                value = reader.outputs[0]
                continue
            if index == 0 and _linear(reader):
                w1, w2 = const_array(node.inputs[1]), const_array(reader.inputs[1])
                if _layout(node, w1).out_channels(w1.shape) == \
                        _layout(reader, w2).in_channels(w2.shape):
                    pairs.append(_Pair(node, reader))
            elif reader.op_type == "Clip":
                result.refuse(f"{node_label(node)} -> {node_label(reader)}",
                              "not equalized: Clip with an upper bound (Relu6) is not "
                              "positively homogeneous")
            break
    return pairs


def _bias_of(node: ir.Node, channels: int) -> np.ndarray | None:
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias = const_array(node.inputs[2]).astype(np.float64)  # type: ignore[union-attr]
    if node.op_type == "Gemm":
        return np.broadcast_to(bias.reshape(-1), (channels,)).copy() if bias.size in (
            1, channels) and bias.ndim <= 2 else None
    return bias


def _usable(pairs: list[_Pair], biases: dict[int, np.ndarray | None]) -> list[_Pair]:
    """Pairs whose first op has no bias or one that can be scaled per channel."""
    return [p for p in pairs if not (len(p.first.inputs) > 2 and p.first.inputs[2] is not None
                                     and biases[id(p.first)] is None)]


def _load(pairs: list[_Pair]) -> tuple[dict[int, ir.Node], dict[int, np.ndarray],
                                       dict[int, WeightLayout], dict[int, np.ndarray | None]]:
    """Nodes, float64 weights, layouts and biases of every op in ``pairs``, by node id."""
    nodes = {id(n): n for p in pairs for n in (p.first, p.second)}
    weights = {k: const_array(n.inputs[1]).astype(np.float64) for k, n in nodes.items()}
    layouts = {k: _layout(n, weights[k]) for k, n in nodes.items()}
    biases = {k: _bias_of(n, layouts[k].out_channels(weights[k].shape))
              for k, n in nodes.items()}
    return nodes, weights, layouts, biases


def _store(graph: ir.Graph, nodes: dict[int, ir.Node], weights: dict[int, np.ndarray],
           biases: dict[int, np.ndarray | None]) -> None:
    """Write the new weights and biases as new initializers."""
    names = FreshNames(graph, values_only=True)  # only initializers are added below
    for k, n in nodes.items():
        dtype = const_array(n.inputs[1]).dtype  # type: ignore[union-attr]
        base = n.name or n.inputs[1].name or "linear"
        n.replace_input_with(1, add_initializer(graph, f"{base}.eq_weight",
                                                weights[k].astype(dtype), names=names))
        if biases[k] is not None:
            n.replace_input_with(2, add_initializer(graph, f"{base}.eq_bias",
                                                    biases[k].astype(dtype), names=names))


def equalize(graph: ir.Graph, result: PassResult, max_sweeps: int = 20,
             tolerance: float = 1e-3) -> int:
    """Equalize every pair in place; returns the number of pairs rescaled."""
    pairs = find_pairs(graph, result)
    if not pairs:
        return 0
    nodes, weights, layouts, biases = _load(pairs)
    usable = _usable(pairs, biases)
    for sweep in range(max_sweeps):
        change = 0.0
        for p in usable:
            a, c = id(p.first), id(p.second)
            la, lc = layouts[a], layouts[c]
            r1 = la.out_abs_max(weights[a])
            r2 = lc.in_abs_max(weights[c])
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            weights[a] = la.scale_outputs(weights[a], 1.0 / s)
            if biases[a] is not None:
                biases[a] = biases[a] / s
            weights[c] = lc.scale_inputs(weights[c], s)
            change = max(change, float(np.max(np.abs(np.log(s)))))
        if change < tolerance:
            logger.debug("equalization converged after %d sweeps", sweep + 1)
            break
    _store(graph, nodes, weights, biases)
    return len(usable)


#: Largest factor activation equalization applies to one channel (keeps weight scales sane).
MAX_SCALE = 32.0


def _depthwise(node: ir.Node, layout: WeightLayout, w: np.ndarray) -> bool:
    """Every output channel of ``node`` reads exactly one input channel."""
    return node.op_type == "Conv" and layout.group == layout.in_channels(w.shape)


def _reads_channels_on_axis_1(node: ir.Node) -> bool:
    return node.op_type == "Conv" or not attr(node, "transA", 0)


def channel_ranges(model: ir.Model, names: list[str], source: FeedSource, *, batch_size: int,
                   limit: int | None, input_shapes: dict[str, tuple[int, ...]] | None,
                   show_progress: bool = False) -> dict[str, np.ndarray]:
    """Largest ``|x|`` per channel (axis 1) of each tensor in ``names`` over ``source``."""
    stats = collect_activation_stats(model, source, names, bins=0, channel_abs_max=True,
                                     batch_size=batch_size, limit=limit,
                                     input_shapes=input_shapes, show_progress=show_progress)
    return {name: st.channel_abs_max for name, st in stats.items()
            if st.channel_abs_max is not None}


def equalize_activations(model: ir.Model, result: PassResult, source: FeedSource, *,
                         batch_size: int, limit: int | None,
                         input_shapes: dict[str, tuple[int, ...]] | None,
                         max_scale: float = MAX_SCALE, show_progress: bool = False) -> int:
    """Equalize the calibration ranges of the channels between pairs (module docstring).

    Returns:
        The number of pairs rescaled.
    """
    pairs = [p for p in find_pairs(model.graph, result) if _reads_channels_on_axis_1(p.second)]
    if not pairs:
        return 0
    _, weights, layouts, biases = _load(pairs)
    pairs = _usable(pairs, biases)
    names = sorted({p.second.inputs[0].name for p in pairs})
    ranges = channel_ranges(model, names, source, batch_size=batch_size, limit=limit,
                            input_shapes=input_shapes, show_progress=show_progress)
    changed: dict[int, ir.Node] = {}
    for p in pairs:  # the tensor after a pair's second op does not change, so order is free
        a, c = id(p.first), id(p.second)
        r = ranges.get(p.second.inputs[0].name)
        if r is None or r.shape != (layouts[c].in_channels(weights[c].shape),) or r.max() <= 0:
            continue
        alpha = 1.0 if _depthwise(p.second, layouts[c], weights[c]) else 0.5
        k = np.where(r > 0, (r.max() / np.where(r > 0, r, 1.0)) ** alpha, 1.0)
        k = np.minimum(k, max_scale)
        weights[a] = layouts[a].scale_outputs(weights[a], k)
        if biases[a] is not None:
            biases[a] = biases[a] * k
        weights[c] = layouts[c].scale_inputs(weights[c], 1.0 / k)
        logger.debug("activation equalization %s -> %s: factors %.3g-%.3g", node_label(
            p.first), node_label(p.second), float(k.min()), float(k.max()))
        changed.update({a: p.first, c: p.second})
    _store(model.graph, changed, weights, biases)
    return sum(1 for p in pairs if id(p.second) in changed)
