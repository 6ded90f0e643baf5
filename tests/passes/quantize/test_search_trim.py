"""Tests of the search's last steps on a model that met the targets: float nodes the targets do
not need go back to int8, costliest first, and so do the elementwise ops when the targets
hold with them int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnxopt
from tests.helpers import ort_ops
from tests.passes.quantize.test_search import (
    BRANCHES,
    _agreement,
    _branchy_model,
    _conv,
    gap_gemm_model,
)


def _costly_harmless_branch() -> onnx.ModelProto:
    """After a stem, two Convs whose int8 weights lose their input: ``big`` (3x3, 9x the
    MACs) feeds the output only through a factor 1e-3, ``small`` (1x1) is the output's
    signal. Both lose the same SQNR, so the ranking cannot tell them apart: ``big``
    comes first (graph order) and the bisection keeps both float."""
    rng = np.random.default_rng(3)
    inits: list = []
    nodes = [_conv(rng, "stem", "x", "s", inits, channels_in=4, zero_out_7=True),
             _conv(rng, "big", "s", "b", inits, huge_on_7=True)]
    w = rng.normal(0, 0.5, (8, 8, 1, 1)).astype(np.float32)
    w[:, 7] = 1e4  # reads the stem's zero channel: the rest rounds to 0 in int8
    wg = rng.normal(0, 1, (10, 8)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "small_w"),
              numpy_helper.from_array(np.float32(1e-3), "tiny")]
    nodes += [helper.make_node("Conv", ["s", "small_w"], ["a"], name="small"),
              helper.make_node("Mul", ["b", "tiny"], ["bt"], name="damp"),
              helper.make_node("Add", ["a", "bt"], ["t"], name="join")]
    return gap_gemm_model("harmless", nodes, inits, "t", wg)


def test_unneeded_costly_float_node_goes_back_to_int8(tmp_path: Path) -> None:
    proto = _costly_harmless_branch()
    model, report = onnxopt.optimize(proto, "quantize(report_sqnr=false,bias_correction=false)",
                                     calib="random:64")
    record = report.records[-1]
    assert not report.failures and record.status == "kept"
    trace = record.stats["fallback"]
    assert trace["reached"] is True and trace["best"]["float_nodes"] == 1
    assert trace["probes"][-1]["float_nodes"] == 2  # the bisection's answer: both
    tries = {t["node"]: t for t in trace["trimmed"]}
    assert tries["Conv 'big'"]["int8"] is True and tries["Conv 'small'"]["int8"] is False
    assert tries["Conv 'big'"]["macs"] == 9 * tries["Conv 'small'"]["macs"]
    # costliest first
    assert [t["node"] for t in trace["trimmed"]] == ["Conv 'big'", "Conv 'small'"]
    assert record.stats["kept_float"] == ["Conv 'small'"]
    assert _agreement(proto, model) >= 0.9
    ops = ort_ops(model, tmp_path)  # big runs as an integer kernel, small in float
    assert ops["QLinearConv"] == 2 and ops["Conv"] + ops["FusedConv"] == 1


def test_needed_float_nodes_stay_float() -> None:
    proto = _branchy_model()
    model, report = onnxopt.optimize(proto, "quantize(report_sqnr=false)", calib="random:64")
    record = report.records[-1]
    trace = record.stats["fallback"]
    assert trace["trimmed"] and not any(t["int8"] for t in trace["trimmed"])
    assert all(t["agreement"] < trace["targets"]["agreement"] for t in trace["trimmed"])
    kept = {label.split("'")[1] for label in record.stats["kept_float"]}
    assert kept == {f"wide{i}" for i in range(BRANCHES)}
    assert _agreement(proto, model) >= 0.9


def _scaled_pair(outlier: float, k: float, seed: int) -> onnx.ModelProto:
    """``stem -> Mul(up) -> Mul(down) -> mid -> small -> head``: ``up`` scales channel 0 by
    ``k`` and ``down`` back, so in int8 the tensor between them rounds the other channels
    ``k`` times coarser (harm the compute-only model does not have); ``small`` reads the
    zero channel of ``mid`` with weight ``outlier`` (its int8 weights lose the rest). The
    stem and ``mid`` stay int8, so with the elementwise ops int8 the two Muls run as
    integer kernels between them."""
    rng = np.random.default_rng(seed)
    inits: list = []
    nodes = [_conv(rng, "stem", "x", "s", inits, channels_in=4)]
    up = np.ones((1, 8, 1, 1), np.float32)
    up[0, 0] = k
    inits += [numpy_helper.from_array(up, "up"),
              numpy_helper.from_array((1 / up).astype(np.float32), "down")]
    nodes += [helper.make_node("Mul", ["s", "up"], ["e0"], name="up"),
              helper.make_node("Mul", ["e0", "down"], ["e1"], name="down"),
              _conv(rng, "mid", "e1", "m", inits, zero_out_7=True)]
    w = rng.normal(0, 0.5, (8, 8, 1, 1)).astype(np.float32)
    w[:, 7] = outlier
    inits.append(numpy_helper.from_array(w, "small_w"))
    nodes.append(helper.make_node("Conv", ["m", "small_w"], ["t"], name="small"))
    return gap_gemm_model("scaled", nodes, inits, "t",
                          rng.normal(0, 1, (10, 8)).astype(np.float32))


def _search_from_compute_only(proto: onnx.ModelProto):  # noqa: ANN202 - record, trace
    """Quantize ``proto``; the search must have started from the compute-only model."""
    model, report = onnxopt.optimize(
        proto, "quantize(report_sqnr=false,bias_correction=false)", calib="random:64")
    record = report.records[-1]
    assert not report.failures and record.status == "kept"
    trace = record.stats["fallback"]
    assert trace["reached"] is True
    # the Muls' int8 harm: the compute-only model scored better, and the search went on from it
    assert trace["score_compute_only"]["agreement"] > trace["score_all_quantized"]["agreement"]
    return model, record, trace


def test_elementwise_ops_go_back_to_int8_when_the_targets_hold(tmp_path: Path) -> None:
    # a mild scale (k = 8): once small is float, the Muls' rounding costs little
    proto = _scaled_pair(40, 8, 6)
    model, record, trace = _search_from_compute_only(proto)
    back = trace["score_elementwise_back"]["agreement"]
    assert back >= trace["targets"]["agreement"] and trace["elementwise_float"] == 0
    assert record.stats["kept_float"] == ["Conv 'small'"]
    ops = ort_ops(model, tmp_path)
    assert ops["QLinearMul"] == 2 and ops["Mul"] == 0  # both Muls integer kernels
    assert ops["QLinearConv"] == 2 and ops["Conv"] + ops["FusedConv"] == 1
    assert _agreement(proto, model) >= 0.9


def test_elementwise_ops_stay_float_when_the_targets_need_it(tmp_path: Path) -> None:
    # a strong scale (k = 32): with the Muls int8 the model misses the targets
    proto = _scaled_pair(60, 32, 6)
    model, record, trace = _search_from_compute_only(proto)
    assert trace["score_elementwise_back"]["agreement"] < trace["targets"]["agreement"]
    assert trace["elementwise_float"] > 0
    kept = record.stats["kept_float"]
    assert "Mul 'up'" in kept and "Mul 'down'" in kept and "Conv 'small'" in kept
    ops = ort_ops(model, tmp_path)
    assert ops["QLinearMul"] == 0 and ops["Mul"] == 2  # float between the integer Convs
    assert ops["QLinearConv"] == 2
    assert _agreement(proto, model) >= 0.9
