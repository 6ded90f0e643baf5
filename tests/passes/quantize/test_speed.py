"""Tests of quantize's speed check: the int8 model timed against the float one.

The verdicts are tested with a fake timing (no timed assertion); one test runs the real
timing and checks only what it records.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.ir import to_proto
from onnxopt.passes.quantize import quantize as quantize_module
from onnxopt.passes.quantize.speed import Speed
from onnxopt.session import run_model
from tests.helpers import op_counts


def _model() -> onnx.ModelProto:
    """Conv -> HardSwish -> Conv."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float32), n)
               for n, s in (("w1", (8, 4, 3, 3)), ("w2", (8, 8, 3, 3)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("HardSwish", ["y"], ["h"], name="act"),
        helper.make_node("Conv", ["h", "w2"], ["out"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 8, 8])],
        initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(seed: int, n: int = 32) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)}


def _quantize(options: str = ""):
    out, report = onnxopt.optimize(_model(), f"quantize(fallback=false{options})",
                                   calib=_feeds(0), validate=False)
    record = report.records[-1]
    return (out if isinstance(out, onnx.ModelProto) else to_proto(out)), record


@pytest.fixture
def timed_as(monkeypatch):
    """Make the speed check measure the given ratio (noise 0.05)."""
    def set_ratio(ratio: float) -> None:
        monkeypatch.setattr(quantize_module, "time_against_float",
                            lambda *args: Speed(ratio, 0.01, 0.05, 1.0, 9))
    return set_ratio


def test_the_check_times_both_models_and_records_it() -> None:
    _, record = _quantize()
    assert record.status == "kept"
    speed = record.stats["latency_vs_float"]
    assert speed["ratio"] > 0 and speed["float_ms"] > 0 and speed["rounds"] >= 5
    assert speed["batch"] == 1 and speed["threads"] == 1


def test_a_slower_int8_model_is_kept_with_a_note(timed_as) -> None:
    timed_as(1.6)
    model, record = _quantize()
    assert record.status == "kept"
    assert "int8 runs 1.60x the float model's latency" in record.summary
    assert "the float model is faster here" in record.summary
    assert op_counts(model)["QuantizeLinear"] > 0


def test_a_faster_one_or_one_within_noise_gets_no_note(timed_as) -> None:
    for ratio in (0.6, 1.04):
        timed_as(ratio)
        _, record = _quantize()
        assert record.status == "kept"
        assert "float model is faster" not in (record.summary or "")


def test_max_latency_hands_back_the_float_model(timed_as) -> None:
    timed_as(1.6)
    model, record = _quantize(",max_latency=1.0")
    assert record.status == "unchanged"
    assert any("over max_latency=1" in r.reason for r in record.refusals)
    original = _model()
    # the HardSwish split for int8 is joined back: the model is the one given
    assert [(n.op_type, n.name) for n in model.graph.node] == \
        [(n.op_type, n.name) for n in original.graph.node]
    feeds = _feeds(1)
    np.testing.assert_array_equal(run_model(model, feeds)[0], run_model(original, feeds)[0])


def test_max_latency_keeps_an_int8_model_within_it(timed_as) -> None:
    timed_as(1.6)
    model, record = _quantize(",max_latency=2.0")
    assert record.status == "kept" and op_counts(model)["QuantizeLinear"] > 0
