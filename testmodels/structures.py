"""Deterministic random-weight ONNX models, one per network structure the passes must handle."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from testmodels.graph_builder import NUM_CLASSES, GraphBuilder

# -- blocks -----------------------------------------------------------------------------------


def _basic_block(g: GraphBuilder, x: str, cout: int, stride: int = 1) -> str:
    """ResNet basic block; a 1x1 conv+BN shortcut when the shape changes."""
    y = g.conv_bn(g.conv_bn_relu(x, cout, 3, stride), cout, 3)
    if stride != 1 or g.channels(x) != cout:
        x = g.conv_bn(x, cout, 1, stride)
    return g.relu(g.add(y, x))


def _bottleneck(g: GraphBuilder, x: str, mid: int, stride: int = 1, expansion: int = 4) -> str:
    """ResNet bottleneck 1x1 -> 3x3 (strided) -> 1x1 expand; projection shortcut if needed."""
    cout = mid * expansion
    y = g.conv_bn_relu(x, mid, 1)
    y = g.conv_bn_relu(y, mid, 3, stride)
    y = g.conv_bn(y, cout, 1)
    if stride != 1 or g.channels(x) != cout:
        x = g.conv_bn(x, cout, 1, stride)
    return g.relu(g.add(y, x))


def _inverted_residual(g: GraphBuilder, x: str, cout: int, stride: int, expand: int) -> str:
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear project [+ x]."""
    hidden = g.channels(x) * expand
    y = g.conv_bn_relu(x, hidden, 1, relu6=True) if expand != 1 else x
    y = g.conv_bn_relu(y, hidden, 3, stride, groups=hidden, relu6=True)
    y = g.conv_bn(y, cout, 1)
    return g.add(y, x) if g.shapes[y] == g.shapes[x] else y


def _squeeze_excite(g: GraphBuilder, x: str, reduction: int = 4) -> str:
    """Squeeze-and-excitation: x * sigmoid(conv(relu(conv(gap(x)))))."""
    c = g.channels(x)
    s = g.global_avg_pool(x)
    s = g.relu(g.conv(s, max(1, c // reduction), 1, bias=True))
    s = g.op("Sigmoid", [g.conv(s, c, 1, bias=True)], (c, 1, 1))
    return g.op("Mul", [x, s], g.shapes[x])


# -- structures -------------------------------------------------------------------------------


def conv_chain(
    *, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N"
) -> onnx.ModelProto:
    """Conv-BN-Relu x3 (plain, stride 2 with asymmetric pads, dilated), then a GAP+Gemm head."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    x = g.conv_bn_relu(x, 2 * width, 3, stride=2, pads=[0, 0, 1, 1])
    x = g.conv_bn_relu(x, 2 * width, 3, dilation=2)
    return g.build(g.classifier(x), "conv_chain")


def residual_blocks(
    *, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N"
) -> onnx.ModelProto:
    """Stem, an identity basic block and a stride-2 basic block with a 1x1 conv+BN shortcut."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    x = _basic_block(g, x, width)
    x = _basic_block(g, x, 2 * width, stride=2)
    return g.build(g.classifier(x), "residual_blocks")


def bottleneck_blocks(
    *, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N"
) -> onnx.ModelProto:
    """Stem, then bottlenecks: projection (stride 1), identity, projection (stride 2)."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    x = _bottleneck(g, x, width)
    x = _bottleneck(g, x, width)
    x = _bottleneck(g, x, 2 * width, stride=2)
    return g.build(g.classifier(x), "bottleneck_blocks")


def inverted_residual(
    *, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N"
) -> onnx.ModelProto:
    """MobileNetV2 blocks with Relu6 as Clip: residual (no expand), stride 2, residual."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3, relu6=True)
    x = _inverted_residual(g, x, width, stride=1, expand=1)
    x = _inverted_residual(g, x, 2 * width, stride=2, expand=4)
    x = _inverted_residual(g, x, 2 * width, stride=1, expand=4)
    x = g.conv_bn_relu(x, 4 * width, 1, relu6=True)
    return g.build(g.classifier(x), "inverted_residual")


def concat_branches(
    *, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N"
) -> onnx.ModelProto:
    """An Inception block (four branches of unequal width) and a 3-layer DenseNet block."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    half = max(1, width // 2)
    x = g.concat(
        [
            g.conv_bn_relu(x, width, 1),
            g.conv_bn_relu(x, width, 3),
            g.conv_bn_relu(g.conv_bn_relu(x, half, 1), width, 3),
            g.conv_bn_relu(g.pool(x, "MaxPool", 3, 1, pad=1), half, 1),
        ]
    )
    for _ in range(3):
        x = g.concat([x, g.conv_bn_relu(x, half, 3)])
    x = g.pool(g.conv_bn_relu(x, 2 * width, 1), "AveragePool", 2, 2)
    return g.build(g.classifier(x), "concat_branches")


def se_block(
    *, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N"
) -> onnx.ModelProto:
    """Squeeze-excitation blocks with a residual Add: identity, then stride 2 with projection."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    for cout, stride in ((width, 1), (2 * width, 2)):
        y = _squeeze_excite(g, g.conv_bn_relu(x, cout, 3, stride))
        if stride != 1 or g.channels(x) != cout:
            x = g.conv_bn(x, cout, 1, stride)
        x = g.add(y, x)
    return g.build(g.classifier(x), "se_block")


def flatten_gemm_head(
    *, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N"
) -> onnx.ModelProto:
    """Conv-BN-Relu stack, MaxPool to ~4x4, Flatten (C*H*W) -> Gemm -> Relu -> Gemm."""
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    x = g.conv_bn_relu(x, 2 * width, 3, stride=2)
    k = max(1, g.shapes[x][1] // 4)
    x = g.flatten(g.pool(x, "MaxPool", k, k))
    x = g.relu(g.gemm(x, 4 * width, gain=2.0))
    return g.build(g.gemm(x, NUM_CLASSES, output="logits"), "flatten_gemm_head")


STRUCTURES: dict[str, Callable[..., onnx.ModelProto]] = {
    "conv_chain": conv_chain,
    "residual_blocks": residual_blocks,
    "bottleneck_blocks": bottleneck_blocks,
    "inverted_residual": inverted_residual,
    "concat_branches": concat_branches,
    "se_block": se_block,
    "flatten_gemm_head": flatten_gemm_head,
}
"""Structure name -> builder taking keyword arguments ``seed``, ``width``, ``size``, ``batch``."""
