"""Linear views: sampled rows times the weight reproduce the consumer's onnxruntime output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.ir import from_proto, to_proto
from onnxopt.passes.prune.capture import linear_view, truncated_copy
from onnxopt.session import run_model


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="same", auto_pad="SAME_UPPER",
                         strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["c0", "w1"], ["c1"], name="padded", pads=[0, 1, 2, 1],
                         dilations=[2, 1], kernel_shape=[3, 2]),
        helper.make_node("ReduceMean", ["c1", "axes"], ["r"], keepdims=0),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["g"], name="gemm", transB=1, alpha=0.5,
                         beta=2.0),
        helper.make_node("Unsqueeze", ["g", "one"], ["u"]),
        helper.make_node("Concat", ["u", "u", "u"], ["t"], axis=1),
        helper.make_node("MatMul", ["t", "w3"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes, "views", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2])],
        [init("w0", 4, 3, 3, 3), init("b0", 4), init("w1", 5, 4, 3, 2), init("w2", 6, 5),
         init("b2", 1, 6), init("w3", 6, 2),
         numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
         numpy_helper.from_array(np.array([1], np.int64), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize("name", ["same", "padded", "gemm", "matmul"])
def test_rows_times_weight_give_the_output(name: str) -> None:
    proto = _model()
    model = from_proto(proto)
    node = next(n for n in model.graph if n.name == name)
    view = linear_view(node)
    assert not isinstance(view, str)
    inp, out = node.inputs[0].name, node.outputs[0].name
    probe = truncated_copy(model, [inp, out])
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 9, 7)).astype(np.float32)}
    names = [v.name for v in probe.graph.outputs]
    values = dict(zip(names, run_model(probe, feeds), strict=True))
    x = feeds["x"] if inp == "x" else values[inp]
    y = values[out]
    coords = view.sample(y.shape, 5, np.random.default_rng(2))
    rows = view.rows(x, coords)
    bias = view.bias if view.bias is not None else 0.0
    predicted = np.einsum("spk,opk->so", rows.astype(np.float64), view.weight) + bias
    np.testing.assert_allclose(predicted, view.outputs(y, coords), rtol=1e-4, atol=1e-4)

    # writing the view's own weights back changes nothing
    view.write(model.graph, view.weight, view.bias)
    onnx.checker.check_model(to_proto(model))
    np.testing.assert_allclose(run_model(model, feeds)[0], run_model(proto, feeds)[0],
                               rtol=1e-5, atol=1e-5)


def test_grouped_conv_has_no_view() -> None:
    from testmodels.structures import inverted_residual

    model = from_proto(inverted_residual())
    depthwise = next(n for n in model.graph if n.op_type == "Conv"
                     and n.attributes.get("group") is not None
                     and n.attributes["group"].value > 1)
    assert linear_view(depthwise) == "grouped Conv"
