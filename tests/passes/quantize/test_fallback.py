"""Tests of the quantize fallback: scoring against the floor, sensitive nodes kept float,
kept-float nodes that stay float in onnxruntime, and the sequence metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.data import open_feeds
from onnxopt.ir import from_proto
from onnxopt.passes.quantize.fallback import Score, Targets, reference, score
from onnxopt.session import run_model
from testmodels import conv_chain
from tests.helpers import ort_ops
from tests.passes.quantize.test_search import gap_gemm_model


def _sensitive_model() -> onnx.ModelProto:
    """conv_a's output has one channel near 1000 beside channels near 1, which conv_b reads.

    One uint8 range for that tensor loses the small channels, so quantizing conv_a's output
    destroys what conv_b computes; the channel near 1000 itself is ignored (zero weights).
    """
    rng = np.random.default_rng(0)
    wa = rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)
    ba = np.zeros(8, np.float32)
    ba[7] = 1000.0
    wb = rng.normal(0, 0.5, (8, 8, 3, 3)).astype(np.float32)
    wb[:, 7] = 0.0
    wg = rng.normal(0, 1, (10, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((wa, "wa"), (ba, "ba"), (wb, "wb"))]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
             helper.make_node("Conv", ["ar", "wb"], ["b"], name="conv_b", pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["br"], name="relu_b")]
    return gap_gemm_model("sensitive", nodes, inits, "br", wg)


def test_fallback_keeps_the_sensitive_layer_float_and_clears_the_floor(tmp_path: Path) -> None:
    proto = _sensitive_model()
    # without the fallback the all-int8 model falls below the default floor: rolled back
    # (activation equalization off: it would shrink conv_a's huge channel and pass)
    _, report = onnxopt.optimize(proto, "quantize(fallback=false,equalize_activations=false)",
                                 calib="random:64")
    assert report.failures and report.records[-1].status != "kept"
    model, report = onnxopt.optimize(proto, "quantize(equalize_activations=false)",
                                     calib="random:64")
    record = report.records[-1]
    assert not report.failures and record.status == "kept"
    trace = record.stats["fallback"]
    assert trace["score_all_quantized"]["agreement"] < 0.9 and trace["reached"] is True
    assert trace["ranking"][0] == 0  # conv_a, the sensitive one, ranked first
    assert "Conv 'conv_a'" in record.stats["kept_float"]
    assert record.stats["quantized"] >= 1  # not everything fell back
    # an independent onnxruntime run on other data agrees with the float model
    x = np.random.default_rng(7).normal(size=(256, 4, 8, 8)).astype(np.float32)
    ref, got = run_model(proto, {"x": x})[0], run_model(model, {"x": x})[0]
    assert float(np.mean(ref.argmax(1) == got.argmax(1))) >= 0.9
    # conv_a runs in float in onnxruntime, not as an integer kernel it re-fused
    ops = ort_ops(model, tmp_path)
    assert ops["QLinearConv"] == 0 and ops["Conv"] + ops["FusedConv"] == 2


def test_fallback_quantizes_nothing_when_no_probe_clears_the_floor() -> None:
    proto = _sensitive_model()
    model, report = onnxopt.optimize(
        proto, "quantize(max_float_nodes=0,equalize_activations=false)", calib="random:64")
    record = report.records[-1]
    assert not report.failures  # nothing below the floor is handed back
    assert record.stats["fallback"]["reached"] is False
    assert any("stays below the quality floor" in r.reason for r in record.refusals)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)


def test_excluded_node_runs_in_float_in_onnxruntime(tmp_path: Path) -> None:
    proto = conv_chain()
    names = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    spec = f"fold-bn,quantize(exclude_nodes={names[1]},fallback=false)"
    model, report = onnxopt.optimize(proto, spec, calib="random:32", validate=False)
    record = report.records[-1]
    # the Conv after it reads its float output: it stays float too, so that onnxruntime
    # cannot re-fuse the excluded Conv (DequantizeLinear in, QuantizeLinear out)
    reasons = [r.reason for r in record.refusals if f"'{names[2]}'" in r.where]
    assert reasons and names[1] in reasons[0]
    ops = ort_ops(model, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Conv"] + ops["FusedConv"] == 2
    feeds = {"input": np.random.default_rng(1).normal(size=(8, 3, 16, 16)).astype(np.float32)}
    ref, got = run_model(proto, feeds)[0], run_model(model, feeds)[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def _sequence_model(weight: np.ndarray) -> onnx.ModelProto:
    """``softmax(x @ W)`` over the last axis: ``[N, T, F] -> [N, T, C]``."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]),
         helper.make_node("Softmax", ["z"], ["y"], axis=2)], "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 5])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_sequence_score_is_the_share_of_whole_argmax_paths() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 5)).astype(np.float32)
    other = w + rng.normal(scale=0.6, size=w.shape).astype(np.float32)
    x = rng.normal(size=(40, 6, 4)).astype(np.float32)
    float_model = from_proto(_sequence_model(w))
    source = open_feeds({"x": x}, float_model)
    ref = reference(float_model, source, limit=None, batch_size=16, input_shapes=None)
    assert ref.kinds == ["sequence"]
    assert score(float_model, ref) == Score(1.0, float("inf"))
    got = score(from_proto(_sequence_model(other)), ref)
    a, b = (run_model(_sequence_model(v), {"x": x})[0].argmax(2) for v in (w, other))
    want = float(np.mean((a == b).all(axis=1)))
    assert 0 < want < float(np.mean(a == b)) < 1  # stricter than per-step agreement
    assert got.agreement == pytest.approx(want)
    targets = Targets.from_floor(None, None)
    assert targets.min_agreement == pytest.approx(0.93) and targets.min_sqnr_db == 11.0
    assert got.meets(Targets(want, 0.0)) and not got.meets(Targets(want + 0.01, 0.0))


def test_one_probability_per_sample_is_scored_as_a_decision_and_bysqnr() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 1)).astype(np.float32)
    other = w + rng.normal(scale=0.5, size=w.shape).astype(np.float32)

    def model(weight: np.ndarray) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["p"])], "vad",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1])],
            [numpy_helper.from_array(weight, "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    x = rng.normal(size=(64, 4)).astype(np.float32)
    float_model = from_proto(model(w))
    ref = reference(float_model, open_feeds({"x": x}, float_model), limit=None, batch_size=16,
                    input_shapes=None)
    assert ref.kinds == ["binary"]
    got = score(from_proto(model(other)), ref)
    a, b = (run_model(model(v), {"x": x})[0] for v in (w, other))
    assert got.agreement == pytest.approx(float(np.mean((a > 0.5) == (b > 0.5))))
    noise = float(np.sum((b.astype(np.float64) - a) ** 2))
    assert got.sqnr_db == pytest.approx(10 * np.log10(float(np.sum(a.astype(np.float64) ** 2))
                                                      / noise), rel=1e-6)
