"""quantize on old opsets (upgraded by the version converter) and without leftover float weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt
from onnxopt.ir import to_proto
from onnxopt.model_io import load, save, serialized_size
from onnxopt.session import run_model
from testmodels.old_opsets import conv_relu_gemm, conv_then_scan8
from tests.helpers import assert_same_outputs, ort_ops, random_feeds


def _quantize(proto: onnx.ModelProto, spec: str = "quantize"):
    """``spec`` through the manager (validated on the calibration data); the last record."""
    model, report = onnxopt.optimize(proto, spec, calib="random:32")
    return model, report.records[-1]


def _sqnr_db(proto: onnx.ModelProto, model) -> float:
    feeds = random_feeds(proto, batch=8, seed=5)
    ref = run_model(proto, feeds)[0].astype(np.float64)
    got = run_model(model, feeds)[0].astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((got - ref) ** 2)))



def _weight_dequantizers(model) -> list:
    return [n for n in model.graph if n.op_type == "DequantizeLinear"
            and n.inputs[0].const_value is not None
            and n.inputs[0].const_value.dtype == onnx.TensorProto.INT8]


def _float_constants(model) -> list[str]:
    proto = to_proto(model)
    names = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
             and len(t.dims) > 1]
    return names + [n.output[0] for n in proto.graph.node if n.op_type == "Constant"
                    and n.attribute[0].t.data_type == onnx.TensorProto.FLOAT
                    and len(n.attribute[0].t.dims) > 1]


@pytest.mark.parametrize("opset", [9, 11, 12])
def test_old_opsets_are_upgraded_to_13_for_per_channel_weights(opset: int, tmp_path) -> None:
    proto = conv_relu_gemm(opset)
    model, record = _quantize(proto)
    assert record.status == "kept", record.message
    assert record.stats["opset_upgraded"] == {"from": opset, "to": 13}
    assert record.summary.startswith(f"opset {opset} -> 13 by onnx's version converter "
                                     "(per-channel weight scales need 13)")
    assert model.opset_imports[""] == 13 and not record.refusals
    weights = _weight_dequantizers(model)
    assert len(weights) == 2 and all(n.attributes["axis"].value in (0, 1) for n in weights)
    assert all(n.inputs[1].const_value.shape[0] > 1 for n in weights)  # per channel
    ops = ort_ops(model, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1 and ops["Conv"] == ops["Gemm"] == 0
    assert _sqnr_db(proto, model) > 25


def test_per_tensor_weights_upgrade_only_to_10(tmp_path) -> None:
    proto = conv_relu_gemm(9)
    model, record = _quantize(proto, "quantize(per_channel=false)")
    assert record.status == "kept", record.message
    assert record.stats["opset_upgraded"] == {"from": 9, "to": 10}
    assert "opset 9 -> 10 by onnx's version converter (QuantizeLinear needs 10)" in record.summary
    assert model.opset_imports[""] == 10
    dequantizers = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    # opset 10 has no axis; the biases' scales are scalars like their weights' scales
    assert dequantizers and all("axis" not in n.attributes for n in dequantizers)
    assert ort_ops(model, tmp_path)["QLinearConv"] == 1
    assert _sqnr_db(proto, model) > 20


def test_refuses_when_the_converter_cannot_reach_opset_10() -> None:
    proto = conv_then_scan8()
    model, record = _quantize(proto)
    assert record.status == "unchanged"
    reasons = [r.reason for r in record.refusals]
    assert len(reasons) == 2 and all("\n" not in r for r in reasons)
    assert reasons[0].startswith("per-channel weights need opset 13, cannot convert opset 8 to "
                                 "13: Scan has no conversion")
    assert reasons[1].startswith("QuantizeLinear needs opset 10, cannot convert opset 8 to 10: "
                                 "Scan has no conversion")
    assert model.opset_imports[""] == 8
    assert_same_outputs(proto, model, random_feeds(proto), rtol=0, atol=0)


@pytest.mark.parametrize("opset", [11, 13])
def test_float_weights_in_constant_nodes_are_removed(opset: int, tmp_path) -> None:
    proto = conv_relu_gemm(opset, weights="constant", width=32)
    assert len(_float_constants(load(proto))) == 2
    model, record = _quantize(proto)
    assert record.status == "kept", record.message
    assert record.stats["float_constants_removed"] == 4  # weights and biases of Conv and Gemm
    assert not _float_constants(model)
    assert not [n for n in model.graph if n.op_type == "Constant"]
    size = record.stats["size_bytes"]
    assert size["after"] == serialized_size(model) < 0.4 * size["before"]
    original, quantized = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(proto, original)
    save(model, quantized)
    assert quantized.stat().st_size < 0.4 * original.stat().st_size
    assert _sqnr_db(proto, model) > 25


def test_a_float_weight_read_elsewhere_stays() -> None:
    proto = conv_relu_gemm(13, weights="constant")
    proto.graph.node.append(helper.make_node("ReduceSum", ["w"], ["w_sum"], keepdims=0))
    proto.graph.output.append(helper.make_tensor_value_info("w_sum", onnx.TensorProto.FLOAT, []))
    model, record = _quantize(proto)
    assert record.status == "kept", record.message
    assert record.stats["float_constants_removed"] == 3
    assert _float_constants(model) == ["w"]
    feeds = random_feeds(proto)
    assert np.array_equal(run_model(proto, feeds)[1], run_model(model, feeds)[1])
