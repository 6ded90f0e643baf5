"""Removing chosen channels from every member of a channel group.

Given a group and some of its channels, every member loses the positions of those channels:

1. optionally, a removed channel that holds a known constant ``k`` at a consumer's input is
   folded into that consumer's bias first, which keeps the rewrite exact (or, with mean
   activations as ``k``, is the usual bias compensation of pruning):
   Conv (unpadded, ``group == 1``): ``b[o] += sum_c k_c * sum(W[o, c])``;
   Gemm: ``C += alpha / beta * sum_c k_c * B'[c, :]``;
2. weights (filters, input columns, biases, BN parameters, constant operands) are sliced
   along their channel axis; a weight that other nodes also read gets a private copy;
3. attributes and shape inputs that spell out a channel count are rewritten (a table keyed
   by op type): depthwise ``group``, Split sizes, Slice bounds, Reshape target, Resize sizes;
4. activation shapes are updated.

Which channels to remove is the caller's choice (``prune-zero`` passes provably constant
channels, ``prune`` importance-ranked ones). The group is updated in place (sizes, channel
numbering), so it stays valid for further removals; channel constants must be recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.channels.groups import ChannelGroup, GroupTie, Member
from onnxopt.channels.linear import BIAS
from onnxopt.channels.mappings import slice_bounds
from onnxopt.channels.tie import IN0, OUT0, Role, opset_of, rank_of
from onnxopt.ir import add_initializer, attr, const_array
from onnxopt.layouts import weight_layout

logger = logging.getLogger(__name__)

KeepOf = Callable[[Member], np.ndarray]


@dataclass
class Removal:
    """What :func:`remove_channels` did.

    Attributes:
        channels: Group channels removed.
        weights_removed: Weight elements removed (slices minus any bias added by folding).
        folded: Consumers whose bias absorbed removed constant channels.
    """

    channels: int
    weights_removed: int
    folded: int


def set_weight(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> int:
    """Make input ``index`` of ``node`` the constant ``array``; returns the element change.

    The existing initializer is rewritten when ``node`` is its only reader; otherwise (shared
    weights, Constant nodes, missing optional inputs) a new initializer is created for it.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    before = 0
    if old is not None:
        existing = const_array(old)
        before = 0 if existing is None else int(existing.size)
    private = (old is not None and old.is_initializer() and len(old.uses()) == 1
               and not old.is_graph_output() and not old.is_graph_input())
    if private:
        old.const_value = ir.tensor(np.ascontiguousarray(array), name=old.name)
        old.shape = ir.Shape(array.shape)
        return int(array.size) - before
    base = old.name if old is not None and old.name else f"{node.name or node.op_type}.in{index}"
    new = add_initializer(graph, base, array)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    if old is not None and not old.uses() and not old.is_graph_output():
        producer = old.producer()
        if producer is not None and producer.op_type == "Constant":
            graph.remove(producer, safe=True)
        elif old.is_initializer() and not old.is_graph_input() and old.name:
            graph.initializers.pop(old.name, None)
    return int(array.size) - before


# -- folding constants into consumers ----------------------------------------------------------


def _fold_conv(graph: ir.Graph, node: ir.Node, removed: np.ndarray, values: np.ndarray) -> int:
    weight = const_array(node.inputs[1])
    layout = weight_layout(node, weight.ndim)
    if layout.group != 1:
        raise ValueError(f"cannot fold constant channels into grouped {node.name}")
    rows = layout.by_output(weight)  # [out, in, k...]
    summed = rows[:, removed].astype(np.float64).sum(axis=tuple(range(2, weight.ndim)))
    delta = summed @ values
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    base = np.zeros(len(rows)) if bias is None else bias.astype(np.float64)
    return set_weight(graph, node, 2, (base + delta).astype(weight.dtype))


def _fold_gemm(graph: ir.Graph, node: ir.Node, removed: np.ndarray, values: np.ndarray) -> int:
    weight = const_array(node.inputs[1])
    rows = weight_layout(node, weight.ndim).by_input(weight)  # [in, out]
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    delta = alpha * (values @ rows[removed].astype(np.float64))
    c_value = node.inputs[2] if len(node.inputs) > 2 else None
    if c_value is None:
        if beta == 0.0:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            beta = 1.0
        return set_weight(graph, node, 2, (delta / beta).astype(weight.dtype))
    c = const_array(c_value)
    if c is None or beta == 0.0:
        raise ValueError(f"cannot fold constant channels into Gemm {node.name}")
    return set_weight(graph, node, 2, (c.astype(np.float64) + delta / beta).astype(c.dtype))


FOLDERS: dict[str, Callable[[ir.Graph, ir.Node, np.ndarray, np.ndarray], int]] = {
    "Conv": _fold_conv,
    "Gemm": _fold_gemm,
}
"""Op type -> fold of constant input channels into the bias (consumers marked foldable)."""


# -- attribute and shape-input fixups ----------------------------------------------------------


def _fix_weighted(graph: ir.Graph, tie: GroupTie, keep_of: KeepOf) -> None:
    """Depthwise ``group``; and a bias that folding created after the analysis."""
    node = tie.node
    source, member = tie.member_at(IN0), tie.member_at(OUT0)
    if tie.tie.role is Role.THROUGH and node.op_type != "MatMul" and source is not None:
        node.attributes["group"] = ir.AttrInt64("group", int(keep_of(source).sum()))
    if tie.tie.role is Role.CONSUMER or member is None or tie.member_at(BIAS) is not None:
        return
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    mask = keep_of(member)
    if bias is not None and bias.ndim and bias.shape[-1] == len(mask) > 1:
        set_weight(graph, node, 2, np.compress(mask, bias, axis=bias.ndim - 1))


def _fix_split(graph: ir.Graph, tie: GroupTie, keep_of: KeepOf) -> None:
    node = tie.node
    axis = tie.tie.entries[0].axis
    if axis != int(attr(node, "axis", 0)) % (rank_of(node.inputs[0]) or 1):
        return
    sizes = []
    for e, member in zip(tie.tie.entries, tie.members, strict=True):
        if e.port.output:
            sizes.append(int(keep_of(member).sum()) if member else len(e.index))
    if opset_of(node) >= 13:
        node.attributes.pop("num_outputs", None)
        set_weight(graph, node, 1, np.array(sizes, np.int64))
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)


def _fix_slice(graph: ir.Graph, tie: GroupTie, keep_of: KeepOf) -> None:
    node = tie.node
    bounds = slice_bounds(node)
    member = tie.member_at(IN0)
    axis = tie.tie.entries[0].axis
    if bounds is None or member is None or axis not in bounds:
        return
    keep = keep_of(member)
    start, end, _ = bounds[axis]
    new_start = int(keep[:start].sum())
    new_end = new_start + int(keep[start:end].sum())
    rank = rank_of(node.inputs[0]) or 0
    if opset_of(node) < 10:
        axes = list(attr(node, "axes", None) or range(len(attr(node, "starts"))))
        at = [a % rank for a in axes].index(axis)
        for name, new in (("starts", new_start), ("ends", new_end)):
            values = list(attr(node, name))
            values[at] = new
            node.attributes[name] = ir.AttrInt64s(name, values)
        return
    axes_value = node.inputs[3] if len(node.inputs) > 3 else None
    axes = (list(range(len(const_array(node.inputs[1])))) if axes_value is None
            else [int(a) % rank for a in const_array(axes_value)])
    at = axes.index(axis)
    for index, new in ((1, new_start), (2, new_end)):
        values = const_array(node.inputs[index]).copy()
        values[at] = new
        set_weight(graph, node, index, values)


def _fix_reshape(graph: ir.Graph, tie: GroupTie, keep_of: KeepOf) -> None:
    node = tie.node
    member = tie.member_at(OUT0)
    shape = const_array(node.inputs[1])
    if member is None or shape is None:
        return
    axis = member.axis
    size = int(keep_of(member).sum())
    if shape[axis] > 0 and shape[axis] != size:
        shape = shape.copy()
        shape[axis] = size
        set_weight(graph, node, 1, shape)
    elif shape[axis] == 0:
        source = tie.member_at(IN0)
        if source is None or source.axis != axis or int(keep_of(source).sum()) != size:
            raise ValueError(f"Reshape {node.name} copies a dim that no longer matches")


def _fix_resize(graph: ir.Graph, tie: GroupTie, keep_of: KeepOf) -> None:
    node = tie.node
    member = tie.member_at(OUT0)
    sizes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    if member is not None and sizes is not None and sizes.size:
        sizes = sizes.copy()
        sizes[member.axis] = int(keep_of(member).sum())
        set_weight(graph, node, 3, sizes)


FIXUPS: dict[str, Callable[[ir.Graph, GroupTie, KeepOf], None]] = {
    "Conv": _fix_weighted,
    "ConvTranspose": _fix_weighted,
    "Gemm": _fix_weighted,
    "Split": _fix_split,
    "Slice": _fix_slice,
    "Reshape": _fix_reshape,
    "Resize": _fix_resize,
}
"""Op type -> rewrite of attributes or shape inputs that spell out a channel count."""


# -- the removal -------------------------------------------------------------------------------


def _resize_shape(value: ir.Value, axis: int, size: int) -> None:
    if value.shape is None:
        return
    dims = list(value.shape.dims)
    dims[axis] = size
    value.shape = ir.Shape(dims)


def remove_channels(model: ir.Model, group: ChannelGroup, channels: Collection[int],
                    fill: Mapping[Member, np.ndarray] | None = None) -> Removal:
    """Remove ``channels`` of ``group`` from every member of the group.

    Args:
        model: The model the group was computed on.
        group: A prunable group.
        channels: Group channel ids to remove.
        fill: For consumer-read activation members: the constant value of each position
            along the axis. Removed positions with a nonzero value are folded into the
            consumer's bias (the consumer must be foldable). Omitted: removed channels are
            taken to be zero.

    Returns:
        What was removed.

    Raises:
        ValueError: The group is frozen, a tensor would lose every channel, or a nonzero
            constant would have to be folded into a consumer that cannot absorb it.
    """
    if not group.prunable:
        raise ValueError(f"{group.label()} is frozen: {'; '.join(group.frozen)}")
    remove = np.zeros(group.size, dtype=bool)
    remove[np.fromiter(channels, np.int64)] = True
    if not remove.any():
        return Removal(0, 0, 0)
    keep = {id(m): ~remove[m.channels] for m in group.members + group.weights}
    for member in group.members:
        if not keep[id(member)].any():
            raise ValueError(f"removing would leave {member.label()} without channels")
    graph = model.graph
    folded = 0
    added = 0
    for tie in group.ties_with_role(Role.CONSUMER):
        member = tie.member_at(IN0)
        values = None if fill is None or member is None else fill.get(member)
        if values is None:
            continue
        removed = ~keep[id(member)]
        if not np.any(values[removed]):
            continue
        folder = FOLDERS.get(tie.node.op_type)
        if folder is None or not tie.tie.foldable:
            raise ValueError(f"cannot fold constant channels into {tie.node.name}")
        added += folder(graph, tie.node, np.flatnonzero(removed), values[removed])
        folded += 1
    removed_elements = 0
    for member in group.weights:
        mask = keep[id(member)]
        if mask.all():  # untouched; slicing would only copy a shared weight
            continue
        node, index = member.node, member.input_index
        array = const_array(node.inputs[index])
        if array is None or array.shape[member.axis] != len(mask):
            raise ValueError(f"{member.label()} changed since the analysis")
        removed_elements -= set_weight(graph, node, index, np.compress(mask, array, member.axis))
        member.value = node.inputs[index]
    for tie in group.ties:  # before the shapes change: Slice bounds clamp to the old sizes
        fixup = FIXUPS.get(tie.node.op_type)
        if fixup is not None:
            fixup(graph, tie, lambda m: keep[id(m)])
    for member in group.members:
        _resize_shape(member.value, member.axis, int(keep[id(member)].sum()))
    _renumber(group, remove, keep)
    logger.debug("%s: removed %d channels", group.label(), int(remove.sum()))
    return Removal(int(remove.sum()), removed_elements - added, folded)


def _renumber(group: ChannelGroup, remove: np.ndarray, keep: dict[int, np.ndarray]) -> None:
    new_id = np.cumsum(~remove) - 1
    for member in group.members + group.weights:
        member.channels = new_id[member.channels[keep[id(member)]]]
        member.size = len(member.channels)
    group.size = int((~remove).sum())
