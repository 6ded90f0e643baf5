"""A MobileNetV2-style digits classifier: random depthwise-separable backbone, fitted linear head.

Backbone: stem Conv3x3 stride 2, then inverted-residual blocks (1x1 expand -> 3x3 depthwise ->
1x1 linear projection, residual Add when shapes match), a 1x1 conv to ``4 * width`` channels on
the final 4x4 map, and Flatten. Every conv is followed by BatchNormalization whose mean and
variance are the statistics of its input on the given images (as after training) and whose
scale is log-uniform over ``exp(+-spread)``. A channel with a small scale feeds the next layer
small values, and that layer's BatchNormalization scales its weights up to compensate, so after
folding the per-channel weight ranges of the depthwise convs differ by up to ~50x: the property
of trained MobileNetV2 that breaks per-tensor int8 weights (Nagel et al. 2019). Activations are
Relu, not Relu6: cross-layer equalization needs a positively homogeneous activation (the paper
makes the same substitution).

Head: a Gemm fitted by ridge least squares, on the backbone features of the bundled digits
calibration set, to one-hot labels. No training framework is needed, and the accuracy on the
bundled evaluation set is a real accuracy (the head never sees evaluation data).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from testmodels.graph_builder import NUM_CLASSES, GraphBuilder

FEATURES = "features"
"""Name of the backbone output tensor (input of the head)."""

_BLOCKS = ((1, 1, 1, 1), (4, 3 / 2, 2, 2), (4, 2, 1, 2))
"""(expansion, width multiplier, repeats, first stride) per stage."""


def _conv_bn(g: GraphBuilder, x: str, cout: int, k: int, stride: int, groups: int,
             spread: float, relu: bool) -> str:
    """Conv + BN with log-uniform scales; mean/var are placeholders set from data later."""
    scale = 0.5 * np.exp(g.rng.uniform(-spread, spread, cout))
    shift = g.rng.normal(0.3, 0.2, cout) * scale if relu else np.zeros(cout)
    y = g.bn(g.conv(x, cout, k, stride, groups), (scale, shift, np.zeros(cout), np.ones(cout)))
    return g.relu(y) if relu else y


def _backbone(g: GraphBuilder, width: int, spread: float) -> str:
    x = _conv_bn(g, g.input, width, 3, 2, 1, spread, relu=True)
    for expand, mult, repeats, stride in _BLOCKS:
        cout = int(width * mult)
        for r in range(repeats):
            s = stride if r == 0 else 1
            hidden = g.channels(x) * expand
            y = _conv_bn(g, x, hidden, 1, 1, 1, spread, relu=True) if expand != 1 else x
            y = _conv_bn(g, y, hidden, 3, s, hidden, spread, relu=True)
            y = _conv_bn(g, y, cout, 1, 1, 1, spread, relu=False)
            x = g.add(y, x) if g.shapes[y] == g.shapes[x] else y
    x = _conv_bn(g, x, 4 * width, 1, 1, 1, spread, relu=True)
    return g.op("Flatten", [x], (int(np.prod(g.shapes[x])),), output=FEATURES, axis=1)


def _set_bn_statistics(model: onnx.ModelProto, images: np.ndarray) -> None:
    """Set each BatchNormalization's mean/var to its input's statistics on ``images``, in order."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT,
                                                                None))
        y = _run(probe, images).astype(np.float64)
        mean, var = y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))
        for name, value in ((node.input[3], mean), (node.input[4], var)):
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``images`` moved by ``(dy, dx)`` pixels with zero fill."""
    out = np.zeros_like(images)
    h, w = images.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _run(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": images[i:i + 64]})[0]
                           for i in range(0, len(images), 64)])


def mobilenet_digits(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    width: int = 16,
    spread: float = 2.0,
    ridge: float = 1e-2,
    shifts: int = 1,
    batch: int | str = "N",
) -> onnx.ModelProto:
    """Build the backbone and fit the head on ``(images, labels)``.

    Args:
        images: Float32 ``[n, 1, 32, 32]`` digits (e.g. the bundled calibration set).
        labels: Int labels ``[n]``.
        seed: Seed of the backbone weights.
        width: Base channel count.
        spread: BN scales are ``0.5 * exp(U(-spread, spread))``.
        ridge: Ridge penalty relative to the mean feature energy.
        shifts: The head is fitted on every copy of ``images`` shifted by up to ``shifts``
            pixels in each direction (zero fill), ``(2 * shifts + 1) ** 2`` copies.
        batch: Batch dimension (int or symbolic).

    Returns:
        The classifier ``"input" [N, 1, 32, 32] -> "logits" [N, 10]`` (BatchNormalization kept).
    """
    g = GraphBuilder(seed, images.shape[-1], batch, in_channels=images.shape[1])
    features = _backbone(g, width, spread)
    backbone = g.build(features, "mobilenet_backbone")
    _set_bn_statistics(backbone, images.astype(np.float32))
    fitted = {t.name: t for t in backbone.graph.initializer}
    g.initializers = [fitted[t.name] for t in g.initializers]
    shifted = [_shift(images, dy, dx) for dy in range(-shifts, shifts + 1)
               for dx in range(-shifts, shifts + 1)]
    x = _run(backbone, np.concatenate(shifted).astype(np.float32)).astype(np.float64)
    design = np.hstack([x, np.ones((len(x), 1))])
    target = np.tile(np.eye(NUM_CLASSES)[np.asarray(labels).reshape(-1)], (len(shifted), 1))
    penalty = ridge * np.mean(np.sum(design**2, axis=1)) * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0
    solution = np.linalg.solve(design.T @ design + penalty, design.T @ target)
    g.gemm(features, NUM_CLASSES, weight=solution[:-1].T, bias=solution[-1], output="logits")
    model = g.build("logits", "mobilenet_digits")
    return model
