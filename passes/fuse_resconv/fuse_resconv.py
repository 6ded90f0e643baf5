"""The ``fuse-resconv`` pass: residual and multi-branch conv blocks become one Conv.

Algebra. A *linear form* over a base tensor ``x`` is ``y = W * x + s . x + b``: one conv
kernel ``W`` (with its geometry), a per-channel identity scale ``s`` and a per-channel bias
``b``. The ops below map linear forms to linear forms, so a whole block computes one:

* ``Conv(x, W, b)`` is the leaf ``(W, 0, b)``; the base ``x`` itself is the leaf ``(0, 1, 0)``.
* ``BatchNormalization`` is the per-channel affine ``g * y + h`` with
  ``g = gamma / sqrt(var + eps)``, ``h = beta - mean * g``; ``Mul(y, a)`` with a constant
  scalar or per-channel ``a`` is ``a * y``. Both scale ``W``, ``s`` and ``b`` per output channel.
* ``Add`` of two forms over the same ``x`` adds them. Kernels of different sizes are
  zero-padded around their centre to the largest size (a 1x1 or 1x3 inside a 3x3) when their
  strides, groups and dilations agree and their paddings put the taps on the same grid.

The root ``Add`` of such a sum becomes ``Conv(x, W', b')``. The identity term goes into the
kernel centre, ``W'[c, c mod (C/groups), centre] += s[c]``, which needs stride 1, equal in and
out channels, odd kernel sizes and padding ``dilation * (k - 1) / 2`` on each side. This covers
ResConv blocks ``x + a * BN(Conv(x))`` (either operand order, ``a`` scalar or per-channel, or
folded as ``x + Conv(x)``) and RepVGG/ACNet/DBB sums of 3x3, 1x1, 1x3/3x1 and ``BN(x)``
branches, chained Adds included. An activation after the Add stays.

Layer pruning: a ``Mul`` whose constant ``a`` has ``max |a| <= threshold`` over a branch with a
conv drops the branch (``a * f(x) ~ 0``), so ``x + a * f(x)`` becomes ``x``. With the default
threshold 0 only exactly-zero scales are dropped and the rewrite is exact; a nonzero dropped
scale makes the run lossy (``PassResult.exact = False``), and each removed layer is reported.

Refusals (recorded, never silent): the identity conditions above, branches that do not align,
an intermediate value that is a graph output or is read outside the block, a conv weight or
bias shared with a node outside the block (fusing would duplicate it), and scales that are not
per-channel. Small per-channel constants (BN statistics, scales) are only read, so they may be
shared. All conditions come from constant weights and attributes; activation shapes are only
needed for the MAC counts, which are reported when shape inference has filled them in.

The form algebra and the per-op table live in :mod:`.forms`; the kernel geometry (merging,
the identity kernel) in :mod:`.kernel`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.cost import node_macs
from onnxopt.ir import (
    add_initializer,
    const_array,
    is_standard,
    node_label,
    replace_value,
    unique_name,
)
from onnxopt.pass_base import Pass, PassContext, PassResult, register_pass
from onnxopt.passes.fuse_resconv.forms import Form, Matcher, NoFusion
from onnxopt.passes.fuse_resconv.kernel import Geometry, add_identity, identity_blocker
from onnxopt.shapes import ShapeTable, concrete_shapes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FuseResConvOptions:
    """Options of the ``fuse-resconv`` pass.

    Attributes:
        threshold: Layers whose scale has ``max |a| <= threshold`` are removed; 0 removes only
            exactly-zero scales (exact), a negative value disables layer pruning.
        reparam: Also merge RepVGG/ACNet/DBB multi-branch sums; False fuses only
            ``x + f(x)`` blocks with a single conv branch and an unscaled identity.
    """

    threshold: float = 0.0
    reparam: bool = True


@register_pass
class FuseResConvPass(Pass):
    """Fuses ResConv and RepVGG-style blocks into one Conv and prunes zero-scale layers."""

    name = "fuse-resconv"
    description = "fuse x + a*conv(x) and multi-branch conv sums into one Conv; drop a~0 layers"
    Options = FuseResConvOptions
    exact = True
    needs_data = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Rewrite every fusible block of the main graph; see the module docstring.

        Roots are visited from the last node back, so the outermost Add of a chained sum
        takes the whole sum; an Add inside a block that was refused is not reported again.

        Stats: ``blocks_fused`` (blocks now one Conv), ``blocks_removed`` (blocks now their
        input), ``layers_removed`` (one ``{"name", "a", "macs_saved"}`` per pruned conv
        branch), ``branches_merged`` (conv and identity branches taken), ``adds_removed`` and
        ``macs_saved`` (per sample; None when a shape was unknown).
        """
        graph = model.graph
        result = PassResult(modified=False)
        shapes = concrete_shapes(model, ctx.input_shapes)  # fusing keeps every block's shape
        stats: dict[str, Any] = {"blocks_fused": 0, "blocks_removed": 0, "layers_removed": [],
                                 "branches_merged": 0, "adds_removed": 0, "macs_saved": 0}
        matcher = Matcher(graph, self.options.threshold)
        covered: set[int] = set()
        for root in reversed(list(graph)):
            if root.graph is None or root.op_type != "Add" or not is_standard(root):
                continue
            forms, build_reasons = matcher.root_forms(root)
            if not self.options.reparam:
                forms = [f for f in forms if _is_plain_resconv(f)]
            reasons = []
            for form in forms:
                try:
                    reason = (_block_blocker(form, root)
                              or _apply(graph, form, root, stats, shapes))
                except NoFusion as err:
                    reason = str(err)
                if reason is None:
                    result.modified = True
                    break
                reasons.append(reason)
            else:
                reasons += build_reasons
                if reasons and id(root) not in covered:
                    result.refuse(node_label(root), reasons[0])
                    covered.update(id(n) for f in forms for n in f.nodes)
        if any(np.any(layer["a"]) for layer in stats["layers_removed"]):
            result.exact = False
        result.stats = stats
        return result


def _is_plain_resconv(form: Form) -> bool:
    """``x + f(x)`` with one conv branch and an unscaled identity (``reparam=False``)."""
    return (form.count("Add") == 1 and form.count("Conv") == 1 and form.ident_leaves == 1
            and not form.ident_affine)


def _block_blocker(form: Form, root: ir.Node) -> str | None:
    """Why the nodes of ``form`` cannot be replaced, or None."""
    members = {id(n) for n in form.nodes}
    for node in form.nodes:
        for out in node.outputs if node is not root else ():
            if out.is_graph_output():
                return f"'{out.name}' inside the block is a graph output"
            outside = [u.node for u in out.uses() if id(u.node) not in members]
            if outside:
                return f"'{out.name}' is also read by {node_label(outside[0])} outside the block"
        for weight in node.inputs[1:] if node.op_type == "Conv" else ():
            outside = [] if weight is None else [
                u.node for u in weight.uses() if id(u.node) not in members]
            if outside:
                return f"weight '{weight.name}' is shared with {node_label(outside[0])}"
    return None


def _materialize(form: Form) -> tuple[np.ndarray, np.ndarray, Geometry] | None:
    """The fused ``(weight, bias, geometry)`` of ``form``, or None when it is exactly ``x``.

    Raises:
        NoFusion: The identity does not fit the kernel, or a pruned branch changed the shape.
    """
    if form.weight is None:
        sigs = set(form.signatures)
        cin, cout, strides, net = next(iter(sigs))
        if len(sigs) > 1 or cin != cout or any(s != 1 for s in strides) or any(net):
            raise NoFusion("removing the pruned layer would change the output shape")
        geom = Geometry.pointwise(cout, len(strides))
        ident = np.broadcast_to(0.0 if form.ident is None else form.ident, (cout,))
        bias = np.broadcast_to(form.bias, (cout,))
        if np.all(ident == 1.0) and not np.any(bias):
            return None
        return ident.reshape((cout, 1) + (1,) * len(strides)).copy(), bias.copy(), geom
    geom = form.geometry
    if any(sig != geom.signature for sig in form.signatures):
        raise NoFusion("a pruned branch has a different output shape than the fused conv")
    weight = form.weight
    if form.ident is not None:
        reason = identity_blocker(geom)
        if reason:
            raise NoFusion(reason)
        weight = add_identity(weight, geom, form.ident)
    return weight, np.broadcast_to(form.bias, (geom.cout,)).copy(), geom


def _macs(nodes: list[ir.Node], shapes: ShapeTable) -> int | None:
    """MACs of ``nodes`` per sample, None when a shape they need is unknown."""
    macs = [node_macs(n, shapes) for n in nodes]
    return None if None in macs else sum(m for m in macs if m is not None)


def _scale_repr(scale: np.ndarray) -> float | list[float]:
    return float(scale) if scale.ndim == 0 else [float(v) for v in scale]


def _apply(graph: ir.Graph, form: Form, root: ir.Node, stats: dict[str, Any],
           shapes: ShapeTable) -> str | None:
    """Replace the block by one Conv (or by its input); a refusal reason if impossible."""
    fused = _materialize(form)
    out, base = root.outputs[0], form.base
    conv = None
    if fused is None:
        if out.is_graph_output() and (base.producer() is None or base.is_graph_output()):
            return "the block output is a graph output and its input is not a node output"
        new_macs: int | None = 0
    else:
        conv = _fused_conv(graph, form, *fused)
        conv.outputs[0].type, conv.outputs[0].shape = out.type, out.shape
        dims = shapes.dims(out)
        if dims is not None:  # the fused conv has the block's output shape
            shapes.values[conv.outputs[0].name or ""] = dims
        new_macs = node_macs(conv, shapes)
    old_macs = _macs(form.nodes, shapes)
    layers = [{"name": layer.name, "a": _scale_repr(layer.scale),
               "macs_saved": _macs(layer.nodes, shapes)} for layer in form.dropped]
    if conv is not None:
        graph.insert_before(root, conv)
    replace_value(graph, out, base if conv is None else conv.outputs[0])
    _remove_block(graph, form.nodes)
    stats["layers_removed"][:0] = layers  # roots are visited last first; keep graph order
    stats["blocks_fused" if conv is not None else "blocks_removed"] += 1
    stats["branches_merged"] += form.count("Conv") + form.ident_leaves
    stats["adds_removed"] += form.count("Add")
    if old_macs is None or new_macs is None or stats["macs_saved"] is None:
        stats["macs_saved"] = None  # unknown without shapes; a partial sum would mislead
    else:
        stats["macs_saved"] += old_macs - new_macs
    logger.debug("replaced %d nodes at %s", len(form.nodes), node_label(root))
    return None


def _fused_conv(graph: ir.Graph, form: Form, weight: np.ndarray, bias: np.ndarray,
                geom: Geometry) -> ir.Node:
    """The new Conv over ``form.base``, with its weights registered as initializers."""
    first = next(n for n in form.nodes if n.op_type == "Conv")
    dtype = const_array(first.inputs[1]).dtype
    name = unique_name(graph, f"{first.name or 'conv'}_fused")
    inputs = [form.base, add_initializer(graph, f"{name}.weight", weight.astype(dtype))]
    if np.any(bias):
        inputs.append(add_initializer(graph, f"{name}.bias", bias.astype(dtype)))
    node = ir.Node("", "Conv", inputs, geom.attributes(), name=name)
    node.outputs[0].name = name
    return node


def _remove_block(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Remove ``nodes``, then the initializers and Constant nodes only they read."""
    seen: dict[int, ir.Value] = {}
    for value in (v for n in nodes for v in n.inputs if v is not None):
        seen.setdefault(id(value), value)
    graph.remove(nodes, safe=True)
    for value in seen.values():
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        producer = value.producer()
        if value.is_initializer() and graph.initializers.get(value.name) is value:
            del graph.initializers[value.name]
        elif producer is not None and producer.op_type == "Constant" and producer.graph is graph:
            graph.remove(producer, safe=True)
