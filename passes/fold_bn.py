"""The ``fold-bn`` pass: fold inference BatchNormalization into the linear op that feeds it.

Algebra. A Conv, ConvTranspose or Gemm computes, per output channel ``c`` (axis 1 of its
output), ``Y[c] = (W * X)[c] + b[c]`` where only the slice of ``W`` that produces channel
``c`` contributes. Inference BatchNormalization computes
``Z[c] = gamma[c] * (Y[c] - mean[c]) / sqrt(var[c] + eps) + beta[c]``. With
``s = gamma / sqrt(var + eps)``:

    W'[c] = s[c] * W[c]                 (the slice of W along its output-channel axis)
    b'[c] = s[c] * (b[c] - mean[c]) + beta[c]

so ``Z = W' * X + b'`` and the BatchNormalization node disappears. The ops differ only in
where the output channel sits in the weight (:mod:`onnxopt.layouts`: axis 0 of a Conv weight,
one group's share of axis 1 of a ConvTranspose weight, axis 0 or 1 of a Gemm weight by
``transB``). Gemm's effective bias ``beta * C`` must be the same for every row (shape
``[N]``, ``[1, N]`` or a scalar); the folded bias is written with ``beta = 1``.

The rewrite refuses (and says why) when the producer's output has other readers or is a
graph output, when a weight, bias or BN parameter is not a true constant, when the weight or
bias is shared with another node, when the BN runs in training mode or its training outputs
are read, when the dtype is not float16/32/64, or when the channel counts do not line up.
New weights are written as new initializers; the old ones are dropped once unused.

If/Loop/Scan bodies are searched too. Inside a body the same checks hold, and they see every
scope: a weight defined in an outer graph folds only if this Conv is its sole reader in the
whole model, and BN parameters may come from any scope (they are only read). The producer must
sit in the same body as the BatchNormalization (folding into an outer-scope producer would
change a value computed once for every iteration; refused). The folded weight and bias become
initializers of the body that holds the producer, under names unique in the whole model (a
body may not shadow an outer name), and an outer initializer that no longer has readers is
dropped from the graph that owns it. ``in_subgraphs`` counts the folds made inside bodies.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt.bn import bn_affine
from onnxopt.ir import (
    FreshNames,
    add_initializer,
    const_array,
    is_constant,
    is_standard,
    node_label,
    opset_version,
    replace_value,
    used_only_by,
)
from onnxopt.layouts import WEIGHT_INPUT, WeightLayout, gemm_bias, weight_layout
from onnxopt.pass_base import Pass, PassContext, PassResult, register_pass
from onnxopt.provenance import why_not_constant

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)
_BN_PARAMS = ("scale", "bias", "mean", "var")


#: Ops a BatchNormalization folds into (where their channels are: :mod:`onnxopt.layouts`).
_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm"})
_BIAS_INPUT = 2


@register_pass
class FoldBatchNormPass(Pass):
    """Folds inference BatchNormalization into a preceding Conv, ConvTranspose or Gemm."""

    name = "fold-bn"
    description = "fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm"
    exact = True
    needs_data = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Fold every foldable BatchNormalization of the model (bodies included) in place."""
        graph = model.graph
        opset = opset_version(model)
        result = PassResult(modified=False)
        folded = standalone = in_subgraphs = 0
        names: FreshNames | None = None  # every value name of the model, built on first fold
        for bn in list(ir.traversal.RecursiveGraphIterator(graph)):
            if bn.op_type != "BatchNormalization" or not is_standard(bn):
                continue
            producer = bn.inputs[0].producer() if bn.inputs and bn.inputs[0] else None
            if producer is None or producer.op_type not in _PRODUCERS \
                    or not is_standard(producer):
                standalone += 1
                continue
            if producer.graph is not bn.graph:
                result.refuse(node_label(bn), f"{node_label(producer)} is in an outer scope")
                continue
            match = _match(bn, producer, opset)
            if isinstance(match, str):
                result.refuse(node_label(bn), match)
                continue
            if names is None:
                names = FreshNames(graph)
            replaced = producer.inputs[WEIGHT_INPUT].const_value
            body = bn.graph  # _apply removes bn from its graph
            _apply(body, match, names)
            del match  # its views of the old weight must go before the mapping can
            if isinstance(replaced, ir.ExternalTensor):
                # Unmap the old weight now rather than at the end of the pass: on a big model
                # the old and new weights would otherwise both be resident. A snapshot that
                # shares the tensor maps its file again if it is ever read.
                with contextlib.suppress(BufferError):
                    replaced.release()
            logger.debug("folded %s into %s", node_label(bn), node_label(producer))
            folded += 1
            in_subgraphs += body is not graph
        result.modified = folded > 0
        result.stats = {"folded": folded, "standalone": standalone,
                        "refused": len(result.refusals), "in_subgraphs": in_subgraphs}
        return result


@dataclass(frozen=True)
class _Match:
    """A BatchNormalization and the linear node it folds into, with their constants."""

    bn: ir.Node
    producer: ir.Node
    layout: WeightLayout
    weight: np.ndarray
    bias: np.ndarray  # per output channel, before BN
    scale: np.ndarray  # s = gamma / sqrt(var + eps)
    shift: np.ndarray  # beta - s * mean


def _bn_blocker(bn: ir.Node, opset: int) -> str | None:
    """Why ``bn`` is not a per-channel affine map at inference, or None."""
    if bn.attributes.get_int("training_mode", 0) != 0:
        return "BatchNormalization is in training mode"
    if opset < 7 and bn.attributes.get_int("is_test", 0) != 1:
        return "BatchNormalization has is_test=0 (training form)"
    if opset < 9 and bn.attributes.get_int("spatial", 1) != 1:
        return "BatchNormalization has spatial=0 (per-activation statistics)"
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return "BatchNormalization training outputs are used"
    if len(bn.inputs) < 5:
        return "BatchNormalization has missing inputs"
    return None


def _sole_reader(value: ir.Value, node: ir.Node) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output() and used_only_by(value, [node])


def _match(bn: ir.Node, producer: ir.Node, opset: int) -> _Match | str:
    """Check the pattern ``bn(producer(...))``; a reason string when it must not fold."""
    reason = _bn_blocker(bn, opset)
    if reason:
        return reason
    for role, value in zip(_BN_PARAMS, bn.inputs[1:5], strict=True):
        if not is_constant(value):
            return f"BatchNormalization {role} is not a constant: {why_not_constant(value)}"
    y = bn.inputs[0]
    if not used_only_by(y, [bn]):
        return f"{node_label(producer)} output has other readers or is a graph output"
    w_value = producer.inputs[WEIGHT_INPUT] if len(producer.inputs) > WEIGHT_INPUT else None
    b_value = producer.inputs[_BIAS_INPUT] if len(producer.inputs) > _BIAS_INPUT else None
    for role, value in (("weight", w_value), ("bias", b_value)):
        if value is None:
            continue
        if not is_constant(value):  # checked first: a computed weight often has no dtype
            return (f"{role} of {node_label(producer)} is not a constant: "
                    f"{why_not_constant(value)}")
        if not _sole_reader(value, producer):
            return f"{role} of {node_label(producer)} is shared with another node"
    # Without type annotations the weight's dtype is the activation's (same type variable T).
    dtype = y.type.dtype if y.type is not None else None
    if dtype is None and w_value is not None and w_value.type is not None:
        dtype = w_value.type.dtype
    if dtype not in _FLOAT_TYPES:
        return f"dtype {dtype} is not float16/float32/float64"
    if w_value is None:
        return f"{node_label(producer)} has no weight"
    weight = const_array(w_value)
    layout = weight_layout(producer, weight.ndim)
    if layout is None:
        return f"{node_label(producer)} weight has rank {weight.ndim}"
    channels = layout.out_channels(weight.shape)
    gamma, beta, mean, var = (
        const_array(v).astype(np.float64) for v in bn.inputs[1:5])
    if any(p.shape != (channels,) for p in (gamma, beta, mean, var)):
        return (f"BatchNormalization parameters are not [{channels}] "
                f"(channels of {node_label(producer)})")
    bias = _channel_bias(
        producer, None if b_value is None else const_array(b_value).astype(np.float64), channels)
    if isinstance(bias, str):
        return bias
    scale, shift = bn_affine(gamma, beta, mean, var, bn.attributes.get_float("epsilon", 1e-5))
    return _Match(bn, producer, layout, weight, np.asarray(bias, np.float64), scale, shift)


def _channel_bias(producer: ir.Node, bias: np.ndarray | None,
                  channels: int) -> np.ndarray | str:
    """The producer's bias per output channel as ``[channels]``, or why it is not one."""
    if producer.op_type == "Gemm":
        return gemm_bias(producer, bias, channels)
    if bias is None:
        return np.zeros(channels)
    if bias.shape != (channels,):
        return f"bias shape {bias.shape} is not [{channels}]"
    return bias


def _apply(graph: ir.Graph, m: _Match, names: FreshNames) -> None:
    """Write the folded weight and bias as initializers of ``graph`` and drop the BN node.

    ``graph`` is the graph (main or body) holding both nodes; ``names`` holds every value
    name of the model and receives the new ones.
    """
    producer, bn = m.producer, m.bn
    old_inputs = [v for v in (*producer.inputs[1:], *bn.inputs[1:]) if v is not None]
    w_old = producer.inputs[WEIGHT_INPUT]
    dtype = m.weight.dtype
    # One new array in the weight's precision (float32 at least), scaled in place: a float64
    # round trip would need three times the weight's memory on a big model for no useful
    # accuracy.
    calc = np.result_type(dtype, np.float32)
    new_weight = _writable_copy(w_old, calc)
    m.layout.scale_outputs(new_weight, m.scale.astype(calc), in_place=True)
    new_bias = m.scale * m.bias + m.shift
    base = producer.name or w_old.name or "fused"
    producer.replace_input_with(WEIGHT_INPUT, add_initializer(
        graph, f"{base}.bn_weight", new_weight.astype(dtype, copy=False), names=names))
    if len(producer.inputs) <= _BIAS_INPUT:
        producer.resize_inputs(_BIAS_INPUT + 1)
    producer.replace_input_with(_BIAS_INPUT, add_initializer(
        graph, f"{base}.bn_bias", new_bias.astype(dtype), names=names))
    if producer.op_type == "Gemm":  # the folded bias is all of beta * C
        producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)

    y, z = bn.inputs[0], bn.outputs[0]
    for i in range(len(bn.inputs)):
        bn.replace_input_with(i, None)
    if z.is_graph_output():
        replaced = replace_value(graph, z, y)
        assert replaced, "checked by _match: y is a node output read only by bn"
    else:
        z.replace_all_uses_with(y)
    graph.remove(bn)
    _drop_if_unused(old_inputs)


def _writable_copy(value: ir.Value, dtype: np.dtype) -> np.ndarray:
    """A new array holding ``value``'s constant in ``dtype``.

    A weight in an external data file is read from the file straight into the new array:
    going through its memory map would leave the old pages resident beside the new copy.
    """
    tensor = value.const_value
    if (isinstance(tensor, ir.ExternalTensor) and tensor.dtype.numpy() == dtype
            and Path(tensor.path).resolve().is_relative_to(Path(tensor.base_dir).resolve())):
        with open(tensor.path, "rb") as fh:
            fh.seek(tensor.offset or 0)
            array = np.fromfile(fh, dtype=dtype.newbyteorder("<"), count=tensor.size)
        if array.size == tensor.size:
            return array.astype(dtype, copy=False).reshape(tensor.shape.numpy())
    return np.array(const_array(value), dtype=dtype)


def _drop_if_unused(values: list[ir.Value]) -> None:
    """Remove the initializers or Constant nodes behind ``values`` that nobody reads now.

    Each is removed from the graph that owns it, which may be an outer scope.
    """
    for value in values:
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer():
            owner = value.graph
            if owner is not None and owner.initializers.get(value.name) is value:
                del owner.initializers[value.name]
            continue
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and producer.graph is not None:
            producer.graph.remove(producer)
