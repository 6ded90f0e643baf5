"""GraphBuilder: appends Conv/BN/activation/pool/Gemm nodes to an ONNX graph, tracking shapes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
NUM_CLASSES = 10
IN_CHANNELS = 3

Shape = tuple[int, ...]
"""Per-sample shape of a tensor (batch dimension left out): (C, H, W) or (features,)."""


class GraphBuilder:
    """Appends nodes and initializers to one graph and tracks every tensor's per-sample shape.

    Methods take a tensor name, add the nodes (and their initializers) and return the name of
    the new output tensor. Weights are drawn from ``rng`` unless given explicitly, so one
    builder serves both the random test structures and the export of a trained network.

    Args:
        seed: Seed of the random generator for all weights.
        size: Height and width of the input image.
        batch: Batch dimension of input and output: an int or a symbolic name.
        in_channels: Channels of the input image.
        input_name: Name of the graph input.
    """

    def __init__(
        self,
        seed: int = 0,
        size: int = 16,
        batch: int | str = "N",
        in_channels: int = IN_CHANNELS,
        input_name: str = "input",
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.batch = batch
        self.input = input_name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, Shape] = {input_name: (in_channels, size, size)}
        self._counts: dict[str, int] = {}

    # -- plumbing -----------------------------------------------------------------------------

    def _fresh(self, prefix: str) -> str:
        count = self._counts.get(prefix, 0)
        self._counts[prefix] = count + 1
        return f"{prefix}{count}"

    def const(self, name: str, value: np.ndarray) -> str:
        """Adds an initializer (once per name) and returns its name."""
        if name not in self.shapes:
            self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
            self.shapes[name] = tuple(np.shape(value))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        shape: Shape,
        output: str | None = None,
        name: str | None = None,
        **attrs: object,
    ) -> str:
        """Adds one single-output node and returns its output name.

        The node is named ``name`` or, by default, after its op type plus a counter; its output
        tensor is named ``output`` or after the node.
        """
        name = name or self._fresh(op_type.lower())
        out = output or name
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        self.shapes[out] = shape
        return out

    def channels(self, x: str) -> int:
        """Channel count (first per-sample dimension) of tensor ``x``."""
        return self.shapes[x][0]

    # -- layers -------------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        pads: Sequence[int] | None = None,
        weight: np.ndarray | None = None,
        bias: np.ndarray | bool = False,
    ) -> str:
        """Conv with He-initialised weights; ``pads`` defaults to "same" for stride 1.

        Args:
            x: Input tensor (N, C, H, W).
            cout: Output channels.
            k: Square kernel size.
            stride: Stride in both spatial axes.
            groups: Group count (``groups == C == cout`` is depthwise).
            dilation: Dilation in both spatial axes.
            pads: ``[top, left, bottom, right]``; default ``dilation * (k - 1) // 2`` each side.
            weight: Explicit weight (cout, C / groups, k, k) instead of a random one.
            bias: Explicit bias, True for a small random bias, False for none.

        Returns:
            Name of the output tensor.
        """
        cin, h, w = self.shapes[x]
        if pads is None:
            pads = [dilation * (k - 1) // 2] * 4
        if weight is None:
            fan_in = cin // groups * k * k
            weight = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // groups, k, k))
        name = self._fresh("conv")
        inputs = [x, self.const(f"{name}.weight", weight.astype(np.float32))]
        if bias is True:
            bias = self.rng.normal(0.0, 0.1, cout)
        if bias is not False:
            inputs.append(self.const(f"{name}.bias", bias.astype(np.float32)))
        span = dilation * (k - 1) + 1
        oh = (h + pads[0] + pads[2] - span) // stride + 1
        ow = (w + pads[1] + pads[3] - span) // stride + 1
        return self.op(
            "Conv",
            inputs,
            (cout, oh, ow),
            name=name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=list(pads),
            dilations=[dilation, dilation],
            group=groups,
        )

    def bn(
        self,
        x: str,
        params: Sequence[np.ndarray] | None = None,
        epsilon: float = 1e-5,
    ) -> str:
        """BatchNormalization in inference mode.

        Args:
            x: Input tensor (N, C, H, W).
            params: ``(scale, bias, mean, var)``; default non-trivial random statistics
                (positive variance) that keep an He-initialised conv's output near unit scale.
            epsilon: Variance epsilon.

        Returns:
            Name of the output tensor.
        """
        c = self.channels(x)
        if params is None:
            params = (
                self.rng.uniform(0.5, 1.5, c),
                self.rng.normal(0.0, 0.2, c),
                self.rng.normal(0.0, 0.2, c),
                self.rng.uniform(0.5, 1.5, c),
            )
        name = self._fresh("bn")
        inputs = [x] + [
            self.const(f"{name}.{role}", np.asarray(p, np.float32))
            for role, p in zip(("scale", "bias", "mean", "var"), params, strict=True)
        ]
        return self.op("BatchNormalization", inputs, self.shapes[x], name=name, epsilon=epsilon)

    def relu(self, x: str) -> str:
        """Relu."""
        return self.op("Relu", [x], self.shapes[x])

    def relu6(self, x: str) -> str:
        """Relu6 as Clip(x, 0, 6) with shared scalar bounds."""
        lo = self.const("clip.min", np.array(0.0, np.float32))
        hi = self.const("clip.max", np.array(6.0, np.float32))
        return self.op("Clip", [x, lo, hi], self.shapes[x])

    def conv_bn(
        self, x: str, cout: int, k: int = 3, stride: int = 1, groups: int = 1, **conv_args: object
    ) -> str:
        """Conv (no bias) followed by BatchNormalization."""
        return self.bn(self.conv(x, cout, k, stride, groups, **conv_args))

    def conv_bn_relu(
        self,
        x: str,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        relu6: bool = False,
        **conv_args: object,
    ) -> str:
        """Conv, BatchNormalization and Relu (or Relu6 as Clip)."""
        y = self.conv_bn(x, cout, k, stride, groups, **conv_args)
        return self.relu6(y) if relu6 else self.relu(y)

    def add(self, a: str, b: str) -> str:
        """Elementwise Add of two tensors of equal shape."""
        return self.op("Add", [a, b], self.shapes[a])

    def concat(self, xs: Sequence[str]) -> str:
        """Concat on the channel axis."""
        c = sum(self.channels(x) for x in xs)
        return self.op("Concat", xs, (c, *self.shapes[xs[0]][1:]), axis=1)

    def pool(self, x: str, op_type: str, k: int, stride: int, pad: int = 0) -> str:
        """MaxPool or AveragePool with a square kernel."""
        c, h, w = self.shapes[x]
        oh, ow = ((d + 2 * pad - k) // stride + 1 for d in (h, w))
        return self.op(
            op_type, [x], (c, oh, ow), kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4
        )

    def global_avg_pool(self, x: str) -> str:
        """GlobalAveragePool to (N, C, 1, 1)."""
        return self.op("GlobalAveragePool", [x], (self.channels(x), 1, 1))

    def flatten(self, x: str) -> str:
        """Flatten to (N, features)."""
        return self.op("Flatten", [x], (int(np.prod(self.shapes[x])),), axis=1)

    def gemm(
        self,
        x: str,
        n_out: int,
        weight: np.ndarray | None = None,
        bias: np.ndarray | None = None,
        gain: float = 1.0,
        output: str | None = None,
    ) -> str:
        """Fully connected layer ``x @ W.T + b`` as Gemm(transB=1).

        Args:
            x: Input tensor (N, features).
            n_out: Output features.
            weight: Explicit weight (n_out, features); default He-style with variance
                ``gain / features``.
            bias: Explicit bias; default small random.
            gain: Variance gain of the random weight (2 before a Relu, 1 otherwise).
            output: Name of the output tensor.

        Returns:
            Name of the output tensor.
        """
        n_in = self.shapes[x][0]
        if weight is None:
            weight = self.rng.normal(0.0, np.sqrt(gain / n_in), (n_out, n_in))
        if bias is None:
            bias = self.rng.normal(0.0, 0.1, n_out)
        name = self._fresh("gemm")
        w = self.const(f"{name}.weight", weight.astype(np.float32))
        b = self.const(f"{name}.bias", bias.astype(np.float32))
        return self.op("Gemm", [x, w, b], (n_out,), output=output, name=name, transB=1)

    def classifier(self, x: str, num_classes: int = NUM_CLASSES) -> str:
        """GlobalAveragePool, Flatten and a Gemm producing "logits"."""
        return self.gemm(self.flatten(self.global_avg_pool(x)), num_classes, output="logits")

    def build(self, output: str, name: str) -> onnx.ModelProto:
        """Wraps the nodes into a checked-shape opset-17 model with one input and one output."""
        graph = helper.make_graph(
            self.nodes,
            name,
            [
                helper.make_tensor_value_info(
                    self.input, TensorProto.FLOAT, [self.batch, *self.shapes[self.input]]
                )
            ],
            [
                helper.make_tensor_value_info(
                    output, TensorProto.FLOAT, [self.batch, *self.shapes[output]]
                )
            ],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="testmodels"
        )
        model.ir_version = IR_VERSION
        return model
