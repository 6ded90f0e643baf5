"""Elementwise nodes worth int8: those inside a chain of integer kernels, never a power of one.

QLinearAdd, QLinearMul, QLinearConcat, QLinearSigmoid, QLinearSoftmax and the quantized pools
are not much faster than their float ops; they pay off by keeping values integer *between*
integer kernels, which saves a DequantizeLinear before them and a QuantizeLinear after them.
So such a
node (every planned node that is not Conv/ConvTranspose/Gemm/MatMul and has its own output
scale) stays float when

* none of its activations comes from a quantized node (through Relu/Clip and ops that only
  move values): e.g. a LayerNorm's ``(x - mean) * rsqrt(var) * gamma + beta`` after a
  Reciprocal, or ``1 + tanh(.)``. Quantizing it would add rounding and a QuantizeLinear;
* no quantized node reads its output: it then needs a DequantizeLinear after it instead of
  before it, and dropping it lets the nodes before it drop out too (a GELU after a MatMul that
  then returns float directly). A Concat that is a graph output would also give one scale to
  inputs of very different ranges (a detector's pixel boxes and its [0, 1] class scores: the
  scores rounded to steps of more than 1), and a final Softmax keeps float probabilities;

A node that only moves values (MaxPool, Reshape, ...; its output shares its input's scale)
stays float too when no quantized node produces its input: quantizing it would only move the
QuantizeLinear from after it to before it, and would make its output look quantized to the
nodes after it (a global pool after it would then be planned as fed by an integer kernel).

An input that a Conv/Gemm/MatMul also reads counts as quantized for both rules above, whatever
produced it: it gets its QuantizeLinear for that reader anyway, and the other readers share
that int8 copy (a ShuffleNet unit's average-pool shortcut of a tensor after a float Sum, which
its conv branch reads too: onnxruntime then runs the pool and the Concat after it int8 and
channels-last between the convolutions instead of a float pool with a Transpose on each side).

and a Mul or Add whose two activations are polynomials of one and the same tensor (``x * x``,
``x * (c * x)``, ``x + c * x**3``: a LayerNorm's square, the tanh approximation of GELU) stays
float whatever its neighbours: its range grows as a power of its input's (the cube of 30 is
27000), so one int8 scale rounds every small value of it to zero.

Dropping a node can leave a neighbour without a quantized producer or reader, so the chain
rule is applied until nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxopt.ir import is_constant, is_standard
from onnxopt.passes.quantize.refusion import VALUE_PRESERVING

if TYPE_CHECKING:
    from onnxopt.passes.quantize.placement import NodePlan

#: Ops through which a tensor stays a polynomial of its root: op -> degree of the result
#: from the degrees of two activation operands (one activation: the same degree).
POLYNOMIAL: dict[str, Callable[[int, int], int]] = {
    "Mul": lambda a, b: a + b,
    "Add": max,
    "Sub": max,
    "Div": max,  # only with a constant divisor (checked below)
}
POWER = ("a power of one tensor (x*x, x + c*x^3, ...): its range grows as a power of its "
         "input's, more than one int8 scale can hold")
NO_PRODUCER = ("no quantized node produces its inputs: int8 here saves no conversion and "
               "only adds rounding")
NO_READER = ("no quantized node reads its output (a graph output or float readers): int8 "
             "here saves no conversion and only adds rounding")


def powers(graph: ir.Graph) -> dict[str, tuple[str, int]]:
    """Tensors computed from one root tensor by Mul/Add/Sub/Div: name -> (root, degree).

    Tensors that are not such polynomials (degree 1 of themselves) are left out.
    """
    poly: dict[str, tuple[str, int]] = {}

    def of(value: ir.Value) -> tuple[str, int]:
        return poly.get(value.name, (value.name, 1))

    for node in graph:
        combine = POLYNOMIAL.get(node.op_type)
        if combine is None or not is_standard(node) or not node.outputs:
            continue
        if node.op_type == "Div" and (len(node.inputs) < 2 or not is_constant(node.inputs[1])):
            continue
        acts = [v for v in node.inputs if v is not None and not is_constant(v)]
        if len(acts) == 1:
            poly[node.outputs[0].name] = of(acts[0])
        elif len(acts) == 2:
            (root_a, deg_a), (root_b, deg_b) = of(acts[0]), of(acts[1])
            if root_a == root_b:
                poly[node.outputs[0].name] = (root_a, combine(deg_a, deg_b))
    return poly


def unchained(graph: ir.Graph, nodes: Sequence[NodePlan],
              chained: Callable[[NodePlan], bool],
              follows_input: Callable[[NodePlan], bool]) -> dict[int, str]:
    """Planned nodes that should stay float, by ``id`` of the node, with the reason.

    Args:
        graph: The float graph.
        nodes: The planned nodes.
        chained: Whether the chain and power rules apply to a planned node (elementwise ops
            with their own output scale).
        follows_input: Whether a planned node's output shares its input's parameters
            (data movement), so that it is quantized when its input is.
    """
    poly = powers(graph)
    dropped: dict[int, str] = {}
    for p in nodes:
        if (chained(p) and p.node.op_type in ("Mul", "Add")
                and poly.get(p.node.outputs[0].name, ("", 1))[1] >= 2):
            dropped[id(p.node)] = POWER
    while True:
        kept = {id(p.node): p for p in nodes if id(p.node) not in dropped}
        arrives, wanted = _arrives(kept, follows_input), _wanted(kept, follows_input)
        more = {}
        for p in kept.values():
            moves = follows_input(p)
            if not chained(p) and not moves:
                continue
            acts = [p.node.inputs[i] for i in p.activations if p.node.inputs[i] is not None]
            if not any(arrives(v) or _quantized_anyway(v, kept, chained, follows_input)
                       for v in acts):
                # a node that only moves values (MaxPool, Reshape, ...) after a float
                # producer: quantizing it would put the QuantizeLinear before it instead of
                # after it, and make its output look quantized to the nodes after it
                more[id(p.node)] = NO_PRODUCER
            elif not moves and not wanted(p.node.outputs[0]):
                more[id(p.node)] = NO_READER
        if not more:
            return dropped
        dropped.update(more)


def _quantized_anyway(value: ir.Value, kept: dict[int, NodePlan],
                      chained: Callable[[NodePlan], bool],
                      follows_input: Callable[[NodePlan], bool]) -> bool:
    """Whether a kept compute node (Conv, Gemm, ...: never dropped by these rules) reads
    ``value`` as an activation, so that it gets a QuantizeLinear whatever its other readers
    do, and they can read that int8 copy at no extra conversion."""
    for use in value.uses():
        p = kept.get(id(use.node))
        if (p is not None and use.idx in p.activations and not chained(p)
                and not follows_input(p)):
            return True
    return False


def _arrives(kept: dict[int, NodePlan],
             follows_input: Callable[[NodePlan], bool]) -> Callable[[ir.Value], bool]:
    """Whether a tensor is the output of a quantized node (through value-preserving ops)."""
    seen: dict[str, bool] = {}

    def arrives(value: ir.Value) -> bool:
        if value.name in seen:
            return seen[value.name]
        seen[value.name] = False  # cycles cannot happen in a graph; this guards recursion
        producer = value.producer()
        found = False
        if producer is not None and producer.inputs and producer.inputs[0] is not None:
            p = kept.get(id(producer))
            if p is not None:
                found = not follows_input(p) or arrives(producer.inputs[0])
            elif producer.op_type in VALUE_PRESERVING:
                found = arrives(producer.inputs[0])
        seen[value.name] = found
        return found

    return arrives


def _wanted(kept: dict[int, NodePlan],
            follows_input: Callable[[NodePlan], bool]) -> Callable[[ir.Value], bool]:
    """Whether a quantized node reads a tensor (through value-preserving ops)."""
    seen: dict[str, bool] = {}

    def wanted(value: ir.Value) -> bool:
        if value.name in seen:
            return seen[value.name]
        seen[value.name] = False
        found = False
        for use in value.uses():
            p = kept.get(id(use.node))
            if p is not None and use.idx in p.activations:
                found = not follows_input(p) or any(
                    wanted(out) for out in use.node.outputs if out is not None)
            elif p is None and use.idx == 0 and use.node.op_type in VALUE_PRESERVING:
                found = any(wanted(out) for out in use.node.outputs if out is not None)
            if found:
                break
        seen[value.name] = found
        return found

    return wanted
