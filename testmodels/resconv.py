"""Deterministic ResConv and RepVGG-style models for the ``fuse-resconv`` pass.

All models take "input" float32 ``[N, 3, size, size]`` (``N`` symbolic), use opset 17 and
are built as a framework exports them: a ResConv block is ``Conv [-> BN] -> Mul(a) -> Add(x, .)``
(``y = x + a * f(x)``), or ``Add(x, Conv(x))`` once the scale is folded in; a RepVGG block sums
``BN(Conv3x3(x))``, ``BN(Conv1x1(x))`` and ``BN(x)`` (ACNet adds ``1x3``/``3x1`` branches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx

from testmodels.structures import GraphBuilder

Kernel2d = tuple[int, int]


def _conv(
    g: GraphBuilder,
    x: str,
    cout: int,
    kernel: Kernel2d = (3, 3),
    *,
    stride: int = 1,
    groups: int = 1,
    dilation: int = 1,
    pads: Sequence[int] | None = None,
    weight: str | None = None,
    bias: bool = False,
) -> str:
    """Conv with a rectangular kernel, "same" padding by default, optionally a given weight name."""
    cin, h, w = g.shapes[x]
    kh, kw = kernel
    if pads is None:
        pads = [dilation * (kh - 1) // 2, dilation * (kw - 1) // 2] * 2
    name = f"conv_rc{len(g.nodes)}"
    if weight is None:
        fan_in = cin // groups * kh * kw
        weight = g.const(f"{name}.weight", g.rng.normal(
            0.0, np.sqrt(2.0 / fan_in), (cout, cin // groups, kh, kw)).astype(np.float32))
    inputs = [x, weight]
    if bias:
        inputs.append(g.const(f"{name}.bias", g.rng.normal(0.0, 0.1, cout).astype(np.float32)))
    oh = (h + pads[0] + pads[2] - dilation * (kh - 1) - 1) // stride + 1
    ow = (w + pads[1] + pads[3] - dilation * (kw - 1) - 1) // stride + 1
    return g.op("Conv", inputs, (cout, oh, ow), name=name, kernel_shape=[kh, kw],
                strides=[stride, stride], pads=list(pads), dilations=[dilation, dilation],
                group=groups)


def _scale(g: GraphBuilder, y: str, a: float | np.ndarray, const_first: bool = False) -> str:
    """``Mul(y, a)`` with a constant ``a`` of whatever shape it is given."""
    name = f"scale{len(g.nodes)}"
    a_name = g.const(name, np.asarray(a, np.float32))
    return g.op("Mul", [a_name, y] if const_first else [y, a_name], g.shapes[y], name=f"mul_{name}")


def _residual(g: GraphBuilder, x: str, branch: str, x_first: bool = True) -> str:
    """``Add(x, branch)`` (or ``Add(branch, x)``); shapes broadcast like ONNX."""
    shape = tuple(np.broadcast_shapes(g.shapes[x], g.shapes[branch]))
    return g.op("Add", [x, branch] if x_first else [branch, x], shape)


def resconv_block(
    g: GraphBuilder,
    x: str,
    a: float | np.ndarray,
    *,
    cout: int | None = None,
    kernel: Kernel2d = (3, 3),
    bn: bool = True,
    x_first: bool = True,
    const_first: bool = False,
    relu: bool = False,
    **conv_args: object,
) -> str:
    """Exported ResConv block ``x + a * [BN](Conv(x))``, optionally followed by a Relu.

    Args:
        g: The graph builder.
        x: Block input.
        a: The scale: a float, or an array of any shape (``[1, C, 1, 1]`` is per-channel).
        cout: Conv output channels (default: the input's, as a fusible block needs).
        kernel: Conv kernel size.
        bn: Whether a BatchNormalization follows the conv.
        x_first: Operand order of the Add.
        const_first: Operand order of the Mul.
        relu: Whether a Relu follows the Add.
        **conv_args: Passed to the conv (stride, groups, dilation, pads, weight).
    """
    y = _conv(g, x, cout or g.channels(x), kernel, **conv_args)
    if bn:
        y = g.bn(y)
    y = _residual(g, x, _scale(g, y, a, const_first), x_first)
    return g.relu(y) if relu else y


def folded_block(g: GraphBuilder, x: str, relu: bool = True) -> str:
    """ResConv block with the scale folded into the conv: ``x + Conv(x)`` (with bias)."""
    y = _residual(g, x, _conv(g, x, g.channels(x), bias=True))
    return g.relu(y) if relu else y


def repvgg_block(
    g: GraphBuilder,
    x: str,
    cout: int | None = None,
    *,
    stride: int = 1,
    groups: int = 1,
    asymmetric: bool = False,
    order: str = "left",
) -> str:
    """RepVGG block: ``Relu(BN(Conv3x3) + BN(Conv1x1) [+ BN(1x3) + BN(3x1)] [+ BN(x)])``.

    The identity branch is present when the shape is kept (stride 1, same channels).
    ``order`` "left" nests the sum as ``((b0 + b1) + b2) + ...``, "right" as
    ``b_last + (... + (b1 + b0))``.
    """
    cout = cout or g.channels(x)
    branches = [
        g.bn(_conv(g, x, cout, (3, 3), stride=stride, groups=groups)),
        g.bn(_conv(g, x, cout, (1, 1), stride=stride, groups=groups)),
    ]
    if asymmetric:
        branches += [g.bn(_conv(g, x, cout, (1, 3), stride=stride, groups=groups)),
                     g.bn(_conv(g, x, cout, (3, 1), stride=stride, groups=groups))]
    if stride == 1 and cout == g.channels(x):
        branches.append(g.bn(x))
    total = branches[0]
    for branch in branches[1:]:
        total = g.add(total, branch) if order == "left" else g.add(branch, total)
    return g.relu(total)


def resconv_net(
    *, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N",
    small_a: float = 0.0,
) -> onnx.ModelProto:
    """Stem, then 8 ResConv blocks in exported form, then a GAP+Gemm head.

    Blocks: scalar a; ``a = small_a`` (exactly 0 by default); per-channel a ``[1, C, 1, 1]``
    with one zero channel, Add(branch, x), Relu; folded ``x + Conv(x)``, Relu; ``a = small_a``
    without BN, Add(branch, x); depthwise, Relu; dilated; per-channel ``[C, 1, 1]`` as
    Mul(a, y), Relu. Counts: Conv 9, BatchNormalization 7, Mul 7, Add 8.
    """
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    per_channel = g.rng.uniform(0.2, 1.0, width)
    per_channel[1] = 0.0
    x = resconv_block(g, x, 0.7)
    x = resconv_block(g, x, small_a)
    x = resconv_block(g, x, per_channel.reshape(1, width, 1, 1), x_first=False, relu=True)
    x = folded_block(g, x)
    x = resconv_block(g, x, small_a, bn=False, x_first=False)
    x = resconv_block(g, x, 0.5, groups=width, relu=True)
    x = resconv_block(g, x, 0.6, dilation=2)
    x = resconv_block(g, x, g.rng.uniform(0.2, 1.0, (width, 1, 1)), const_first=True, relu=True)
    return g.build(g.classifier(x), "resconv_net")


def repvgg_net(
    *, seed: int = 0, width: int = 8, size: int = 16, batch: int | str = "N"
) -> onnx.ModelProto:
    """Stem, then RepVGG-style blocks: 3-branch, ACNet (5 branches, right-nested sum),
    stride-2 widening (no identity), 3-branch right-nested, depthwise 3-branch.

    Counts: Conv 13, BatchNormalization 17, Add 11, Relu 6.
    """
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    x = repvgg_block(g, x)
    x = repvgg_block(g, x, asymmetric=True, order="right")
    x = repvgg_block(g, x, 2 * width, stride=2)
    x = repvgg_block(g, x, order="right")
    x = repvgg_block(g, x, groups=2 * width)
    return g.build(g.classifier(x), "repvgg_net")


def branch_sum_block(
    kernels: Sequence[Kernel2d],
    *,
    identity: bool = True,
    groups: int = 1,
    dilation: int = 1,
    width: int = 4,
    size: int = 7,
    seed: int = 0,
) -> onnx.ModelProto:
    """One sum of ``BN(Conv_k(input))`` branches (plus ``BN(input)``) as the graph output.

    Every kernel size must be odd; paddings are "same" with the given dilation.
    """
    g = GraphBuilder(seed, size, in_channels=width)
    branches = [g.bn(_conv(g, g.input, width, k, groups=groups, dilation=dilation))
                for k in kernels]
    if identity:
        branches.append(g.bn(g.input))
    total = branches[0]
    for branch in branches[1:]:
        total = g.add(total, branch)
    return g.build(total, "branch_sum_block")


def resconv_output_block(*, a: float = 0.5, seed: int = 0, width: int = 8,
                         size: int = 8) -> onnx.ModelProto:
    """Stem, then one ResConv block whose Add is the graph output."""
    g = GraphBuilder(seed, size)
    x = g.conv_bn_relu(g.input, width, 3)
    return g.build(resconv_block(g, x, a), "resconv_output_block")


def _refusal_model(name: str, block: Callable[[GraphBuilder, str], str], *, width: int = 8,
                   size: int = 8, seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder(seed, size)
    x = g.conv_bn_relu(g.input, width, 3)
    return g.build(g.classifier(block(g, x)), name)


def _stride2_block(g: GraphBuilder, x: str) -> str:
    # On a 1x1 map a stride-2 3x3 conv keeps the shape, so the model is valid.
    return resconv_block(g, g.global_avg_pool(x), 0.5, stride=2)


def _shared_weight_block(g: GraphBuilder, x: str) -> str:
    y = resconv_block(g, x, 0.5, relu=True)
    shared = next(n for n in reversed(g.nodes) if n.op_type == "Conv").input[1]
    return g.relu(g.bn(_conv(g, y, g.channels(y), weight=shared)))


def _outside_consumer_block(g: GraphBuilder, x: str) -> str:
    y = g.bn(_conv(g, x, g.channels(x)))
    z = _residual(g, x, _scale(g, y, 0.5))
    return g.add(g.relu(z), g.relu(y))


REFUSAL_CASES: dict[str, Callable[[GraphBuilder, str], str]] = {
    "stride2": _stride2_block,
    "channel_change": lambda g, x: resconv_block(g, x, 0.5, cout=1),
    "shared_weight": _shared_weight_block,
    "asymmetric_pads": lambda g, x: resconv_block(g, x, 0.5, pads=[0, 0, 2, 2]),
    "even_kernel": lambda g, x: resconv_block(g, x, 0.5, kernel=(2, 2), pads=[0, 0, 1, 1]),
    "vector_scale": lambda g, x: resconv_block(g, x, np.linspace(0.2, 1.0, g.shapes[x][2])),
    "outside_consumer": _outside_consumer_block,
}
"""Blocks ``fuse-resconv`` must leave alone: name -> ``block(builder, x) -> y``."""


def refusal_model(case: str, *, seed: int = 0) -> onnx.ModelProto:
    """Stem, the refusal block ``case`` of :data:`REFUSAL_CASES`, and a GAP+Gemm head."""
    return _refusal_model(f"refuse_{case}", REFUSAL_CASES[case], seed=seed)


def resconv_bench_model(
    width: int = 64, size: int = 56, depth: int = 16, *, seed: int = 0, batch: int | str = "N",
    repvgg: bool = False,
) -> onnx.ModelProto:
    """A bigger unfused net for benchmarks: stem, ``depth`` blocks, GAP+Gemm head.

    Blocks are ResConv ``Relu(x + a * BN(Conv3x3(x)))`` with ``a`` in [0.2, 1), or with
    ``repvgg=True`` three-branch RepVGG blocks. ``fuse-resconv`` turns each into one Conv.
    """
    g = GraphBuilder(seed, size, batch)
    x = g.conv_bn_relu(g.input, width, 3)
    for _ in range(depth):
        if repvgg:
            x = repvgg_block(g, x)
        else:
            x = resconv_block(g, x, float(g.rng.uniform(0.2, 1.0)), relu=True)
    return g.build(g.classifier(x), "resconv_bench")
