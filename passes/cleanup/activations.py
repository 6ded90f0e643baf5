"""Hard swish written out as arithmetic, ``x * Clip(x + 3, 0, 6) / 6``, made one activation.

Exporters of models older than opset 14 (PaddlePaddle's among them) write MobileNetV3's hard
swish as four float ops: ``Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(6)`` (or ``Mul(1/6)``,
or the division on the clipped term). ``Clip(x + 3, 0, 6) / 6 = max(0, min(1, x / 6 + 1/2))``
is ``HardSigmoid(x; alpha=1/6, beta=1/2)``, so the four ops are ``HardSwish(x)`` from opset 14
on and ``Mul(x, HardSigmoid(x))`` before it: the same function up to float rounding, two
passes over the tensor instead of four (the PP-OCR angle classifier ran 0.73-0.79x its
original latency in float), and an int8 product for ``quantize``. The Add, Clip and
product must have no other reader; ``x`` may have any number. Main graph only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.hard_swish import gated_product
from onnxopt.ir import FreshNames, const_array, is_standard, substitute

#: The constants of the written-out form.
SHIFT, LOW, HIGH = 3.0, 0.0, 6.0
#: First opset with a HardSwish op.
HARD_SWISH_OPSET = 14


def _scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(-1)[0])


def _near(value: float | None, want: float) -> bool:
    return value is not None and abs(value - want) <= 1e-6 * max(1.0, abs(want))


def _only_reader(value: ir.Value, node: ir.Node) -> bool:
    return (not value.is_graph_output() and len(value.uses()) == 1
            and value.uses()[0].node is node)


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and is_standard(node) else None


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a two-input node, when ``value`` is one of them."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    return b if a is value else a if b is value else None


def _divided_by_six(node: ir.Node) -> ir.Value | None:
    """``t`` when ``node`` is ``Div(t, 6)`` or ``Mul(t, 1/6)`` (either order), else None."""
    if not is_standard(node) or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op_type == "Div" and _near(_scalar(b), HIGH):
        return a
    if node.op_type == "Mul":
        if _near(_scalar(b), 1.0 / HIGH):
            return a
        if _near(_scalar(a), 1.0 / HIGH):
            return b
    return None


def _gate_of(clipped: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """``(x, [Add, Clip])`` when ``clipped`` is ``Clip(x + 3, 0, 6)`` read only once."""
    clip = _producer(clipped, "Clip")
    if clip is None or clipped is None or len(clipped.uses()) != 1 or clipped.is_graph_output():
        return None
    if len(clip.inputs) == 3:
        low, high = _scalar(clip.inputs[1]), _scalar(clip.inputs[2])
    else:
        low, high = clip.attributes.get_float("min", None), clip.attributes.get_float("max", None)
    if not (_near(low, LOW) and _near(high, HIGH)):
        return None
    add = _producer(clip.inputs[0], "Add")
    if add is None or not _only_reader(clip.inputs[0], clip) or len(add.inputs) != 2:
        return None
    a, b = add.inputs
    for x, shift in ((a, b), (b, a)):
        if x is not None and _near(_scalar(shift), SHIFT) and const_array(x) is None:
            return x, [add, clip]
    return None


def _match(last: ir.Node) -> tuple[ir.Value, list[ir.Node]] | None:
    """``(x, nodes to replace)`` when ``last`` ends a written-out hard swish."""
    # x * Clip(x + 3, 0, 6), divided by 6
    product = _divided_by_six(last)
    mul = _producer(product, "Mul")
    if mul is not None and product is not None and _only_reader(product, last):
        for clipped in mul.inputs:
            found = _gate_of(clipped)
            if found is not None and clipped is not None and _other(mul, clipped) is found[0]:
                return found[0], [*found[1], mul, last]
    # x * (Clip(x + 3, 0, 6) / 6)
    if last.op_type == "Mul" and is_standard(last) and len(last.inputs) == 2:
        for term in last.inputs:
            div = term.producer() if term is not None else None
            if div is None or term is None or not _only_reader(term, last):
                continue
            clipped = _divided_by_six(div)
            found = _gate_of(clipped)
            if found is not None and _other(last, term) is found[0]:
                return found[0], [*found[1], div, last]
    return None


def fuse_hard_swish(model: ir.Model, opset: int) -> int:
    """Replace each written-out hard swish of the main graph; returns how many.

    The result keeps the last node's name and output value (name and all).
    """
    graph = model.graph
    names = FreshNames(graph)
    fused = 0
    for last in list(graph):
        if last.graph is not graph or last.op_type not in ("Div", "Mul"):
            continue
        found = _match(last)
        if found is None:
            continue
        x, nodes = found
        out = last.outputs[0]
        base = last.name or names("hard_swish")
        if opset >= HARD_SWISH_OPSET:
            new = [ir.node("HardSwish", [x], name=base)]
        else:
            new = gated_product(x, out, base, names)
        substitute(graph, out, new, nodes)
        fused += 1
    return fused
