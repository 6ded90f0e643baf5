"""Tests of quantize's speed check: the int8 model timed against the float one.

The verdicts are tested with a fake timing (no timed assertion); one test runs the real
timing and checks only what it records.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.ir import to_proto
from onnxopt.passes.quantize import quantize as quantize_module
from onnxopt.passes.quantize.speed import Speed
from onnxopt.session import run_model
from tests.helpers import op_counts
from tests.passes.quantize.test_hard_swish import hard_swish_feeds, hard_swish_model


def _quantize(options: str = ""):
    out, report = onnxopt.optimize(hard_swish_model(last_activation=False),
                                   f"quantize(fallback=false{options})",
                                   calib=hard_swish_feeds(0), validate=False)
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
    original = hard_swish_model(last_activation=False)
    # the HardSwish split for int8 is joined back: the model is the one given
    assert [(n.op_type, n.name) for n in model.graph.node] == \
        [(n.op_type, n.name) for n in original.graph.node]
    feeds = hard_swish_feeds(1)
    np.testing.assert_array_equal(run_model(model, feeds)[0], run_model(original, feeds)[0])


def test_max_latency_keeps_an_int8_model_within_it(timed_as) -> None:
    timed_as(1.6)
    model, record = _quantize(",max_latency=2.0")
    assert record.status == "kept" and op_counts(model)["QuantizeLinear"] > 0
