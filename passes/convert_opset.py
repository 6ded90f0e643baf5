"""The ``convert-opset`` pass: upgrade the default-domain opset with onnx's version converter.

Newer opsets give some ops new abilities without changing what old graphs compute (per-channel
``axis`` on QuantizeLinear/DequantizeLinear from opset 13, integer MaxPool from 12), and the
converter rewrites the nodes whose operator changed on the way (``Upsample`` becomes
``Resize``, attributes such as Slice's ``starts`` become constant inputs, ...). The pass is
exact: the manager checks the converted model against the previous outputs like any other
rewrite. It only upgrades; a model at or above the target is left alone. When the converter
cannot convert some node, the pass refuses in one line naming its op (see
:func:`onnxopt.opset.convert_opset`). Other domains (``ai.onnx.ml``, custom ones) are kept.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from onnxopt.ir import opset_version
from onnxopt.opset import OpsetConversionError, convert_opset
from onnxopt.options import option
from onnxopt.pass_base import Pass, PassContext, PassResult, register_pass

logger = logging.getLogger(__name__)

#: The oldest opset the pass converts to (onnxruntime's floor for the default domain).
MIN_TARGET = 7


@dataclass(frozen=True)
class ConvertOpsetOptions:
    """Options of ``convert-opset``.

    Attributes:
        target: The default-domain opset to convert to (13 gives per-channel quantization).
    """

    target: int = option(13, within=f"[{MIN_TARGET}, {onnx.defs.onnx_opset_version()}]")

    def __post_init__(self) -> None:
        newest = onnx.defs.onnx_opset_version()
        if not MIN_TARGET <= self.target <= newest:
            raise ValueError(f"target={self.target} is not an opset from {MIN_TARGET} to "
                             f"{newest} (the newest this onnx knows)")


@register_pass
class ConvertOpsetPass(Pass):
    """Upgrades the default-domain opset with onnx's version converter."""

    name = "convert-opset"
    description = "upgrade the default-domain opset (onnx's version converter)"
    Options = ConvertOpsetOptions
    exact = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Convert ``model`` to ``target`` in place, or refuse naming the op that blocks it."""
        target = self.options.target
        result = PassResult(modified=False)
        current = opset_version(model)
        result.stats = {"opset_before": current, "opset_after": current}
        if current == 0:
            result.summary = "the model imports no default-domain opset; nothing to convert"
            return result
        if current >= target:
            result.summary = f"the model already has opset {current} (target {target})"
            return result
        before = _op_histogram(model)
        try:
            convert_opset(model, target)
        except OpsetConversionError as exc:
            result.refuse("model", str(exc))
            return result
        after = _op_histogram(model)
        result.modified = True
        result.stats.update({
            "opset_after": target,
            "ops_removed": dict(sorted((before - after).items())),
            "ops_added": dict(sorted((after - before).items())),
        })
        result.summary = f"opset {current} -> {target} (onnx version converter)"
        return result


def _op_histogram(model: ir.Model) -> Counter:
    """Op types of every node, in bodies too."""
    return Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))
