"""HardSwish as its ONNX function body, ``x * HardSigmoid(x)``: the nodes both cleanup's
fusion (before opset 14) and quantize's split build."""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

#: HardSwish(x) = x * max(0, min(1, alpha * x + beta)) (its ONNX function body).
ALPHA, BETA = 1.0 / 6.0, 0.5


def gated_product(x: ir.Value, out: ir.Value, base: str,
                  names: Callable[[str], str]) -> list[ir.Node]:
    """``[HardSigmoid(x), Mul(x, gate)]``, standing for the HardSwish output ``out``.

    The Mul is named ``base``; the HardSigmoid gets a fresh ``<base>_gate`` and its output a
    fresh ``<out>_gate`` with ``out``'s type and shape (``names`` makes names fresh).
    """
    gate = ir.node("HardSigmoid", [x], {"alpha": ALPHA, "beta": BETA},
                   name=names(f"{base}_gate"))
    gate.outputs[0].name = names(f"{out.name}_gate")
    gate.outputs[0].type, gate.outputs[0].shape = out.type, out.shape
    return [gate, ir.node("Mul", [x, gate.outputs[0]], name=base)]
