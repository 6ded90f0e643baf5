"""Channel dependency analysis: entry point and the group listing of ``onnxopt info --groups``.

If filter ``j`` of a conv is removed, every tensor that carries channel ``j`` must lose it
too: the BN parameters, the other operand of a residual Add, the depthwise conv, the concat
slot, the flattened features and the next layer's input weights. The analysis finds those
sets of tied channel axes (groups) and numbers their channels; it is built from

- :mod:`~onnxopt.channels.tie`: what one node ties (the dependency edge),
- :mod:`~onnxopt.channels.ops`, :mod:`~onnxopt.channels.linear`,
  :mod:`~onnxopt.channels.mappings`: the per-op tie table and index mappings,
- :mod:`~onnxopt.channels.groups`: the dependency graph and the groups,
- :mod:`~onnxopt.channels.values`: channels that are provably constant,
- :mod:`~onnxopt.channels.surgery`: removing chosen channels from a whole group.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.channels.groups import (
    ChannelAnalysis,
    ChannelGroup,
    GroupTie,
    Member,
    build_groups,
)
from onnxopt.channels.tie import Role
from onnxopt.cost import infer_shapes
from onnxopt.ir import node_label

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "GroupTie",
    "Member",
    "analyse_channels",
    "format_groups",
]

_MAX_LISTED = 12


def analyse_channels(model: ir.Model, infer: bool = True) -> ChannelAnalysis:
    """Channel groups of ``model``.

    Args:
        model: The model. Shape inference annotates its values in place.
        infer: Run shape inference first (skip when shapes are known to be current).

    Returns:
        The analysis; its groups refer to the nodes and values of ``model`` itself.
    """
    if infer:
        infer_shapes(model)
    return build_groups(model)


def _names(ties: list[GroupTie]) -> str:
    labels = list(dict.fromkeys(node_label(t.node) for t in ties))
    more = f", ... (+{len(labels) - _MAX_LISTED})" if len(labels) > _MAX_LISTED else ""
    return ", ".join(labels[:_MAX_LISTED]) + more


def describe_group(group: ChannelGroup) -> str:
    """A few lines describing one group: status, producers, consumers, tensors."""
    status = "prunable" if group.prunable else "frozen: " + "; ".join(group.frozen)
    lines = [f"group {group.index}: {group.size} channel{'' if group.size == 1 else 's'}, "
             f"{status}"]
    for role, title in ((Role.PRODUCER, "producers"), (Role.CONSUMER, "consumers")):
        ties = group.ties_with_role(role)
        if ties:
            lines.append(f"  {title}: {_names(ties)}")
    tensors = [m.label() for m in group.members]
    more = f" ... (+{len(tensors) - _MAX_LISTED})" if len(tensors) > _MAX_LISTED else ""
    lines.append(f"  tensors: {' '.join(tensors[:_MAX_LISTED])}{more}")
    if group.weights:
        lines.append(f"  weights: {len(group.weights)} sliced with the channels")
    return "\n".join(lines)


def format_groups(model: ir.Model) -> str:
    """The group listing printed by ``onnxopt info --groups``.

    Each group shows its channel count, whether it is prunable or frozen (and why), its
    producers and consumers, and the tensors whose channel axis it contains (``name:axis``).
    """
    analysis = analyse_channels(model)
    prunable = sum(g.prunable for g in analysis.groups)
    header = f"{len(analysis.groups)} channel groups, {prunable} prunable"
    return "\n".join([header, *(describe_group(g) for g in analysis.groups)])
