"""Split keeps its input's int8 parameters on every output, so onnxruntime runs it on int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.session import run_model
from tests.helpers import ort_ops, random_feeds, sqnr


def _c2f_model() -> onnx.ModelProto:
    """A YOLOv8 C2f block: Conv -> Split in two halves -> Conv on the second half ->
    Concat of both halves and that Conv's output -> Conv."""
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32),
                                       name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="cv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="act1"),
        helper.make_node("Split", ["r1", "halves"], ["a", "b"], axis=1, name="split"),
        helper.make_node("Conv", ["b", "w2"], ["c2"], pads=[1, 1, 1, 1], name="m"),
        helper.make_node("Concat", ["a", "b", "c2"], ["cat"], axis=1, name="cat"),
        helper.make_node("Conv", ["cat", "w3"], ["y"], name="cv2"),
    ]
    graph = helper.make_graph(
        nodes, "c2f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])],
        initializer=[weight("w1", (8, 4, 1, 1)), weight("w2", (4, 4, 3, 3)),
                     weight("w3", (8, 12, 1, 1)),
                     numpy_helper.from_array(np.array([4, 4], np.int64), "halves")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _quantize(proto: onnx.ModelProto, spec: str):
    model, report = onnxopt.optimize(proto, spec, calib="random:32", validate=False)
    assert report.records[-1].status == "kept", report.records[-1].message
    return model


def _split_io_producers(folder: Path, model) -> tuple[str, list[str]]:
    """In onnxruntime's optimized graph: the op making the Split's input, and the ops
    reading its outputs."""
    path = folder / "optimized.onnx"
    from onnxopt.session import make_session
    make_session(model, optimized_path=str(path))
    graph = onnx.load(path).graph
    (split,) = [n for n in graph.node if n.op_type == "Split"]
    producer = next(n.op_type for n in graph.node if split.input[0] in n.output)
    readers = sorted(n.op_type for n in graph.node if set(n.input) & set(split.output))
    return producer, readers


def test_split_outputs_share_the_input_parameters_and_run_on_int8(tmp_path: Path) -> None:
    proto = _c2f_model()
    model = _quantize(proto, "quantize")
    (split,) = [n for n in model.graph if n.op_type == "Split"]
    source = split.inputs[0].producer()
    assert source.op_type == "DequantizeLinear"
    quantizers = [u.node for out in split.outputs for u in out.uses()
                  if u.node.op_type == "QuantizeLinear"]
    assert len(quantizers) == 2  # one per output
    for q in quantizers:  # the very scale and zero point of the input's pair
        assert q.inputs[1] is source.inputs[1] and q.inputs[2] is source.inputs[2]
    # onnxruntime drops the pairs: the Split moves int8 from one integer kernel to the next
    producer, readers = _split_io_producers(tmp_path, model)
    assert producer == "QLinearConv"
    assert readers == ["QLinearConcat", "QLinearConv"]
    ops = ort_ops(model, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QLinearConcat"] == 1
    feeds = random_feeds(proto, batch=8)
    assert sqnr(run_model(proto, feeds)[0], run_model(model, feeds)[0]) > 25.0


@pytest.mark.parametrize("spec", ["quantize(exclude_ops=Split)",
                                  "quantize(exclude_nodes=split)"])
def test_excluded_split_runs_float_between_conversions(tmp_path: Path, spec: str) -> None:
    proto = _c2f_model()
    model = _quantize(proto, spec)
    (split,) = [n for n in model.graph if n.op_type == "Split"]
    assert split.inputs[0].producer().op_type == "DequantizeLinear"
    producer, readers = _split_io_producers(tmp_path, model)
    assert producer == "DequantizeLinear"  # float Split, converted on both sides
    assert "QuantizeLinear" in readers
    feeds = random_feeds(proto, batch=8)
    assert sqnr(run_model(proto, feeds)[0], run_model(model, feeds)[0]) > 25.0
