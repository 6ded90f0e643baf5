"""Tests of the chain and power rules: elementwise ops go int8 only inside integer chains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.ir import to_proto
from onnxopt.passes.quantize import placement
from onnxopt.passes.quantize.chains import NO_PRODUCER, NO_READER, POWER
from onnxopt.session import run_model
from tests.helpers import ort_ops, sqnr


def _const(name: str, value: float | np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _weight(name: str, shape: tuple[int, ...], seed: int, scale: float = 0.3) -> onnx.TensorProto:
    return _const(name, np.random.default_rng(seed).standard_normal(shape) * scale)


def _model(nodes: list, out_channels: int, initializers: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", out_channels, 8, 8])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _gelu_model() -> onnx.ModelProto:
    """Conv -> GELU (tanh approximation, written out as exporters do) -> Conv."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["y", "c"], ["a"], name="scaled"),
        helper.make_node("Mul", ["y", "a"], ["b"], name="square"),
        helper.make_node("Mul", ["y", "b"], ["cube"], name="cube"),
        helper.make_node("Add", ["y", "cube"], ["d"], name="inner"),
        helper.make_node("Mul", ["d", "k"], ["e"], name="scaled_inner"),
        helper.make_node("Tanh", ["e"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["f"], name="one_plus"),
        helper.make_node("Mul", ["f", "half"], ["g"], name="halved"),
        helper.make_node("Mul", ["y", "g"], ["h"], name="gate"),
        helper.make_node("Conv", ["h", "w2"], ["out"], pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, 8, [_weight("w1", (8, 4, 3, 3), 0, 2.0), _weight("w2", (8, 8, 3, 3), 1),
                             _const("c", 0.044715), _const("k", 0.7978845608),
                             _const("one", 1.0), _const("half", 0.5)])


def _detector_model() -> onnx.ModelProto:
    """Two conv heads, one in pixels (x 100) and one sigmoid score, concatenated as output."""
    nodes = [
        helper.make_node("Conv", ["x", "wb"], ["box"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["box", "stride"], ["pixels"], name="to_pixels"),
        helper.make_node("Conv", ["x", "ws"], ["logit"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["logit"], ["score"], name="score"),
        helper.make_node("Concat", ["pixels", "score"], ["out"], axis=1, name="output"),
    ]
    return _model(nodes, 6, [_weight("wb", (4, 4, 3, 3), 2), _weight("ws", (2, 4, 3, 3), 3),
                             _const("stride", 100.0)])


def _silu_model() -> onnx.ModelProto:
    """Conv -> SiLU (x * sigmoid(x)) -> Conv, plus a residual Add: all inside the chain."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["y"], ["s"]),
        helper.make_node("Mul", ["y", "s"], ["a"], name="silu"),
        helper.make_node("Conv", ["a", "w2"], ["z"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["z", "y"], ["r"], name="residual"),
        helper.make_node("Conv", ["r", "w3"], ["out"], pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, 4, [_weight("w1", (4, 4, 3, 3), 4), _weight("w2", (4, 4, 3, 3), 5),
                             _weight("w3", (4, 4, 3, 3), 6)])


def _feeds(seed: int, n: int = 32) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)}


def _quantize(model: onnx.ModelProto):
    out, report = onnxopt.optimize(model, "quantize(fallback=false)", calib=_feeds(0),
                                   validate=False)
    record = report.records[-1]
    assert record.status == "kept", record.message
    return out, record




@pytest.fixture
def without_rules(monkeypatch):
    """The placement as it was before the chain and power rules (nothing dropped)."""
    monkeypatch.setattr(placement, "unchained", lambda *args: {})


def _reasons(record) -> dict[str, str]:
    return {r.where: r.reason for r in record.refusals}


def test_powers_of_one_tensor_stay_float(tmp_path: Path) -> None:
    model = _gelu_model()
    quantized, record = _quantize(model)
    reasons = _reasons(record)
    for where in ("Mul 'square'", "Mul 'cube'", "Add 'inner'", "Mul 'scaled_inner'"):
        assert reasons[where].endswith(POWER)
    for where in ("Add 'one_plus'", "Mul 'halved'"):
        assert reasons[where].endswith(NO_PRODUCER)  # after a float node (Tanh)
    ops = ort_ops(quantized, tmp_path)
    assert reasons["Mul 'scaled'"].endswith(NO_READER)  # its only reader is a power
    assert "Mul 'gate'" not in reasons  # x * gelu'(x) between the two convs
    assert ops["QLinearConv"] == 2 and ops["QLinearMul"] == 1 and ops["QLinearAdd"] == 0
    feeds = _feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert sqnr(ref, got) > 28.0


def test_without_the_power_rule_gelu_loses_its_small_values(without_rules) -> None:
    model = _gelu_model()
    quantized, _ = _quantize(model)
    feeds = _feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert sqnr(ref, got) < 22.0  # the case the rule exists for


def test_graph_output_concat_stays_float_and_keeps_score_resolution(tmp_path: Path) -> None:
    model = _detector_model()
    quantized, record = _quantize(model)
    reasons = _reasons(record)
    assert reasons["Concat 'output'"].endswith(NO_READER)
    assert reasons["Sigmoid 'score'"].endswith(NO_READER)
    ops = ort_ops(quantized, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QLinearConcat"] == 0
    feeds = _feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    error = np.abs(got[:, 4:] - ref[:, 4:])  # scores in [0, 1]
    assert error.mean() < 0.02 and error.max() < 0.2
    assert sqnr(ref[:, :4], got[:, :4]) > 25.0


def test_without_the_chain_rule_scores_share_the_pixel_scale(without_rules) -> None:
    model = _detector_model()
    quantized, _ = _quantize(model)
    feeds = _feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert np.abs(got[:, 4:] - ref[:, 4:]).mean() > 0.2  # rounded to the pixel scale


def test_elementwise_ops_inside_the_chain_stay_integer(tmp_path: Path) -> None:
    model = _silu_model()
    quantized, record = _quantize(model)
    assert not any(r.reason.endswith((POWER, NO_PRODUCER, NO_READER))
                   for r in record.refusals)
    ops = ort_ops(quantized, tmp_path)
    assert ops["QLinearConv"] == 3
    assert ops["QLinearMul"] == 1 and ops["QLinearSigmoid"] == 1 and ops["QLinearAdd"] == 1
    feeds = _feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert sqnr(ref, got) > 25.0


def _softmax_model(head: bool) -> onnx.ModelProto:
    """Conv -> Softmax over channels -> Conv (a detector's DFL), or Softmax as the output."""
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["y"], ["p" if head else "out"], axis=1, name="soft")]
    if head:
        nodes.append(helper.make_node("Conv", ["p", "w2"], ["out"], pads=[1, 1, 1, 1]))
    return _model(nodes, 4, [_weight("w1", (4, 4, 3, 3), 7), _weight("w2", (4, 4, 3, 3), 8)])


def test_softmax_between_convs_runs_as_qlinearsoftmax(tmp_path: Path) -> None:
    model = _softmax_model(head=True)
    quantized, _ = _quantize(model)
    ops = ort_ops(quantized, tmp_path)
    assert ops["QLinearSoftmax"] == 1 and ops["QLinearConv"] == 2 and ops["Softmax"] == 0
    feeds = _feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert sqnr(ref, got) > 25.0


def test_softmax_as_the_output_keeps_float_probabilities(tmp_path: Path) -> None:
    model = _softmax_model(head=False)
    quantized, record = _quantize(model)
    assert _reasons(record)["Softmax 'soft'"].endswith(NO_READER)
    ops = ort_ops(quantized, tmp_path)
    assert ops["QLinearSoftmax"] == 0 and ops["QLinearConv"] == 1
    feeds = _feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert np.abs(got - ref).mean() < 0.01


def _pooled_classifier() -> onnx.ModelProto:
    """Conv -> hard swish written with a Div (no integer kernel) -> MaxPool -> global pool ->
    Flatten -> Gemm, the end of a MobileNetV3 as PaddlePaddle exports it."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["y", "three"], ["y3"]),
        helper.make_node("Clip", ["y3", "zero", "six"], ["r6"]),
        helper.make_node("Mul", ["y", "r6"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["hs"]),
        helper.make_node("MaxPool", ["hs"], ["mp"], kernel_shape=[1, 1], name="pool"),
        helper.make_node("GlobalAveragePool", ["mp"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wg"], ["out"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 10])],
        initializer=[_weight("w1", (8, 4, 3, 3), 3), _weight("wg", (10, 8), 4),
                     _const("three", 3.0), _const("zero", 0.0), _const("six", 6.0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_value_mover_after_a_float_node_stays_float_and_the_gemm_is_integer(
        tmp_path: Path) -> None:
    """A MaxPool after a float Div was quantized (a QuantizeLinear before it), so the pool
    after it looked fed by a quantized node; the pool stayed float by the chain rule, and the
    re-fusion guard then kept the Gemm reading it float too."""
    model = _pooled_classifier()
    quantized, record = _quantize(model)
    reasons = _reasons(record)
    assert reasons["MaxPool 'pool'"].endswith(NO_PRODUCER)
    assert reasons["GlobalAveragePool 'gap'"].endswith(NO_PRODUCER)
    assert "Gemm 'fc'" not in reasons
    ops = ort_ops(quantized, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1 and ops["Gemm"] == 0
    feeds = _feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert sqnr(ref, got) > 25.0


def _shuffle_block() -> onnx.ModelProto:
    """A ShuffleNet stride-2 unit: a float Sum (no integer kernel) before it, then a conv
    branch and an average-pool shortcut of the same tensor, concatenated."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Sum", ["y", "x"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["b"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2], name="shortcut"),
        helper.make_node("Concat", ["b", "p"], ["c"], axis=1, name="join"),
        helper.make_node("Conv", ["c", "w3"], ["out"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 4, 4])],
        initializer=[_weight("w1", (4, 4, 3, 3), 7), _weight("w2", (4, 4, 3, 3), 8),
                     _weight("w3", (4, 8, 3, 3), 9)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_pool_reading_what_a_conv_reads_shares_its_int8_copy(tmp_path: Path) -> None:
    """The shortcut pool's input comes from a float Sum, but the conv branch reads it too, so
    it gets a QuantizeLinear anyway: the pool reads that copy and the Concat stays int8."""
    model = _shuffle_block()
    quantized, record = _quantize(model)
    reasons = _reasons(record)
    assert "AveragePool 'shortcut'" not in reasons and "Concat 'join'" not in reasons
    ops = ort_ops(quantized, tmp_path)
    assert ops["QLinearAveragePool"] == 1 and ops["AveragePool"] == 0
    assert ops["QLinearConcat"] == 1 and ops["QLinearConv"] == 3
    proto = quantized if isinstance(quantized, onnx.ModelProto) else to_proto(quantized)
    readers_of_r = [n.op_type for n in proto.graph.node if "r" in n.input]
    assert readers_of_r == ["QuantizeLinear"]  # one int8 copy of r for both readers
    feeds = _feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert sqnr(ref, got) > 25.0
