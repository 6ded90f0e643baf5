"""Models with exactly-zero or constant channels, dead layers, and groups that must stay frozen.

``zero_channels`` zeroes a fraction of the output channels of every Conv that feeds a
BatchNormalization (filter, bias, BN gamma and beta), which makes those channels exactly zero
at the BN output whatever the input. The builders add the structures that
:mod:`testmodels.structures` lacks: a channel shuffle, a custom-domain op, a dynamic channel
count, an intermediate graph output, channels that are nonzero constants, zero-scaled residual
branches, an unreachable subgraph and no-op ops.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from testmodels.graph_builder import NUM_CLASSES, GraphBuilder

CUSTOM_DOMAIN = "custom.ops"


def _bn_fed_convs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in model.graph.node:
        after = readers.get(node.output[0], [])
        if node.op_type == "Conv" and len(after) == 1 and after[0].op_type == "BatchNormalization":
            pairs.append((node, after[0]))
    return pairs


def zeroed_filters(model: onnx.ModelProto, fraction: float = 0.3, seed: int = 0,
                   aligned: bool = False) -> dict[str, np.ndarray]:
    """The output channels :func:`zero_channels` zeroes, per Conv node name.

    Args:
        model: The model.
        fraction: Share of each conv's output channels (rounded, at least 1, never all).
        seed: Seed of the choice.
        aligned: Choose the same channels in every conv of the same width, so that residual
            groups (whose producers all have that width) get whole zero channels.
    """
    weights = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    chosen = {}
    for conv, _ in _bn_fed_convs(model):
        cout = weights[conv.input[1]].dims[0]
        k = min(max(1, round(fraction * cout)), cout - 1)
        order = np.random.default_rng((seed, cout)).permutation(cout) if aligned else (
            rng.permutation(cout))
        chosen[conv.name] = np.sort(order[:k])
    return chosen


def zero_channels(model: onnx.ModelProto, fraction: float = 0.3, seed: int = 0,
                  aligned: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` where the channels of :func:`zeroed_filters` are exactly zero.

    The conv filter and bias and the BN gamma and beta of each chosen channel are set to 0.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    chosen = zeroed_filters(out, fraction, seed, aligned)
    tensors = {t.name: t for t in out.graph.initializer}

    def zero(name: str, index: np.ndarray) -> None:
        array = numpy_helper.to_array(tensors[name]).copy()
        array[index] = 0
        tensors[name].CopyFrom(numpy_helper.from_array(array, name))

    for conv, bn in _bn_fed_convs(out):
        index = chosen[conv.name]
        for name in [*conv.input[1:3], bn.input[1], bn.input[2]]:
            if name:
                zero(name, index)
    return out


# -- structures the passes must refuse ---------------------------------------------------------


def channel_shuffle(*, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N",
                    groups: int = 2) -> onnx.ModelProto:
    """ShuffleNet-style: conv, Reshape [N,g,C/g,H,W] -> Transpose -> Reshape [N,C,H,W], conv."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    x = g.conv_bn_relu(x, width, 3)
    c, h, w = g.shapes[x]
    split = g.const("shuffle.split", np.array([0, groups, c // groups, h, w], np.int64))
    x = g.op("Reshape", [x, split], (groups, c // groups, h, w))
    x = g.op("Transpose", [x], (c // groups, groups, h, w), perm=[0, 2, 1, 3, 4])
    merge = g.const("shuffle.merge", np.array([0, c, h, w], np.int64))
    x = g.op("Reshape", [x, merge], (c, h, w))
    x = g.conv_bn_relu(x, width, 3)
    return g.build(g.classifier(x), "channel_shuffle")


def custom_domain_op(*, seed: int = 0, width: int = 8, size: int = 16,
                     batch: int | str = "N") -> onnx.ModelProto:
    """A conv whose output goes through a model-local function in a custom domain."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    x = g.conv_bn_relu(x, width, 3)
    x = g.op("ScaledRelu", [x], g.shapes[x], domain=CUSTOM_DOMAIN)
    x = g.conv_bn_relu(x, width, 3)
    model = g.build(g.classifier(x), "custom_domain_op")
    two = helper.make_node("Constant", [], ["two"],
                           value=numpy_helper.from_array(np.array(2.0, np.float32)))
    body = [helper.make_node("Relu", ["X"], ["r"]), two,
            helper.make_node("Mul", ["r", "two"], ["Y"])]
    function = helper.make_function(CUSTOM_DOMAIN, "ScaledRelu", ["X"], ["Y"], body,
                                    [helper.make_opsetid("", 17)])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid(CUSTOM_DOMAIN, 1))
    return model


def dynamic_channels(*, seed: int = 0, width: int = 8, size: int = 16,
                     batch: int | str = "N") -> onnx.ModelProto:
    """Features reshaped to a shape computed at run time (from Shape) before a Gemm head."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    x = g.conv_bn_relu(x, width, 3, stride=2)
    features = int(np.prod(g.shapes[x]))
    shape = g.op("Shape", [x], (4,))
    first = g.op("Slice", [shape, g.const("dyn.zero", np.array([0], np.int64)),
                           g.const("dyn.one", np.array([1], np.int64))], (1,))
    target = g.op("Concat", [first, g.const("dyn.rest", np.array([-1], np.int64))], (2,),
                  axis=0)
    x = g.op("Reshape", [x, target], (features,))
    return g.build(g.gemm(x, NUM_CLASSES, output="logits"), "dynamic_channels")


def graph_output_features(*, seed: int = 0, width: int = 8, size: int = 16,
                          batch: int | str = "N") -> onnx.ModelProto:
    """A conv chain whose middle features are also a graph output ("features")."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    feats = g.conv_bn_relu(x, width, 3)
    y = g.conv_bn_relu(feats, width, 3)
    model = g.build(g.classifier(y), "graph_output_features")
    model.graph.output.append(helper.make_tensor_value_info(
        feats, TensorProto.FLOAT, [batch, *g.shapes[feats]]))
    return model


def constant_channels(*, seed: int = 0, width: int = 8, size: int = 16,
                      batch: int | str = "N") -> tuple[onnx.ModelProto, dict[str, int]]:
    """Convs with zero filters but positive bias: channels that are nonzero constants.

    Returns the model and the number of constant channels per conv whose consumer can fold
    them exactly ("conv_fold" into an unpadded 1x1 conv, "gemm_fold" into the Gemm head) or
    cannot ("conv_keep", read by a padded 3x3 conv).
    """
    g = GraphBuilder(seed, size, batch)
    counts = {"conv_fold": 2, "conv_keep": 2, "gemm_fold": 2}

    def const_conv(x: str, count: int) -> str:
        weight = g.rng.normal(0.0, 0.3, (width, g.channels(x), 3, 3))
        weight[:count] = 0.0
        bias = 0.5 + np.abs(g.rng.normal(0.0, 0.3, width))
        return g.relu(g.conv(x, width, 3, weight=weight, bias=bias))

    fold = g.conv_bn_relu(const_conv(g.input, counts["conv_fold"]), width, 1, pads=[0, 0, 0, 0])
    keep = g.conv_bn_relu(const_conv(g.input, counts["conv_keep"]), width, 3)
    head = const_conv(g.concat([fold, keep]), counts["gemm_fold"])
    return g.build(g.classifier(head), "constant_channels"), counts


def index_mappings(*, seed: int = 0, width: int = 8, size: int = 16,
                   batch: int | str = "N") -> onnx.ModelProto:
    """Split, channel Slice, Concat, an NHWC MatMul between Transposes, and a Reshape head.

    ``conv(2w) -> Split[w, w] -> (conv | Slice[2:w] -> conv) -> Concat -> Transpose(NHWC) ->
    MatMul(W[2w, w]) + bias -> Relu -> Transpose(NCHW) -> conv -> GAP -> Reshape[0, w] -> Gemm``.
    """
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, 2 * width, 3)
    _, h, w = g.shapes[x]
    a, b = "split.a", "split.b"
    sizes = g.const("split.sizes", np.array([width, width], np.int64))
    g.nodes.append(helper.make_node("Split", [x, sizes], [a, b], name="split0", axis=1))
    g.shapes[a] = g.shapes[b] = (width, h, w)
    a = g.conv_bn_relu(a, width, 3)
    b = g.op("Slice", [b, g.const("slice.starts", np.array([2], np.int64)),
                       g.const("slice.ends", np.array([width], np.int64)),
                       g.const("slice.axes", np.array([1], np.int64))], (width - 2, h, w))
    b = g.conv_bn_relu(b, width, 3)
    y = g.concat([a, b])
    t = g.op("Transpose", [y], (h, w, 2 * width), perm=[0, 2, 3, 1])
    weight = g.rng.normal(0.0, np.sqrt(2.0 / (2 * width)), (2 * width, width))
    t = g.op("MatMul", [t, g.const("matmul.weight", weight.astype(np.float32))], (h, w, width))
    bias = g.rng.normal(0.0, 0.1, width).astype(np.float32)
    t = g.relu(g.op("Add", [t, g.const("matmul.bias", bias)], (h, w, width)))
    y = g.op("Transpose", [t], (width, h, w), perm=[0, 3, 1, 2])
    y = g.global_avg_pool(g.conv_bn_relu(y, width, 3))
    y = g.op("Reshape", [y, g.const("head.shape", np.array([0, width], np.int64))], (width,))
    return g.build(g.gemm(y, NUM_CLASSES, output="logits"), "index_mappings")


def assorted_ops(*, seed: int = 0, width: int = 8, size: int = 16,
                 batch: int | str = "N") -> onnx.ModelProto:
    """Pad, LeakyRelu, ConvTranspose, Resize, Unsqueeze/Squeeze, Sum, ReduceMean, MatMul head.

    The BN after the ConvTranspose has zero gamma and beta in channels 1 and 2.
    """
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    c, h, w = g.shapes[x]
    pads = g.const("pad.pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    x = g.op("LeakyRelu", [g.op("Pad", [x, pads], (c, h + 2, w + 2))], (c, h + 2, w + 2))
    weight = g.rng.normal(0.0, np.sqrt(2.0 / (9 * width)), (width, width, 3, 3))
    x = g.op("ConvTranspose", [x, g.const("convt.weight", weight.astype(np.float32))],
             (width, h + 2, w + 2), name="convt0", pads=[1, 1, 1, 1])
    gamma, beta = g.rng.uniform(0.5, 1.5, width), g.rng.normal(0.0, 0.2, width)
    gamma[1:3] = beta[1:3] = 0.0
    x = g.bn(x, params=(gamma, beta, g.rng.normal(0.0, 0.2, width), np.ones(width)))
    scales = g.const("resize.scales", np.array([1.0, 1.0, 0.5, 0.5], np.float32))
    half = (width, (h + 2) // 2, (w + 2) // 2)
    x = g.op("Resize", [x, "", scales], half, mode="nearest")
    x = g.op("Unsqueeze", [x, g.const("axes.two", np.array([2], np.int64))], (width, 1, *half[1:]))
    x = g.op("Squeeze", [x, "axes.two"], half)
    x = g.op("Sum", [x, x], half)
    x = g.op("ReduceMean", [x], (width,), axes=[2, 3], keepdims=0)
    head = g.rng.normal(0.0, np.sqrt(1.0 / width), (width, NUM_CLASSES)).astype(np.float32)
    x = g.op("MatMul", [x, g.const("head.weight", head)], (NUM_CLASSES,))
    bias = g.const("head.bias", g.rng.normal(0.0, 0.1, NUM_CLASSES).astype(np.float32))
    return g.build(g.op("Add", [x, bias], (NUM_CLASSES,), output="logits"), "assorted_ops")


# -- dead layers -------------------------------------------------------------------------------


def zero_scaled_residual(*, seed: int = 0, width: int = 8, size: int = 16,
                         batch: int | str = "N") -> onnx.ModelProto:
    """Two residual blocks whose branch contributes exactly zero.

    Block 1 scales its branch by a constant 0 (``x + 0 * f(x)``); block 2's branch ends in a
    BN whose gamma and beta are all zero (every output channel zero).
    """
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    y = g.conv_bn(g.conv_bn_relu(x, width, 3), width, 3)
    y = g.op("Mul", [y, g.const("branch.scale", np.array(0.0, np.float32))], g.shapes[y])
    x = g.relu(g.add(x, y))
    zeros = np.zeros(width)
    ones = np.ones(width)
    y = g.bn(g.conv(g.conv_bn_relu(x, width, 3), width, 3), params=(zeros, zeros, zeros, ones))
    x = g.relu(g.add(x, y))
    return g.build(g.classifier(x), "zero_scaled_residual")


def unreachable_subgraph(*, seed: int = 0, width: int = 8, size: int = 16,
                         batch: int | str = "N") -> onnx.ModelProto:
    """A conv chain plus two branches whose results never reach the output."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    g.global_avg_pool(g.conv_bn_relu(g.conv_bn_relu(g.input, width, 3), width, 3))
    g.relu(g.conv(x, width, 1, pads=[0, 0, 0, 0]))
    x = g.conv_bn_relu(x, width, 3)
    return g.build(g.classifier(x), "unreachable_subgraph")


def noop_ops(*, seed: int = 0, width: int = 8, size: int = 16,
             batch: int | str = "N") -> onnx.ModelProto:
    """Mul by ones, Add of zeros, Pad by zero, a full Slice and a same-shape Reshape."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    shape = g.shapes[x]
    x = g.op("Mul", [x, g.const("noop.ones", np.ones((1, width, 1, 1), np.float32))], shape)
    x = g.op("Add", [x, g.const("noop.zero", np.array(0.0, np.float32))], shape)
    x = g.op("Pad", [x, g.const("noop.pads", np.zeros(8, np.int64))], shape)
    x = g.op("Slice", [x, g.const("noop.starts", np.array([0], np.int64)),
                       g.const("noop.ends", np.array([2**62], np.int64)),
                       g.const("noop.axes", np.array([1], np.int64))], shape)
    x = g.op("Reshape", [x, g.const("noop.shape", np.array([0, *shape], np.int64))], shape)
    x = g.conv_bn_relu(x, width, 3)
    return g.build(g.classifier(x), "noop_ops")


REFUSED: dict[str, Callable[..., onnx.ModelProto]] = {
    "channel_shuffle": channel_shuffle,
    "custom_domain_op": custom_domain_op,
    "dynamic_channels": dynamic_channels,
    "graph_output_features": graph_output_features,
}
"""Structures with groups that prune-zero must leave alone, by name."""
