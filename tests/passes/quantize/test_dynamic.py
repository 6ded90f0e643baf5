"""Tests of dynamic int8 MatMuls: structure, numerics and kernels in onnxruntime, refusals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.ir import from_proto
from onnxopt.passes.quantize.dynamic import dynamic_candidate, quantize_dynamic_matmuls
from onnxopt.session import make_session, run_model


def _attention_like() -> onnx.ModelProto:
    """``[N, T, 16] @ W1 -> [N, T, 24]``, scores ``h @ h^T`` (two activations), ``h @ W2``."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 24)).astype(np.float32)
    w1[:, 3] *= 20.0  # one column far larger than the others: per-column scales matter
    w2 = rng.normal(0, 0.3, (24, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
             helper.make_node("Transpose", ["h"], ["ht"], name="tr", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["s"], name="scores"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="head")]
    graph = helper.make_graph(
        nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 5]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 6, 6])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_dynamic_matmuls_run_as_integer_kernels_and_match_the_float_model(
        tmp_path: Path) -> None:
    proto = _attention_like()
    model = from_proto(proto)
    candidates = [n for n in model.graph if dynamic_candidate(n)]
    assert [n.name for n in candidates] == ["proj", "head"]  # not the product of activations
    assert quantize_dynamic_matmuls(model.graph, candidates, reduce_range=False) == 2
    ops = Counter(n.op_type for n in model.graph)
    assert ops["DynamicQuantizeLinear"] == 2 and ops["MatMulInteger"] == 2
    assert ops["MatMul"] == 1  # the scores stay float
    assert not any(v.const_value is not None and v.dtype == onnx.TensorProto.FLOAT
                   and v.name in ("w1", "w2") for v in model.graph.initializers.values())
    assert [v.name for v in model.graph.outputs] == ["y", "s"]
    x = np.random.default_rng(1).normal(size=(32, 6, 16)).astype(np.float32)
    x[:16] *= 50.0  # inputs of very different ranges: each is quantized on its own range
    ref = run_model(proto, {"x": x})
    for lo, hi in ((0, 16), (16, 32)):  # one batch per range, as one input at run time
        got = run_model(model, {"x": x[lo:hi]})
        for r, g in zip(ref, got, strict=True):
            r = r[lo:hi]
            err = np.abs(g - r).max() / np.abs(r).max()
            assert err < 0.03, err
    path = tmp_path / "opt.onnx"
    make_session(model, optimized_path=str(path))
    fused = Counter(n.op_type for n in onnx.load(path).graph.node)
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 2
    assert fused["MatMulInteger"] == 0


def test_dynamic_matmul_option_through_the_pass_and_what_it_refuses() -> None:
    proto = _attention_like()
    model, report = onnxopt.optimize(
        proto, "quantize(dynamic_matmul=true,fallback=false,report_sqnr=false,"
               "exclude_nodes=head)", calib="random:32", validate=False)
    record = report.records[-1]
    assert record.status == "kept" and record.stats["dynamic_matmul"] == 1
    ops = Counter(n.op_type for n in model.graph)
    assert ops["DynamicQuantizeLinear"] == 1  # proj only: head is excluded, scores not one
    names = {n.name for n in model.graph}
    assert "head" in names and "proj" not in names
    assert not any("proj" in r.where and "kept float" in r.reason for r in record.refusals)
    # a weight that is a graph input (overridable) is no constant: not a candidate
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    open_weight = from_proto(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert not any(dynamic_candidate(n) for n in open_weight.graph)
