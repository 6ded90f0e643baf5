"""Linear forms of conv branches over a common input, for the ``fuse-resconv`` pass.

A linear form over a base ``x`` is ``W * x + s . x + b``: at most one conv kernel ``W`` with
its geometry, a per-channel identity scale ``s`` and a per-channel bias ``b``. ``Conv(x)`` and
``x`` are leaves; ``BatchNormalization`` (``g * y + h``) and ``Mul`` by a constant scalar or
per-channel ``a`` scale a form per output channel; ``Add`` of two forms over the same base adds
them (kernels merged by :func:`onnxopt.passes.fuse_resconv.kernel.merge_geometry`). A ``Mul`` whose
``max |a|`` is within the pruning threshold drops the conv branch under it, remembering it as a
removed layer. The per-op behaviour is the table :data:`RULES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.bn import bn_affine
from onnxopt.ir import attr, const_array, is_constant, is_standard, node_label
from onnxopt.passes.fuse_resconv.kernel import (
    Geometry,
    KernelMismatch,
    conv_geometry,
    embed_kernel,
    merge_geometry,
)


class NoFusion(Exception):
    """A matched block that cannot be rewritten; the message is the refusal reason."""


@dataclass
class DroppedLayer:
    """A conv branch removed by layer pruning: its label, its scale and the nodes it took."""

    name: str
    scale: np.ndarray
    nodes: list[ir.Node]


@dataclass
class Form:
    """``weight * base + ident . base + bias`` and the nodes that compute it.

    Attributes:
        base: The common input ``x``.
        rank: Number of spatial axes, when known.
        weight: The merged conv kernel in float64, or None (no live conv branch).
        geometry: The kernel's geometry (None with ``weight``).
        ident: Per-channel scale of the identity term (``()`` or ``[C]``), None if absent.
        bias: Per-channel bias (``()`` or ``[C]``).
        signatures: Output-shape signatures of every conv taken, live or dropped.
        nodes: The nodes computing the form, each once.
        dropped: Conv branches removed by layer pruning.
        ident_leaves: How many times the base is read directly.
        ident_affine: Whether a BN or Mul scales the identity term.
    """

    base: ir.Value
    rank: int | None
    weight: np.ndarray | None = None
    geometry: Geometry | None = None
    ident: np.ndarray | None = None
    bias: np.ndarray = field(default_factory=lambda: np.zeros(()))
    signatures: list[tuple] = field(default_factory=list)
    nodes: list[ir.Node] = field(default_factory=list)
    dropped: list[DroppedLayer] = field(default_factory=list)
    ident_leaves: int = 0
    ident_affine: bool = False

    def count(self, op_type: str) -> int:
        """Number of nodes of ``op_type`` in the form."""
        return sum(n.op_type == op_type for n in self.nodes)

    @property
    def channels(self) -> int | None:
        """Output channels, when the form says."""
        if self.geometry is not None:
            return self.geometry.cout
        vectors = [v for v in (self.ident, self.bias) if v is not None and v.ndim == 1]
        return vectors[0].shape[0] if vectors else None


def _union(*lists: list) -> list:
    seen: dict[int, object] = {}
    for item in (x for lst in lists for x in lst):
        seen.setdefault(id(item), item)
    return list(seen.values())


def _check_channels(array: np.ndarray, channels: int | None, what: str) -> np.ndarray:
    if array.ndim == 1 and channels is not None and array.shape[0] != channels:
        raise NoFusion(f"{what} has {array.shape[0]} channels, the branch has {channels}")
    return array


def _affine(form: Form, g: np.ndarray, h: np.ndarray, node: ir.Node) -> Form:
    """``g * form + h`` per channel, computed by ``node``."""
    g = _check_channels(g, form.channels, f"{node_label(node)}'s scale")
    h = _check_channels(h, form.channels, f"{node_label(node)}'s offset")
    weight = None
    if form.weight is not None:
        cout = form.weight.shape[0]
        weight = form.weight * np.broadcast_to(g, (cout,)).reshape(
            (cout,) + (1,) * (form.weight.ndim - 1))
    return Form(form.base, form.rank, weight, form.geometry,
                None if form.ident is None else form.ident * g, form.bias * g + h,
                form.signatures, form.nodes + [node], form.dropped, form.ident_leaves,
                form.ident_affine or form.ident is not None)


def _sum(a: Form, b: Form, node: ir.Node) -> Form:
    """``a + b`` computed by the Add ``node``."""
    if a.rank is not None and b.rank is not None and a.rank != b.rank:
        raise NoFusion("branches have different ranks")
    weight, geometry = a.weight if a.weight is not None else b.weight, a.geometry or b.geometry
    if a.weight is not None and b.weight is not None:
        try:
            geometry = merge_geometry(a.geometry, b.geometry)
        except KernelMismatch as err:
            raise NoFusion(str(err)) from err
        weight = embed_kernel(a.weight, geometry.kernel) + embed_kernel(b.weight, geometry.kernel)
    terms = [t for t in (a.ident, b.ident) if t is not None]
    try:
        ident = sum(terms[1:], terms[0]) if terms else None
        bias = a.bias + b.bias
    except ValueError as err:
        raise NoFusion("branches have different channel counts") from err
    cout = geometry.cout if geometry is not None else None
    if ident is not None:
        _check_channels(ident, cout, "the identity branch")
    return Form(a.base, a.rank if a.rank is not None else b.rank, weight, geometry, ident,
                _check_channels(bias, cout, "the bias"), a.signatures + b.signatures,
                _union(a.nodes, b.nodes, [node]), _union(a.dropped, b.dropped),
                a.ident_leaves + b.ident_leaves, a.ident_affine or b.ident_affine)


def _per_channel_scale(scale: np.ndarray, ndim: int | None) -> np.ndarray:
    """A Mul constant as a scalar or ``[C]`` vector, if it scales whole channels."""
    if ndim is not None and scale.ndim > ndim:
        raise NoFusion(f"scale of shape {scale.shape} raises the rank of the output")
    if scale.size == 1:
        return scale.reshape(())
    if ndim is None:
        raise NoFusion(f"scale of shape {scale.shape} needs the tensor rank, which is unknown")
    full = scale.reshape((1,) * (ndim - scale.ndim) + scale.shape)
    if any(s != 1 for i, s in enumerate(full.shape) if i != 1):
        raise NoFusion(f"scale of shape {scale.shape} is not per-channel "
                       "(it broadcasts along a non-channel axis)")
    return full.reshape(-1)


# -- per-op rules: which inputs are linear branches, and the form the op computes -------------


def _conv_operands(node: ir.Node) -> list[ir.Value] | None:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if not is_constant(weight) or (bias is not None and not is_constant(bias)):
        return None
    w = const_array(weight)
    if w is None or w.ndim < 3 or not np.issubdtype(w.dtype, np.floating):
        return None
    return [node.inputs[0]]


def _conv_form(m: Matcher, node: ir.Node, base: ir.Value) -> Form:
    w = np.asarray(const_array(node.inputs[1]), np.float64)
    try:
        geom = conv_geometry(node, w.shape)
    except KernelMismatch as err:
        raise NoFusion(str(err)) from err
    b = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    bias = np.zeros(geom.cout) if b is None else np.asarray(b, np.float64).reshape(-1)
    return Form(base, w.ndim - 2, w, geom, None, bias, [geom.signature], [node])


def _bn_operands(node: ir.Node) -> list[ir.Value] | None:
    if len(node.inputs) != 5 or attr(node, "training_mode", 0):
        return None
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return None
    return [node.inputs[0]] if all(is_constant(v) for v in node.inputs[1:]) else None


def _bn_form(m: Matcher, node: ir.Node, base: ir.Value) -> Form:
    params = [np.asarray(const_array(v), np.float64).reshape(-1) for v in node.inputs[1:]]
    g, h = bn_affine(*params, attr(node, "epsilon", 1e-5))
    return _affine(m.form(node.inputs[0], base), g, h, node)


def _mul_operands(node: ir.Node) -> list[ir.Value] | None:
    if len(node.inputs) != 2:
        return None
    consts = [is_constant(v) for v in node.inputs]
    return [node.inputs[consts.index(False)]] if consts.count(True) == 1 else None


def _mul_form(m: Matcher, node: ir.Node, base: ir.Value) -> Form:
    x, a = node.inputs if is_constant(node.inputs[1]) else node.inputs[::-1]
    sub = m.form(x, base)
    scale = _per_channel_scale(np.asarray(const_array(a), np.float64),
                               None if sub.rank is None else sub.rank + 2)
    if sub.weight is not None and float(np.max(np.abs(scale))) <= m.threshold:
        conv = next(n for n in sub.nodes if n.op_type == "Conv")
        layer = DroppedLayer(node_label(conv), scale, sub.nodes + [node])
        return Form(base, sub.rank, signatures=sub.signatures, nodes=sub.nodes + [node],
                    dropped=sub.dropped + [layer])
    return _affine(sub, scale, np.zeros(()), node)


def _add_operands(node: ir.Node) -> list[ir.Value] | None:
    if len(node.inputs) != 2 or any(v is None or is_constant(v) for v in node.inputs):
        return None
    return list(node.inputs)


def _add_form(m: Matcher, node: ir.Node, base: ir.Value) -> Form:
    return _sum(m.form(node.inputs[0], base), m.form(node.inputs[1], base), node)


@dataclass(frozen=True)
class Rule:
    """How one op type takes part in a linear form.

    Attributes:
        operands: The inputs that are linear branches, or None when this node is not linear
            (e.g. a non-constant weight).
        form: Builds the node's form over a base from its operands' forms.
        leaf: Whether the node starts a form (its operand is the base, not a branch).
    """

    operands: Callable[[ir.Node], list[ir.Value] | None]
    form: Callable[[Matcher, ir.Node, ir.Value], Form]
    leaf: bool = False


RULES: dict[str, Rule] = {
    "Conv": Rule(_conv_operands, _conv_form, leaf=True),
    "BatchNormalization": Rule(_bn_operands, _bn_form),
    "Mul": Rule(_mul_operands, _mul_form),
    "Add": Rule(_add_operands, _add_form),
}


class Matcher:
    """Finds the bases each value is a linear form over, and builds the form over one base.

    Args:
        graph: The graph; the bases of every node output are computed up front in
            topological order. Rewrites must only replace nodes downstream of the values
            still to be queried (the pass visits roots from the last node back).
        threshold: Layer-pruning threshold on ``max |a|``.
    """

    def __init__(self, graph: ir.Graph, threshold: float) -> None:
        self.threshold = threshold
        self._bases: dict[ir.Value, dict[ir.Value, bool]] = {}
        self._forms: dict[tuple[ir.Value, ir.Value], Form] = {}
        for node in graph:
            if node.outputs:
                self.bases(node.outputs[0])

    @staticmethod
    def rule(value: ir.Value) -> tuple[Rule, list[ir.Value]] | None:
        """The rule of ``value``'s producer and its branch operands, if it is linear."""
        node = value.producer()
        if node is None or not is_standard(node) or node.outputs[0] is not value:
            return None
        rule = RULES.get(node.op_type)
        operands = rule.operands(node) if rule is not None else None
        return None if operands is None else (rule, operands)

    def bases(self, value: ir.Value) -> dict[ir.Value, bool]:
        """Values ``value`` is a linear form over, each with whether that form has a conv.

        Ordered from ``value`` itself to the deepest base.
        """
        if value in self._bases:
            return self._bases[value]
        found: dict[ir.Value, bool] = {value: False}
        matched = self.rule(value)
        if matched is not None:
            rule, operands = matched
            if rule.leaf:
                found[operands[0]] = True
            elif len(operands) == 1:
                found.update(self.bases(operands[0]))
            else:
                left, right = (self.bases(v) for v in operands)
                found.update({b: left[b] or right[b] for b in left if b in right})
        self._bases[value] = found
        return found

    def form(self, value: ir.Value, base: ir.Value) -> Form:
        """The linear form of ``value`` over ``base`` (raises :class:`NoFusion`)."""
        key = (value, base)
        if key not in self._forms:
            if value is base:
                rank = len(base.shape) - 2 if base.shape is not None else None
                self._forms[key] = Form(base, rank, ident=np.ones(()), ident_leaves=1)
            else:
                rule, _ = self.rule(value)
                self._forms[key] = rule.form(self, value.producer(), base)
        return self._forms[key]

    def root_forms(self, root: ir.Node) -> tuple[list[Form], list[str]]:
        """Forms of ``root``'s output over every base that involves a conv, largest first,
        and the reasons the other such bases failed."""
        self._forms.clear()
        out = root.outputs[0]
        forms, reasons = [], []
        for base, has_conv in self.bases(out).items():
            if base is out or not has_conv:
                continue
            try:
                forms.append(self.form(out, base))
            except NoFusion as err:
                reasons.append(str(err))
        forms.sort(key=lambda f: -len(f.nodes))
        return forms, reasons
