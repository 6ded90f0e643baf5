"""Channel dependency groups: connected sets of tied channel axes and their channel numbering.

The dependency graph (networkx) has one node per channel axis: an activation axis
``(value, axis)`` or a weight axis ``(node, input, axis)``. Every
:class:`~onnxopt.channels.tie.NodeTie` connects the axes it lists. Axes are discovered
breadth-first from the seeds (inputs and outputs of weighted ops), asking the tie table about
the producer and every reader of each activation axis found.

A *group* is a connected component. Inside a group, positions are numbered into *group
channels* by union-find over the ties' slot indices: two positions are the same group channel
when some chain of ties puts them in the same slot. A group channel is therefore the set of
positions that must be removed together (one per plain tensor, a block per flattened tensor).

A group is frozen, with every reason recorded, when any of its ties is frozen, or one of its
tensors is a graph input or output, has a dynamic size, or is read inside a subgraph.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection, Hashable, Iterator
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_ir as ir

from onnxopt.channels.linear import SEEDS
from onnxopt.channels.ops import tie_for
from onnxopt.channels.tie import NodeTie, Port, Role, frozen, size_of
from onnxopt.ir import const_array, is_constant, is_standard, node_label

logger = logging.getLogger(__name__)

AxisKey = tuple[Hashable, ...]
"""``("v", id(value), axis)`` for activations, ``("w", id(node), input, axis)`` for weights."""


@dataclass(eq=False)
class Member:
    """One channel axis inside a group.

    Attributes:
        value: The activation tensor, or for weight members the weight read at analysis time.
        axis: The channel axis of that tensor.
        size: Positions along the axis, or None when dynamic.
        channels: Group channel of every position along the axis (None when dynamic).
        node: For weight members, the node that reads the weight.
        input_index: For weight members, which input of ``node`` the weight is.
    """

    value: ir.Value
    axis: int
    size: int | None
    channels: np.ndarray | None = None
    node: ir.Node | None = None
    input_index: int = -1

    @property
    def is_weight(self) -> bool:
        """Whether this is a weight (sliced with the channel) rather than an activation."""
        return self.node is not None

    def label(self) -> str:
        """``name:axis`` for tensors, ``Conv 'x'.in1:axis`` for weights."""
        if self.node is not None:
            return f"{node_label(self.node)}.in{self.input_index}:{self.axis}"
        return f"{self.value.name}:{self.axis}"


@dataclass(eq=False)
class GroupTie:
    """A node tie inside a group, with its entries resolved to members (None: no tensor)."""

    tie: NodeTie
    members: tuple[Member | None, ...]

    @property
    def node(self) -> ir.Node:
        """The node that imposes the tie."""
        return self.tie.node

    def member_at(self, port: Port) -> Member | None:
        """The member connected at ``port`` of the node."""
        for entry, member in zip(self.tie.entries, self.members, strict=True):
            if entry.port == port:
                return member
        return None


@dataclass(eq=False)
class ChannelGroup:
    """A connected set of tied channel axes.

    Attributes:
        index: Position of the group in the analysis (stable for a given model).
        size: Number of group channels.
        members: Activation axes, in discovery order.
        weights: Weight axes sliced with the channels.
        ties: The node ties that connect them.
        frozen: Why the group must be left alone; empty when it is prunable.
    """

    index: int
    size: int
    members: list[Member]
    weights: list[Member]
    ties: list[GroupTie]
    frozen: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        """Whether every member is understood and channels may be removed."""
        return not self.frozen

    def ties_with_role(self, role: Role) -> list[GroupTie]:
        """The producer, consumer or pass-through ties of the group."""
        return [t for t in self.ties if t.tie.role is role]

    def positions(self, member: Member, channels: Collection[int]) -> np.ndarray:
        """Positions along ``member``'s axis that belong to the given group channels."""
        if member.channels is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.isin(member.channels, np.fromiter(channels, np.int64)))

    def label(self) -> str:
        """A short name: the first tensor of the group."""
        first = self.members[0].label() if self.members else self.weights[0].label()
        return f"group {self.index} ({first})"


@dataclass(eq=False)
class ChannelAnalysis:
    """All channel groups of one model.

    Attributes:
        model: The model analysed (surgery must be applied to this very object).
        groups: The groups, ordered by first appearance.
        graph: The dependency graph over axis keys (node attribute ``member``).
    """

    model: ir.Model
    groups: list[ChannelGroup]
    graph: nx.Graph
    _by_key: dict[AxisKey, tuple[ChannelGroup, Member]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def lookup(self, value: ir.Value, axis: int) -> tuple[ChannelGroup, Member] | None:
        """The group and member of activation axis ``(value, axis)``, if any."""
        return self._by_key.get(("v", id(value), axis))


class _Builder:
    """Breadth-first discovery of tied axes from the seeds."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.members: dict[AxisKey, Member] = {}
        self.reasons: dict[AxisKey, list[str]] = {}
        self.ties: list[tuple[NodeTie, tuple[AxisKey | None, ...]]] = []
        self.done: set[tuple[int, Port, int]] = set()
        self.queue: deque[AxisKey] = deque()

    def key(self, node: ir.Node, port: Port, axis: int) -> AxisKey | None:
        value = port.value(node)
        if value is None:
            return None
        if not port.output and is_constant(value):
            key: AxisKey = ("w", id(node), port.index, axis)
            if key not in self.members:
                array = const_array(value)
                size = array.shape[axis] if array is not None and axis < array.ndim else None
                self.members[key] = Member(value, axis, size, node=node, input_index=port.index)
            return key
        key = ("v", id(value), axis)
        if key not in self.members:
            self.members[key] = Member(value, axis, size_of(value, axis))
            self.reasons[key] = _axis_reasons(value, axis)
            self.queue.append(key)
        return key

    def visit(self, node: ir.Node, port: Port, axis: int) -> None:
        if (id(node), port, axis) in self.done:
            return
        self.done.add((id(node), port, axis))
        tie = tie_for(node, port, axis)
        if node.graph is not self.graph:
            tie = frozen(node, port, axis, f"read inside a subgraph by {node_label(node)}")
        for e in tie.entries:
            self.done.add((id(node), e.port, e.axis))
        self.ties.append((tie, tuple(self.key(node, e.port, e.axis) for e in tie.entries)))

    def run(self) -> None:
        for node in self.graph:
            seeds = SEEDS.get(node.op_type) if is_standard(node) else None
            for port, axis in seeds(node) if seeds else ():
                self.visit(node, port, axis)
            while self.queue:
                member = self.members[self.queue.popleft()]
                value = member.value
                producer = value.producer()
                if producer is not None:
                    self.visit(producer, Port(True, value.index() or 0), member.axis)
                for use in value.uses():
                    self.visit(use.node, Port(False, use.idx), member.axis)


def _axis_reasons(value: ir.Value, axis: int) -> list[str]:
    reasons = []
    if value.is_graph_input():
        reasons.append(f"graph input '{value.name}'")
    if value.is_graph_output():
        reasons.append(f"graph output '{value.name}'")
    if size_of(value, axis) is None:
        reasons.append(f"channel count of '{value.name}' is dynamic")
    return reasons


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest element of the component of each element, for edges ``a[i] - b[i]``."""
    parent = np.arange(n)
    while len(a):
        ra, rb = parent[a], parent[b]
        if np.array_equal(ra, rb):
            break
        low = np.minimum(ra, rb)
        np.minimum.at(parent, ra, low)
        np.minimum.at(parent, rb, low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def _channel_labels(builder: _Builder) -> dict[AxisKey, np.ndarray]:
    """Element-level union-find over all ties: a label per position of every sized member."""
    offsets, total = {}, 0
    for key, member in builder.members.items():
        if member.size is not None:
            offsets[key] = total
            total += member.size
    left, right = [], []
    for tie, keys in builder.ties:
        slots, elements = [], []
        for e, key in zip(tie.entries, keys, strict=True):
            if key is None or e.index is None or key not in offsets:
                continue
            if len(e.index) != builder.members[key].size:
                continue
            slots.append(e.index)
            elements.append(offsets[key] + np.arange(len(e.index)))
        if len(slots) < 2:
            continue
        slot, element = np.concatenate(slots), np.concatenate(elements)
        order = np.argsort(slot, kind="stable")
        slot, element = slot[order], element[order]
        same = slot[1:] == slot[:-1]
        left.append(element[:-1][same])
        right.append(element[1:][same])
    a = np.concatenate(left) if left else np.zeros(0, np.int64)
    b = np.concatenate(right) if right else np.zeros(0, np.int64)
    labels = _union_find(total, a, b)
    return {key: labels[off:off + builder.members[key].size] for key, off in offsets.items()}


def build_groups(model: ir.Model) -> ChannelAnalysis:
    """Discover every channel group of ``model`` (shapes must already be inferred).

    Args:
        model: The model; its value shapes are read, nothing is changed.

    Returns:
        The analysis, with groups ordered by first discovery.
    """
    builder = _Builder(model.graph)
    builder.run()
    graph = nx.Graph()
    for key, member in builder.members.items():
        graph.add_node(key, member=member)
    tie_keys: dict[AxisKey, list[int]] = {}
    for t, (_, keys) in enumerate(builder.ties):
        present = [k for k in keys if k is not None]
        nx.add_path(graph, present)
        if present:
            tie_keys.setdefault(present[0], []).append(t)
    labels = _channel_labels(builder)
    order = {key: i for i, key in enumerate(builder.members)}
    components = sorted(nx.connected_components(graph), key=lambda c: min(order[k] for k in c))
    analysis = ChannelAnalysis(model, [], graph)
    for index, component in enumerate(components):
        keys = sorted(component, key=order.__getitem__)
        group = _make_group(index, keys, builder, labels, tie_keys)
        analysis.groups.append(group)
        for member in group.members:
            analysis._by_key[("v", id(member.value), member.axis)] = (group, member)
    logger.debug("%d channel groups, %d prunable", len(analysis.groups),
                 sum(g.prunable for g in analysis.groups))
    return analysis


def _make_group(index: int, keys: list[AxisKey], builder: _Builder,
                labels: dict[AxisKey, np.ndarray], tie_keys: dict[AxisKey, list[int]],
                ) -> ChannelGroup:
    seen: dict[int, int] = {}
    for key in keys:
        for label in labels.get(key, ()):
            seen.setdefault(int(label), len(seen))
    members, weights, ties, reasons = [], [], [], []
    for key in keys:
        member = builder.members[key]
        if key in labels:
            member.channels = np.array([seen[int(x)] for x in labels[key]], dtype=np.int64)
        (weights if member.is_weight else members).append(member)
        reasons.extend(builder.reasons.get(key, ()))
        for t in tie_keys.get(key, ()):
            tie, tkeys = builder.ties[t]
            resolved = tuple(None if k is None else builder.members[k] for k in tkeys)
            ties.append(GroupTie(tie, resolved))
            if tie.frozen:
                reasons.append(f"{tie.frozen} at {node_label(tie.node)}")
    return ChannelGroup(index, len(seen), members, weights, ties, list(dict.fromkeys(reasons)))
