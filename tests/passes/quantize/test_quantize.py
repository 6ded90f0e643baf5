"""Tests of the ``quantize`` pass: placement structure, onnxruntime fusion, numerics, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.cost import infer_shapes
from onnxopt.data import open_feeds
from onnxopt.errors import UserError
from onnxopt.ir import clone_model, from_proto
from onnxopt.pass_base import PassContext, PassResult, get_pass
from onnxopt.passes.quantize.equalize import equalize
from onnxopt.session import run_model
from testmodels import STRUCTURES, conv_chain, residual_blocks
from tests.helpers import all_feeds, ort_ops, random_feeds, sqnr

FLOAT_COMPUTE = {"Conv", "Gemm", "MatMul"}


def _quantize(model, spec: str = "fold-bn,quantize", calib="random:32"):
    """Run a pipeline without the manager's validation; returns (model, quantize record)."""
    out, report = onnxopt.optimize(model, spec, calib=calib, validate=False)
    record = report.records[-1]
    assert record.status == "kept", record.message
    return out, record




def _nodes(model, op_type: str) -> list:
    return [n for n in model.graph if n.op_type == op_type]


def _producer_op(value) -> str | None:
    producer = value.producer() if value is not None else None
    return None if producer is None else producer.op_type


# -- the bundled trained classifier ------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_quantized(digits_model, digits_calib, digits_eval):
    """``fold-bn,quantize`` on the digits model, validated by the manager on the eval set."""
    model, report = onnxopt.optimize(str(digits_model), "fold-bn,quantize",
                                     calib=str(digits_calib), eval=str(digits_eval))
    return model, report


def test_digits_accuracy_within_half_a_point_and_not_below_quantize_static(
        digits_quantized, digits_model, digits_calib, digits_eval, tmp_path) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model, report = digits_quantized
    record = report.records[-1]
    assert record.status == "kept" and not record.exact
    cmp = record.vs_original
    assert report.original_accuracy - cmp.accuracy <= 0.005
    assert cmp.agreement >= 0.99 and cmp.sqnr_db >= 30.0

    folded, _ = onnxopt.optimize(str(digits_model), "fold-bn", validate=False)
    folded_path = tmp_path / "folded.onnx"
    onnxopt.save(folded, folded_path)
    calib = np.load(digits_calib)["input"]
    reader = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

    class Reader:
        def get_next(self):
            return next(reader, None)

    peer_path = tmp_path / "peer.onnx"
    quantize_static(str(folded_path), str(peer_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    data = np.load(digits_eval)
    peer = run_model(onnx.load(peer_path), {"input": data["input"]})[0]
    peer_accuracy = float(np.mean(peer.argmax(1) == data["labels"]))
    assert cmp.accuracy >= peer_accuracy


def test_digits_structure(digits_quantized) -> None:
    model, report = digits_quantized
    stats = report.records[-1].stats
    assert stats["quantized_ops"] == {"Add": 5, "Conv": 13, "Flatten": 1, "Gemm": 1,
                                      "GlobalAveragePool": 1}
    assert stats["absorbed_activations"] == 11
    # Graph input and output keep names and stay float.
    assert [(v.name, v.dtype) for v in model.graph.inputs] == [("input", ir.DataType.FLOAT)]
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [("logits", ir.DataType.FLOAT)]
    assert _producer_op(model.graph.outputs[0]) == "Gemm"  # QGemm returns float logits
    # One Q per quantized tensor: the input, 11 Relu outputs, the 5 residual-branch and 2
    # shortcut conv outputs that feed an Add, the pooled and the flattened features.
    assert len(_nodes(model, "QuantizeLinear")) == 21
    # Every Conv/Gemm reads x, W and b through its own DQ.
    for conv in _nodes(model, "Conv") + _nodes(model, "Gemm"):
        assert [_producer_op(v) for v in conv.inputs] == ["DequantizeLinear"] * 3
        w_dq, b_dq = conv.inputs[1].producer(), conv.inputs[2].producer()
        assert w_dq.inputs[0].const_value.dtype == ir.DataType.INT8
        assert b_dq.inputs[0].const_value.dtype == ir.DataType.INT32
        # Bias scale is s_x * s_w, zero point 0.
        x_scale = conv.inputs[0].producer().inputs[1].const_value.numpy()
        w_scale = w_dq.inputs[1].const_value.numpy()
        np.testing.assert_array_equal(b_dq.inputs[1].const_value.numpy(),
                                      np.float32(x_scale) * w_scale)
        assert not b_dq.inputs[2].const_value.numpy().any()
    # Relu fused: no Q/DQ between Conv and Relu; the Relu output goes to exactly one Q.
    for relu in _nodes(model, "Relu"):
        assert _producer_op(relu.inputs[0]) in ("Conv", "Add")
        assert len(relu.inputs[0].uses()) == 1
        assert [u.node.op_type for u in relu.outputs[0].uses()] == ["QuantizeLinear"]
        q = relu.outputs[0].uses()[0].node
        assert q.inputs[2].const_value.numpy() == 0  # zero point = qmin: Relu can be dropped
    # One Q per tensor.
    quantized = [q.inputs[0] for q in _nodes(model, "QuantizeLinear")]
    assert len({id(v) for v in quantized}) == len(quantized)
    assert all(np.isfinite(v) for v in stats["node_sqnr_db"].values())
    assert stats["size_bytes"]["after"] < 0.35 * stats["size_bytes"]["before"]


def test_digits_every_conv_and_gemm_fused_by_onnxruntime(digits_quantized, tmp_path) -> None:
    model, _ = digits_quantized
    ops = ort_ops(model, tmp_path)
    assert not FLOAT_COMPUTE & set(ops), ops
    assert ops["QLinearConv"] == 13 and ops["QGemm"] == 1 and ops["QLinearAdd"] == 5
    assert ops["DequantizeLinear"] == 0 and ops["QuantizeLinear"] == 1  # only the input


# -- structures ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_structures_fuse_and_stay_close(name: str, tmp_path: Path) -> None:
    proto = STRUCTURES[name]()
    model, record = _quantize(proto)
    ops = ort_ops(model, tmp_path)
    assert not FLOAT_COMPUTE & set(ops), ops
    assert ops["QLinearConv"] == record.stats["quantized_ops"]["Conv"]
    feeds = random_feeds(proto, batch=8, seed=5)
    assert sqnr(run_model(proto, feeds)[0], run_model(model, feeds)[0]) > 20.0


def _matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("w2", (32, 24)), ("b2", (24,)), ("w3", (24, 8)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h1"]),
         helper.make_node("Relu", ["h1"], ["r1"]),
         helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], transB=0),
         helper.make_node("Relu", ["h2"], ["r2"]),
         helper.make_node("MatMul", ["r2", "w3"], ["y"])],
        "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_matmul_and_gemm_without_transpose_fuse_per_column(tmp_path: Path) -> None:
    proto = _matmul_model()
    model, record = _quantize(proto, "quantize")
    for mm in _nodes(model, "MatMul") + _nodes(model, "Gemm"):
        w_dq = mm.inputs[1].producer()
        assert w_dq.attributes["axis"].value == 1  # per output column
        assert w_dq.inputs[1].const_value.shape[0] == mm.outputs[0].shape[-1]
    ops = ort_ops(model, tmp_path)
    assert not FLOAT_COMPUTE & set(ops), ops
    assert ops["QLinearMatMul"] == 1 and ops["QGemm"] == 1
    assert ops["MatMulIntegerToFloat"] == 1  # the last MatMul returns float y
    feeds = random_feeds(proto, batch=16)
    assert sqnr(run_model(proto, feeds)[0], run_model(model, feeds)[0]) > 30.0


def test_conv_graph_output_keeps_name_and_stays_float(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3))
                                .astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["y"], ["r"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model, _ = _quantize(proto, "quantize")
    assert [v.name for v in model.graph.outputs] == ["y", "r"]
    assert {_producer_op(v) for v in model.graph.outputs} == {"DequantizeLinear", "Relu"}
    assert ort_ops(model, tmp_path)["QLinearConv"] == 1
    feeds = random_feeds(proto, batch=4)
    for ref, got in zip(run_model(proto, feeds), run_model(model, feeds), strict=True):
        assert sqnr(ref, got) > 30.0


def test_concat_inputs_share_the_output_scale() -> None:
    model, _ = _quantize(STRUCTURES["concat_branches"]())
    shared = 0
    for concat in _nodes(model, "Concat"):
        (q,) = [u.node for u in concat.outputs[0].uses()]
        out_scale = q.inputs[1]
        for dq in (v.producer() for v in concat.inputs):
            shared += dq.inputs[1] is out_scale
    assert shared >= 4  # the four Inception branches plus the DenseNet growth tensors


# -- options ---------------------------------------------------------------------------------


def test_excluded_nodes_and_ops_stay_float(tmp_path: Path) -> None:
    proto = residual_blocks()
    model, record = _quantize(proto, "fold-bn,quantize(exclude_nodes=conv2,exclude_ops=Add)")
    conv2 = next(n for n in model.graph if n.name == "conv2")
    assert conv2.inputs[1].const_value is not None  # float weight, no DQ
    assert all(_producer_op(v) != "DequantizeLinear" for v in conv2.inputs[1:])
    reasons = {(r.where, r.reason) for r in record.refusals}
    assert ("Conv 'conv2'", "excluded by option (stays float)") in reasons
    assert sum(r.reason.startswith("excluded") for r in record.refusals) == 3  # conv2 + 2 Adds
    ops = ort_ops(model, tmp_path)
    assert ops["QLinearConv"] == 5 and ops["Conv"] + ops["FusedConv"] == 1  # conv2 is float
    # The Adds get no Q/DQ of their own (onnxruntime may still fuse one whose neighbours
    # are all quantized; the option's documentation says so).
    assert "Add" not in record.stats["quantized_ops"]
    feeds = random_feeds(proto, batch=4)
    assert sqnr(run_model(proto, feeds)[0], run_model(model, feeds)[0]) > 20.0


def test_misspelt_exclusions_are_user_errors() -> None:
    proto = residual_blocks()
    with pytest.raises(UserError, match="'cnov2' names no node"):
        onnxopt.optimize(proto, "quantize(exclude_nodes=conv2;cnov2)", calib="random:8",
                         validate=False)
    with pytest.raises(UserError, match="'add' is no ONNX op type"):
        onnxopt.optimize(proto, "quantize(exclude_ops=add)", calib="random:8", validate=False)
    # An ONNX op type the model does not use is fine: one spec can serve many models.
    _, record = _quantize(proto, "quantize(exclude_ops=LSTM)", calib="random:8")
    assert not any(r.reason.startswith("excluded") for r in record.refusals)


def test_int8_activations_and_reduce_range(tmp_path: Path) -> None:
    model, _ = _quantize(conv_chain(), "fold-bn,quantize(activations=int8,reduce_range=true)")
    for q in _nodes(model, "QuantizeLinear"):
        zp = q.inputs[2].const_value.numpy()
        assert zp.dtype == np.int8
        if _producer_op(q.inputs[0]) in ("Relu", "GlobalAveragePool", "Flatten"):
            assert zp == -128  # never negative: whole int8 range, so a Relu can be dropped
        else:
            assert q.inputs[0].name == "input" and zp == 0  # symmetric
    for conv in _nodes(model, "Conv"):
        weight = conv.inputs[1].producer().inputs[0].const_value.numpy()
        assert np.abs(weight).max() <= 63  # 7-bit weights
    ops = ort_ops(model, tmp_path)
    assert not FLOAT_COMPUTE & set(ops) and ops["QLinearConv"] == 3


@pytest.mark.parametrize("saturates", [True, False])
def test_reduce_range_defaults_to_what_this_cpu_needs(monkeypatch, saturates: bool) -> None:
    import onnxopt.passes.quantize.builder as builder_module

    monkeypatch.setattr(builder_module, "int8_pairs_saturate", lambda: saturates)
    for spec, seven_bits in (("quantize", saturates), ("quantize(reduce_range=true)", True),
                             ("quantize(reduce_range=false)", False)):
        model, record = _quantize(conv_chain(), f"fold-bn,{spec}")
        assert record.stats["reduce_range"] is seven_bits
        assert ("no VNNI" in (record.summary or "")) is (seven_bits and spec == "quantize")
        largest = max(np.abs(c.inputs[1].producer().inputs[0].const_value.numpy()).max()
                      for c in _nodes(model, "Conv"))
        assert largest == (63 if seven_bits else 127)  # per-channel: each scale hits the end


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_range_methods(method: str) -> None:
    proto = conv_chain()
    model, record = _quantize(
        proto, f"fold-bn,quantize(method={method},per_channel=false,fallback=false)")
    assert record.stats["quantized"] == 6  # 3 Conv, GlobalAveragePool, Flatten, Gemm
    feeds = random_feeds(proto, batch=8, seed=3)
    assert sqnr(run_model(proto, feeds)[0], run_model(model, feeds)[0]) > 15.0


# -- refusals --------------------------------------------------------------------------------


def test_conv_with_computed_weight_stays_float_with_a_reason() -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_in"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["y"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
              helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [4, 3, 3, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[w, w2])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = infer_shapes(from_proto(proto))
    feeds = {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32),
             "w_in": numpy_helper.to_array(w)}
    ctx = PassContext(calib=open_feeds([feeds], model))
    result = get_pass("quantize")().run(model, ctx)
    assert result.modified
    first = next(n for n in model.graph if n.op_type == "Conv" and n.outputs[0].name == "y")
    assert all(_producer_op(v) != "DequantizeLinear" for v in first.inputs)
    assert [r.reason for r in result.refusals] == [
        "stays float: weight is not a constant (or is a graph input)"]
    second = next(n for n in model.graph if n.op_type == "Conv" and n is not first)
    assert _producer_op(second.inputs[1]) == "DequantizeLinear"
    ref = run_model(proto, feeds)[0]
    assert sqnr(ref, run_model(model, feeds)[0]) > 30.0


def test_without_calibration_data_nothing_changes() -> None:
    model = from_proto(conv_chain())
    result = get_pass("quantize")().run(model, PassContext())
    assert not result.modified and result.refusals[0].reason == "no calibration data"


def test_manager_requires_calibration_data() -> None:
    with pytest.raises(onnxopt.UserError, match="needs calibration data"):
        onnxopt.optimize(conv_chain(), "quantize")


# -- accuracy tools --------------------------------------------------------------------------


def test_equalization_is_exact_and_balances_channel_ranges() -> None:
    folded, _ = onnxopt.optimize(residual_blocks(), "fold-bn", validate=False)
    before = clone_model(folded)
    result = PassResult(False)
    pairs = equalize(folded.graph, result)
    assert pairs == 2  # first -> second conv of each block (the stem output also feeds an Add)
    feeds = random_feeds(before, batch=4)
    np.testing.assert_allclose(run_model(folded, feeds)[0], run_model(before, feeds)[0],
                               rtol=1e-4, atol=1e-4)

    def spread(model, name):
        conv = next(n for n in model.graph if n.name == name)
        w = np.abs(conv.inputs[1].const_value.numpy()).reshape(conv.inputs[1].shape[0], -1)
        return w.max(axis=1).max() / w.max(axis=1).min()

    assert spread(folded, "conv1") < spread(before, "conv1")


def test_equalization_refuses_relu6() -> None:
    folded, _ = onnxopt.optimize(STRUCTURES["inverted_residual"](), "fold-bn", validate=False)
    result = PassResult(False)
    assert equalize(folded.graph, result) == 0
    assert any("Relu6" in r.reason for r in result.refusals)


def test_bias_correction_removes_the_mean_shift() -> None:
    proto = conv_chain(seed=2)
    feeds = random_feeds(proto, batch=32, seed=7)
    calib = [feeds]
    shifts = {}
    for bc in ("false", "true"):
        model, record = _quantize(
            proto, f"fold-bn,quantize(per_channel=false,bias_correction={bc})", calib=calib)
        ref, got = run_model(proto, feeds)[0], run_model(model, feeds)[0]
        shifts[bc] = float(np.abs((got - ref).mean(axis=0)).mean())
        if bc == "true":
            assert len(record.stats["bias_corrections"]) == 4
    assert shifts["true"] < 0.5 * shifts["false"]


def test_accuracy_fallback_keeps_the_most_sensitive_nodes_float(tmp_path: Path) -> None:
    proto = conv_chain()
    # 7-bit weights: the integer results are the same on every x86 CPU (no saturation)
    spec = ("fold-bn,quantize(per_channel=false,reduce_range=true,target=0.99,max_float_nodes=3,"
            "bias_correction=false)")
    model, record = _quantize(proto, spec, calib="random:32")
    trace = record.stats["fallback"]
    assert trace["score_all_quantized"]["agreement"] < 0.99 and trace["reached"] is True
    assert len(trace["ranking"]) == 3  # the 3 most sensitive of 3 Conv, GlobalAveragePool, Gemm
    kept = record.stats["kept_float"]
    assert len(kept) == trace["probes"][-1]["float_nodes"]
    assert trace["probes"][-1]["agreement"] >= 0.99
    assert sum(r.reason == "kept float by the accuracy fallback" for r in record.refusals) \
        == len(kept)
    # The nodes kept float read float weights in the graph written.
    for label in kept:
        node = next(n for n in model.graph if f"'{n.name}'" in label)
        assert _producer_op(node.inputs[1]) != "DequantizeLinear"
    # what onnxruntime runs is what the fallback measured
    feeds = all_feeds(open_feeds("random:32", from_proto(proto)), proto)
    ref, got = run_model(proto, feeds)[0], run_model(model, feeds)[0]
    assert float(np.mean(ref.argmax(1) == got.argmax(1))) >= 0.99
    # and the kept Conv nodes run in float: no integer kernel re-fused around them
    ops = ort_ops(model, tmp_path)
    kept_convs = sum(label.startswith("Conv") for label in kept)
    assert kept_convs and ops["Conv"] + ops["FusedConv"] >= kept_convs
    assert ops["QLinearConv"] <= 3 - kept_convs


def test_fallback_tries_bias_correction_first_and_keeps_it_when_it_meets_the_target() -> None:
    # the model and target above, with bias correction left to the search (the default)
    proto = conv_chain()
    spec = "fold-bn,quantize(per_channel=false,reduce_range=true,target=0.99,max_float_nodes=3)"
    model, record = _quantize(proto, spec, calib="random:32")
    trace = record.stats["fallback"]
    assert trace["score_all_quantized"]["agreement"] < 0.99
    assert trace["score_bias_corrected"]["agreement"] >= 0.99 and trace["reached"] is True
    assert "probes" not in trace and record.stats["kept_float"] == []
    assert len(record.stats["bias_corrections"]) == 4  # 3 Conv and the Gemm
    assert "bias correction on" in (record.summary or "")
    feeds = all_feeds(open_feeds("random:32", from_proto(proto)), proto)
    ref, got = run_model(proto, feeds)[0], run_model(model, feeds)[0]
    assert float(np.mean(ref.argmax(1) == got.argmax(1))) >= 0.99
    # without it (above) the same target needs float nodes
    _, off = _quantize(proto, spec.replace(")", ",bias_correction=false)"), calib="random:32")
    assert off.stats["kept_float"] and "score_bias_corrected" not in off.stats["fallback"]


def test_mobilenet_per_tensor_with_equalization_and_bias_correction_near_per_channel(
        digits_calib, digits_eval) -> None:
    from testmodels.mobilenet import mobilenet_digits

    calib, evaluation = np.load(digits_calib), np.load(digits_eval)
    proto = mobilenet_digits(calib["input"], calib["labels"])
    accuracy = {}
    for label, options in (("per_channel", "equalize_activations=false"),
                           ("per_channel_equalized", ""), ("per_tensor", "per_channel=false"),
                           ("tools", "per_channel=false,equalize=true,bias_correction=true")):
        # the raw quantizer, without the fallback that would keep nodes float
        model, _ = _quantize(proto, f"fold-bn,quantize({options},report_sqnr=false,"
                                    "fallback=false)", calib=str(digits_calib))
        logits = run_model(model, {"input": evaluation["input"]})[0]
        accuracy[label] = float(np.mean(logits.argmax(1) == evaluation["labels"]))
    assert accuracy["per_tensor"] < accuracy["per_channel"] - 0.05  # the problem is real
    assert accuracy["tools"] >= accuracy["per_channel"] - 0.01
    # activation-range equalization (on by default) does not lose accuracy here
    assert accuracy["per_channel_equalized"] >= accuracy["per_channel"]


def test_pipeline_options_parse() -> None:
    (p,) = onnxopt.parse_pipeline(
        "quantize(method=entropy,exclude_ops=Add;Concat,target=0.99,activations=int8)")
    assert p.options.exclude_ops == ("Add", "Concat") and p.options.target == 0.99
    assert p.options.method == "entropy" and p.options.activations == "int8"
