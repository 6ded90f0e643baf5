"""onnxopt.layouts: the weight-channel table checked against what onnxruntime computes.

Scaling a weight's output channels must scale the op's output channels; scaling its input
channels must equal scaling the op's input channels. Everything else in a layout (channel
counts, abs-max per channel, the by-output view) is checked against those two facts.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.ir import from_proto
from onnxopt.layouts import gemm_bias, weight_layout
from onnxopt.session import run_model

# name -> (op, attributes, input shape, weight shape, channel axis of input and output)
CASES = {
    "conv": ("Conv", {}, (2, 4, 5, 5), (6, 4, 3, 3), 1),
    "conv-grouped": ("Conv", {"group": 2}, (2, 4, 5, 5), (6, 2, 3, 3), 1),
    "conv-depthwise": ("Conv", {"group": 4}, (2, 4, 5, 5), (8, 1, 3, 3), 1),
    "convtranspose": ("ConvTranspose", {}, (2, 4, 5, 5), (4, 6, 3, 3), 1),
    "convtranspose-grouped": ("ConvTranspose", {"group": 2}, (2, 4, 5, 5), (4, 3, 3, 3), 1),
    "gemm": ("Gemm", {}, (3, 5), (5, 7), 1),
    "gemm-transB": ("Gemm", {"transB": 1}, (3, 5), (7, 5), 1),
    "matmul": ("MatMul", {}, (2, 3, 5), (5, 7), -1),
}


def _model(op: str, attrs: dict, x_shape: tuple, w: np.ndarray):
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


@pytest.fixture(params=sorted(CASES))
def case(request):
    op, attrs, x_shape, w_shape, axis = CASES[request.param]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    layout = weight_layout(from_proto(_model(op, attrs, x_shape, w)).graph.node(0), w.ndim)
    return op, attrs, x, w, axis, layout


def test_scaling_outputs_scales_the_op_output(case) -> None:
    op, attrs, x, w, axis, layout = case
    y = run_model(_model(op, attrs, x.shape, w), {"x": x})[0]
    assert layout.out_channels(w.shape) == y.shape[axis]
    s = np.linspace(0.5, 2.0, y.shape[axis]).astype(np.float32)
    scaled = layout.scale_outputs(w, s)
    got = run_model(_model(op, attrs, x.shape, scaled.astype(np.float32)), {"x": x})[0]
    np.testing.assert_allclose(got, y * _along(s, axis, y.ndim), rtol=1e-4, atol=1e-5)
    in_place = w.copy()
    assert layout.scale_outputs(in_place, s, in_place=True) is in_place
    np.testing.assert_allclose(in_place, scaled, rtol=1e-6)


def test_scaling_inputs_equals_scaling_the_op_input(case) -> None:
    op, attrs, x, w, axis, layout = case
    assert layout.in_channels(w.shape) == x.shape[axis]
    s = np.linspace(0.5, 2.0, x.shape[axis]).astype(np.float32)
    want = run_model(_model(op, attrs, x.shape, w), {"x": x * _along(s, axis, x.ndim)})[0]
    scaled = layout.scale_inputs(w, s).astype(np.float32)
    got = run_model(_model(op, attrs, x.shape, scaled), {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_abs_max_and_rows_cover_exactly_the_weights_of_each_channel(case) -> None:
    _, _, x, w, _, layout = case
    cout, cin = layout.out_channels(w.shape), layout.in_channels(w.shape)
    rows = layout.by_output(w)
    assert rows.shape[0] == cout and rows.size == w.size
    for o in range(cout):  # the weights scale_outputs touches for output o are row o
        mask = layout.scale_outputs(np.ones_like(w), np.eye(cout)[o]) != 0
        assert sorted(w[mask]) == sorted(rows[o].reshape(-1))
        assert layout.out_abs_max(w)[o] == np.abs(w[mask]).max()
    columns = layout.by_input(w)
    assert columns.shape[0] == cin and columns.size == w.size
    for c in range(cin):
        mask = layout.scale_inputs(np.ones_like(w), np.eye(cin)[c]) != 0
        assert sorted(w[mask]) == sorted(columns[c].reshape(-1))
        assert layout.in_abs_max(w)[c] == np.abs(w[mask]).max()


def test_per_channel_axis_and_the_inverse_of_by_output(case) -> None:
    op, attrs, _, w, _, layout = case
    axis = layout.per_channel_axis()
    if op == "ConvTranspose" and attrs.get("group", 1) > 1:
        assert axis is None  # no single axis holds every output channel
        with pytest.raises(ValueError):
            layout.from_output(layout.by_output(w))
        return
    assert w.shape[axis] == layout.out_channels(w.shape)
    np.testing.assert_array_equal(layout.from_output(layout.by_output(w)), w)


def test_no_layout_for_other_ops_or_vector_weights() -> None:
    relu = from_proto(_model("MatMul", {}, (2, 5), np.ones(5, np.float32))).graph.node(0)
    assert weight_layout(relu, 1) is None
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = from_proto(helper.make_model(graph))
    assert weight_layout(model.graph.node(0), 2) is None


@pytest.mark.parametrize(("c_shape", "ok"), [((), True), ((7,), True), ((1, 7), True),
                                              ((1, 1), True), ((3, 7), False), ((3, 1), False),
                                              ((5,), False)])
def test_gemm_bias_is_beta_c_per_output_or_a_reason(c_shape: tuple, ok: bool) -> None:
    model = from_proto(_model("Gemm", {"beta": 0.5}, (3, 5), np.ones((5, 7), np.float32)))
    c = np.arange(1, 1 + int(np.prod(c_shape)), dtype=np.float64).reshape(c_shape)
    found = gemm_bias(model.graph.node(0), c, 7)
    if ok:
        np.testing.assert_array_equal(found, 0.5 * np.broadcast_to(c.reshape(-1), (7,)))
    else:
        assert isinstance(found, str) and "not per output feature" in found
