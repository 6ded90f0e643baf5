"""Small models at old opsets (7 to 12), for opset conversion and the quantizer's upgrade."""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto], opset: int,
           name: str, extra: tuple[onnx.OperatorSetIdProto, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", opset), *extra]
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=max(4, helper.find_min_ir_version_for(opsets)))
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_relu_gemm(opset: int = 11, *, weights: Literal["initializer", "constant"] = "initializer",
                   seed: int = 0, width: int = 16, size: int = 8) -> onnx.ModelProto:
    """``x [N,3,s,s]`` -> Conv(3x3, pad 1)+bias -> Relu -> Flatten -> Gemm+bias -> ``y [N,5]``.

    Args:
        opset: Default-domain opset (7 and up).
        weights: Where the weights live: initializers, or ``Constant`` nodes (as some
            exporters, e.g. paddle2onnx, write them).
        seed: Seed of the random weights.
        width: Conv output channels.
        size: Spatial size of the input.
    """
    rng = np.random.default_rng(seed)
    arrays = {
        "w": (rng.standard_normal((width, 3, 3, 3)) * 0.3).astype(np.float32),
        "b": (rng.standard_normal(width) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((width * size * size, 5)) * 0.05).astype(np.float32),
        "b2": (rng.standard_normal(5) * 0.1).astype(np.float32),
    }
    if weights == "initializer":
        consts: list[onnx.NodeProto] = []
        inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    else:
        consts = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(a, n))
                  for n, a in arrays.items()]
        inits = []
    nodes = [
        *consts,
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="gemm"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", FLOAT, ["N", 3, size, size])],
                  [helper.make_tensor_value_info("y", FLOAT, ["N", 5])], inits, opset,
                  f"conv_relu_gemm_opset{opset}")


def legacy_ops(seed: int = 0) -> onnx.ModelProto:
    """Opset 9 ops the converter rewrites: Upsample, attribute Slice and Pad, Dropout's mask.

    ``x [1,4,6,6]`` -> Conv -> Upsample x2 -> Slice -> Pad -> Dropout -> ``y``.
    """
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Upsample", ["c", "scales"], ["u"], mode="nearest", name="upsample"),
        helper.make_node("Slice", ["u"], ["s"], starts=[1, 1], ends=[11, 9], axes=[2, 3],
                         name="slice"),
        helper.make_node("Pad", ["s"], ["p"], pads=[0, 0, 1, 0, 0, 0, 0, 2], name="pad"),
        helper.make_node("Dropout", ["p"], ["y", "mask"], name="dropout"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", FLOAT, [1, 4, 6, 6])],
                  [helper.make_tensor_value_info("y", FLOAT, [1, 4, 11, 10])], [w, scales], 9,
                  "legacy_ops")


def with_ml_scaler(opset: int = 9) -> onnx.ModelProto:
    """Relu followed by ``ai.onnx.ml`` Scaler (opset 1): ``y = (relu(x) - 0.5) * 2``."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Scaler", ["r"], ["y"], domain="ai.onnx.ml", offset=[0.5], scale=[2.0],
                         name="scaler"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", FLOAT, ["N", 3])],
                  [helper.make_tensor_value_info("y", FLOAT, ["N", 3])], [], opset,
                  "with_ml_scaler", (helper.make_opsetid("ai.onnx.ml", 1),))


def conv_then_scan8(seed: int = 0) -> onnx.ModelProto:
    """Opset 8: a Conv, then a Scan with ``sequence_lens`` that sums the rows of its output.

    The version converter cannot upgrade a Scan-8 that has ``sequence_lens`` (Scan-9 has no
    such input), so this model cannot leave opset 8.
    ``x [1,2,4,4]`` -> Conv 1x1 -> Reshape [1,8,4] -> Scan(state [1,4]) -> ``state``, ``rows``.
    """
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_in"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_out"])],
        "body",
        [helper.make_tensor_value_info("s_in", FLOAT, [4]),
         helper.make_tensor_value_info("x_in", FLOAT, [4])],
        [helper.make_tensor_value_info("s_out", FLOAT, [4]),
         helper.make_tensor_value_info("y_out", FLOAT, [4])])
    inits = [
        numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1, 8, 4], np.int64), "shape"),
        numpy_helper.from_array(np.array([8], np.int64), "lens"),
        numpy_helper.from_array(np.zeros((1, 4), np.float32), "s0"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["seq"], name="reshape"),
        helper.make_node("Scan", ["lens", "s0", "seq"], ["state", "rows"], body=body,
                         num_scan_inputs=1, name="scan"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", FLOAT, [1, 2, 4, 4])],
                  [helper.make_tensor_value_info("state", FLOAT, [1, 4]),
                   helper.make_tensor_value_info("rows", FLOAT, [1, 8, 4])], inits, 8,
                  "conv_then_scan8")
