"""Tests of the HardSwish split: an int8 product between int8 convs, joined back when float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.ir import from_proto, to_proto
from onnxopt.passes.quantize.hard_swish import join_hard_swish, split_hard_swish
from onnxopt.session import run_model
from tests.helpers import op_counts, ort_ops, sqnr


def hard_swish_model(last_activation: bool = True) -> onnx.ModelProto:
    """Conv -> HardSwish -> Conv, MobileNetV3 style, and a second HardSwish as the graph
    output when ``last_activation``."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float32), n)
               for n, s in (("w1", (8, 4, 3, 3)), ("w2", (8, 8, 3, 3)))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("HardSwish", ["y"], ["h"], name="act1"),
        helper.make_node("Conv", ["h", "w2"], ["z" if last_activation else "out"],
                         pads=[1, 1, 1, 1], name="conv2"),
    ]
    if last_activation:
        nodes.append(helper.make_node("HardSwish", ["z"], ["out"], name="act2"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 8, 8])],
        initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def hard_swish_feeds(seed: int, n: int = 32) -> dict[str, np.ndarray]:
    """Standard-normal inputs for :func:`hard_swish_model`."""
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)}


def _quantize(model: onnx.ModelProto, options: str = ""):
    out, report = onnxopt.optimize(model, f"quantize(fallback=false{options})",
                                   calib=hard_swish_feeds(0), validate=False)
    record = report.records[-1]
    assert record.status == "kept", record.message
    return out, record


def test_split_and_join_give_back_the_model_and_the_same_outputs() -> None:
    model = hard_swish_model()
    work = from_proto(model)
    made = split_hard_swish(work.graph)
    assert made == ["act1", "act2"]
    split = to_proto(work)
    onnx.checker.check_model(split, full_check=True)
    assert op_counts(split) == {"Conv": 2, "HardSigmoid": 2, "Mul": 2}
    feeds = hard_swish_feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(split, feeds)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert join_hard_swish(work.graph, made) == 2
    back = to_proto(work)
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in back.graph.node] == \
        [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node]


def test_the_hard_swish_between_two_int8_convs_is_an_integer_product(tmp_path: Path) -> None:
    model = hard_swish_model()
    quantized, record = _quantize(model)
    assert record.stats["hard_swish_split"] == 1
    # act1 sits between two int8 convs: its product is quantized; act2 is the graph output
    # (no int8 reader), so it stays float and is joined back into one HardSwish
    proto = quantized if isinstance(quantized, onnx.ModelProto) else to_proto(quantized)
    by_name = {n.name: n.op_type for n in proto.graph.node}
    assert by_name["act1"] == "Mul" and by_name["act2"] == "HardSwish"
    assert op_counts(proto)["HardSigmoid"] == 1
    ops = ort_ops(quantized, tmp_path)  # onnxruntime runs act2 as its function body, in float
    assert ops["QLinearConv"] == 2 and ops["QLinearMul"] == 1 and ops["Mul"] == 1
    feeds = hard_swish_feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert sqnr(ref, got) > 25.0


def test_an_excluded_hard_swish_is_joined_back_and_stays_float(tmp_path: Path) -> None:
    model = hard_swish_model()
    quantized, record = _quantize(model, ",exclude_nodes=act1")
    assert "hard_swish_split" not in record.stats
    assert ort_ops(quantized, tmp_path)["QLinearMul"] == 0
    proto = quantized if isinstance(quantized, onnx.ModelProto) else to_proto(quantized)
    assert op_counts(proto)["HardSigmoid"] == 0  # nothing split is left
    assert {n.name: n.op_type for n in proto.graph.node}["act1"] == "HardSwish"
    feeds = hard_swish_feeds(1)
    (ref,), (got,) = run_model(model, feeds), run_model(quantized, feeds)
    assert sqnr(ref, got) > 25.0
    excluded, _ = _quantize(model, ",exclude_ops=HardSwish")
    assert ort_ops(excluded, tmp_path)["QLinearMul"] == 0
