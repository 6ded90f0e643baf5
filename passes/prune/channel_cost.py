"""What channels cost: MACs and parameters as polynomials in the groups' keep vectors.

Removing channels scales the cost of everything that carries them. A node's MACs (a weight's
parameter count) is ``base * prod_f (w_f . keep_{g_f})``: one factor per channel axis it
depends on, where ``keep_g`` is the 0/1 keep vector of group ``g`` and ``w_f[c]`` the share
of that axis held by group channel ``c`` (positions of ``c`` / axis size; a flattened channel
owns a block, a concat slot a slice). MACs factor over the node's output channel axes and,
for a consumer (Conv, Gemm, MatMul), the contracted input axis, so the total is a quadratic
polynomial in the keep vectors (conv MACs ~ ``C_in * C_out``). Parameters factor the same way
over the axes of each weight that groups slice. The counts are those of
:mod:`~onnxopt.cost`, exactly, for any keep vectors, at the concrete shapes of
:mod:`~onnxopt.shapes` (channel counts are static, so the spatial and batch dims found once
hold for every keep vector). Nodes whose MACs stay unknown are named in ``unknown``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxopt.channels.groups import ChannelAnalysis, ChannelGroup, Member
from onnxopt.channels.tie import IN0, Role, rank_of
from onnxopt.cost import node_macs
from onnxopt.ir import node_label
from onnxopt.shapes import ShapeTable, concrete_shapes

__all__ = ["COST_MODELS", "CostModel", "CostTerm", "Keep", "macs_model", "params_model"]

Keep = dict[int, np.ndarray]
"""Group index -> boolean keep vector over its channels."""


@dataclass
class CostTerm:
    """``base * prod (w . keep_g)`` over its factors ``(group index, w)``."""

    base: float
    factors: list[tuple[int, np.ndarray]]

    def value(self, fractions: Sequence[float]) -> float:
        """The term at the given kept fractions ``w . keep_g`` of its factors, in order."""
        return self.base * math.prod(fractions)

    def held(self, kept: Sequence[int]) -> CostTerm:
        """The term with only factors ``kept`` (indices) free, the others at full width."""
        return CostTerm(self.base, [self.factors[i] for i in kept])


@dataclass
class CostModel:
    """A cost (MACs or params) as a sum of :class:`CostTerm`; constant terms are folded in.

    ``unknown`` says why the cost is incomplete (a node whose MACs need an unknown dim is
    left out, so the total is a lower bound); empty when it is exact.
    """

    constant: float = 0.0
    terms: list[CostTerm] = field(default_factory=list)
    unknown: str = ""

    def by_group(self) -> dict[int, list[int]]:
        """Group index -> indices of the terms that depend on it."""
        found: dict[int, list[int]] = {}
        for t, term in enumerate(self.terms):
            for g in dict.fromkeys(g for g, _ in term.factors):
                found.setdefault(g, []).append(t)
        return found

    def total(self, keep: Keep | None = None) -> float:
        """The cost with the channels ``keep`` says (all channels when omitted)."""
        total = self.constant
        for term in self.terms:
            total += term.value([float(w @ keep[g]) if keep is not None and g in keep else 1.0
                                 for g, w in term.factors])
        return total

    def restrict(self, groups: Sequence[int]) -> CostModel:
        """The same cost with factors of groups outside ``groups`` held at full width."""
        wanted = set(groups)
        model = CostModel(self.constant, unknown=self.unknown)
        for term in self.terms:
            held = term.held([i for i, (g, _) in enumerate(term.factors) if g in wanted])
            if held.factors:
                model.terms.append(held)
            else:
                model.constant += held.value([])
        return model


def _share(group: ChannelGroup, member: Member) -> np.ndarray:
    """``w[c]``: positions of group channel ``c`` in ``member`` / size of the axis."""
    counts = np.bincount(member.channels, minlength=group.size).astype(np.float64)
    return counts / max(len(member.channels), 1)


def _add(model: CostModel, base: float, factors: list[tuple[int, np.ndarray]]) -> None:
    if base <= 0:
        return
    if factors:
        model.terms.append(CostTerm(float(base), factors))
    else:
        model.constant += float(base)


def macs_model(analysis: ChannelAnalysis, shapes: ShapeTable | None = None) -> CostModel:
    """MACs per sample (as :func:`~onnxopt.cost.node_macs` counts them) by keep vectors.

    Args:
        analysis: The channel groups of the model.
        shapes: Concrete shapes of the model's values (default: inferred with the inputs'
            own dims, a dynamic leading axis at 1).
    """
    if shapes is None:
        shapes = concrete_shapes(analysis.model)
    consumed: dict[int, tuple[ChannelGroup, Member]] = {}
    for group in analysis.groups:
        for tie in group.ties_with_role(Role.CONSUMER):
            member = tie.member_at(IN0)
            if member is not None and member.channels is not None:
                consumed[id(tie.node)] = (group, member)
    model = CostModel()
    for node in analysis.model.graph:
        macs = node_macs(node, shapes)
        if macs is None:
            model.unknown = model.unknown or shapes.why_unknown(node_label(node))
            continue
        factors = []
        if node.outputs:
            out = node.outputs[0]
            for axis in range(rank_of(out) or 0):
                found = analysis.lookup(out, axis)
                if found is not None and found[1].channels is not None:
                    factors.append((found[0].index, _share(*found)))
        if id(node) in consumed:
            group, member = consumed[id(node)]
            factors.append((group.index, _share(group, member)))
        _add(model, macs, factors)
    return model


def params_model(analysis: ChannelAnalysis, shapes: ShapeTable | None = None) -> CostModel:
    """Initializer elements by keep vectors (weights sliced by groups scale with them).

    ``shapes`` is accepted for a common signature; weight shapes are always static.
    """
    axes: dict[int, dict[int, tuple[ChannelGroup, Member]]] = {}
    for group in analysis.groups:
        for member in group.weights:
            value = member.node.inputs[member.input_index]
            if value is not None and member.channels is not None:
                axes.setdefault(id(value), {}).setdefault(member.axis, (group, member))
    model = CostModel()
    for graph in analysis.model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            size = math.prod(d if isinstance(d, int) else 1 for d in tensor.shape)
            factors = [(g.index, _share(g, m)) for g, m in axes.get(id(value), {}).values()]
            _add(model, size, factors)
    return model


COST_MODELS: dict[str, Callable[[ChannelAnalysis, ShapeTable | None], CostModel]] = {
    "macs": macs_model,
    "params": params_model,
}
"""Budget kind -> its cost model."""
