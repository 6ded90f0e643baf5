"""The tie one node imposes between channel axes of its inputs, outputs and weights.

A node ties positions along axes of the tensors it touches. A :class:`NodeTie` lists those
axes as :class:`TieEntry` objects; each entry carries a *slot index* per position, and two
positions (on any two entries of the same tie) are the same channel exactly when their slot
indices are equal. With that single device every index mapping is an array:

- elementwise, normalization, pooling: ``arange(C)`` on every entry;
- Concat input ``k`` at channel offset ``o``: ``o + arange(C_k)``, output ``arange(sum C)``;
- Flatten of ``[C, H, W]`` into ``F = C*H*W`` features: input ``arange(C)``,
  output ``arange(F) // (H*W)`` (channel ``c`` owns a contiguous block of features);
- depthwise Conv with multiplier ``m``: input ``arange(C)``, output ``arange(C*m) // m``.

Rules that cannot describe a tie return a *frozen* tie with the reason; the group that
contains it must then be left alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.ir import STANDARD_DOMAINS

Dim = int | str | None
"""One dimension: a size, a symbolic name, or None when unknown."""


class Role(enum.Enum):
    """What a node does to the channels of a tie."""

    PRODUCER = "producer"
    """The positions are the node's filters (Conv output channels, Gemm/MatMul columns)."""
    CONSUMER = "consumer"
    """The positions are input columns of the node's weight (Conv/Gemm/MatMul inputs)."""
    THROUGH = "through"
    """Channels pass through: elementwise, normalization, depthwise conv, index maps."""


@dataclass(frozen=True)
class Port:
    """An input or output slot of a node."""

    output: bool
    index: int

    def value(self, node: ir.Node) -> ir.Value | None:
        """The value connected to this port of ``node``."""
        values = node.outputs if self.output else node.inputs
        return values[self.index] if self.index < len(values) else None

    def __str__(self) -> str:
        return f"{'out' if self.output else 'in'}{self.index}"


@dataclass(frozen=True, eq=False)
class TieEntry:
    """One axis that takes part in a tie.

    Attributes:
        port: Where the tensor connects to the node.
        axis: The tied axis of that tensor (non-negative).
        index: Slot index of every position along the axis, or None when its size is unknown.
    """

    port: Port
    axis: int
    index: np.ndarray | None


@dataclass(eq=False)
class NodeTie:
    """The channel positions one node ties together, and what the node does with them.

    Attributes:
        node: The node.
        role: Producer, consumer or pass-through.
        entries: The tied axes (activations and weights alike).
        frozen: Why the tie cannot be rewritten, or None when it can.
        foldable: For consumers: a spatially constant input channel can be folded exactly
            into the node's bias (Conv without padding, Gemm).
    """

    node: ir.Node
    role: Role
    entries: tuple[TieEntry, ...]
    frozen: str | None = None
    foldable: bool = False


IN0 = Port(False, 0)
OUT0 = Port(True, 0)


def dims_of(value: ir.Value | None) -> list[Dim] | None:
    """The dimensions of ``value`` as ints, symbolic names or None; None if the rank is unknown."""
    if value is None or value.shape is None:
        return None
    dims: list[Dim] = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        else:
            dims.append(getattr(d, "value", None))
    return dims


def rank_of(value: ir.Value | None) -> int | None:
    """Rank of ``value``, or None if unknown."""
    dims = dims_of(value)
    return None if dims is None else len(dims)


def size_of(value: ir.Value | None, axis: int) -> int | None:
    """Static size of ``axis`` of ``value``, or None."""
    dims = dims_of(value)
    if dims is None or not -len(dims) <= axis < len(dims):
        return None
    d = dims[axis]
    return d if isinstance(d, int) else None


def positions(size: int | None) -> np.ndarray | None:
    """``arange(size)``, or None for an unknown size."""
    return None if size is None else np.arange(size)


def entry(node: ir.Node, port: Port, axis: int, index: np.ndarray | None = None) -> TieEntry:
    """A tie entry; ``index`` defaults to the identity ``arange(size)`` of the axis."""
    if index is None:
        index = positions(size_of(port.value(node), axis))
    return TieEntry(port, axis, index)


def frozen(node: ir.Node, port: Port, axis: int, reason: str) -> NodeTie:
    """A tie that only marks the axis it was asked about as not rewritable."""
    return NodeTie(node, Role.THROUGH, (entry(node, port, axis),), frozen=reason)


def identity(node: ir.Node, axes: list[tuple[Port, int]], role: Role = Role.THROUGH) -> NodeTie:
    """A tie where every listed axis carries the same channels in the same order.

    Freezes when a size is unknown or the sizes differ.
    """
    entries = tuple(entry(node, port, axis) for port, axis in axes)
    sizes = {None if e.index is None else len(e.index) for e in entries}
    reason = None
    if None in sizes:
        reason = "channel count is dynamic"
    elif len(sizes) > 1:
        reason = f"{node.op_type} ties axes of different sizes {sorted(sizes)}"
    return NodeTie(node, role, entries, frozen=reason)


def opset_of(node: ir.Node) -> int:
    """The ONNX opset that applies to ``node``."""
    if node.version is not None:
        return int(node.version)
    imports = getattr(node.graph, "opset_imports", None) or {}
    return int(next((imports[d] for d in STANDARD_DOMAINS if d in imports), 0))


def norm_axis(axis: int, rank: int) -> int:
    """``axis`` made non-negative for a tensor of rank ``rank``."""
    return axis + rank if axis < 0 else axis
