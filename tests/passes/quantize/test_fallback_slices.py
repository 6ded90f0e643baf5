"""Tests of the fallback's per-slice SQNR: a small-scale slice of an output (a detector's class
scores beside its pixel boxes) is held to the target on its own; comparable slices are not."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.data import open_feeds
from onnxopt.ir import from_proto
from onnxopt.passes.quantize.fallback import (
    SCALE_SPREAD,
    Targets,
    output_sqnr,
    reference,
    score,
    slice_axes,
)
from onnxopt.session import run_model
from tests.helpers import sqnr


def _boxes_and_scores_model() -> onnx.ModelProto:
    """``y = Concat(box, score)``: a box channel in the hundreds beside a score channel near 1.

    Both read ``a``, whose channel 7 is near 1000 and feeds only the box; the score reads the
    small channels 0-6, which one uint8 range for ``a`` rounds away. The box keeps its SQNR,
    so the SQNR of the whole of ``y`` stays high while the score channel is lost.
    """
    rng = np.random.default_rng(0)
    wa = rng.normal(0, 0.5, (8, 4, 3, 3)).astype(np.float32)
    ba = np.zeros(8, np.float32)
    ba[7] = 1000.0
    wbox = np.zeros((1, 8, 1, 1), np.float32)
    wbox[0, 7] = 0.3
    wbox[0, :7, 0, 0] = rng.normal(0, 0.5, 7)
    wscore = rng.normal(0, 0.5, (1, 8, 1, 1)).astype(np.float32)
    wscore[0, 7] = 0.0
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((wa, "wa"), (ba, "ba"), (wbox, "wbox"), (wscore, "wscore"))]
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
             helper.make_node("Conv", ["ar", "wbox"], ["box"], name="conv_box"),
             helper.make_node("Conv", ["ar", "wscore"], ["score"], name="conv_score"),
             helper.make_node("Concat", ["box", "score"], ["y"], name="concat", axis=1)]
    graph = helper.make_graph(
        nodes, "boxes_scores",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _x(seed: int, n: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4, 8, 8)).astype(np.float32)


def _int8(proto: onnx.ModelProto, calib: np.ndarray) -> ir.Model:
    model, _ = onnxopt.optimize(proto, "quantize(fallback=false)", calib={"x": calib},
                                validate=False)
    return model


def test_small_slice_lost_under_a_large_one_is_caught() -> None:
    proto = _boxes_and_scores_model()
    calib = _x(1)
    int8 = _int8(proto, calib)
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph)
    float_model = from_proto(proto)
    ref = reference(float_model, open_feeds({"x": calib}, float_model), limit=None,
                    batch_size=16, input_shapes=None)
    assert ref.kinds == ["float"]
    got = score(int8, ref)
    # onnxruntime's outputs, measured here: the whole clears the target, the score channel not
    want, out = run_model(proto, {"x": calib})[0], run_model(int8, {"x": calib})[0]
    target = Targets.from_floor(None, None).min_sqnr_db
    whole, box, scores = sqnr(want, out), sqnr(want[:, 0], out[:, 0]), sqnr(want[:, 1],
                                                                           out[:, 1])
    assert whole > target + 10 and box > target + 10 and scores < target
    assert np.sqrt(np.sum(want[:, 0].astype(np.float64) ** 2)) > SCALE_SPREAD * np.sqrt(
        np.sum(want[:, 1].astype(np.float64) ** 2))
    assert got.worst == "y[:, 1]"
    assert abs(got.sqnr_db - scores) < 1e-3
    assert not got.meets(Targets.from_floor(None, None))


def test_default_fallback_keeps_the_small_slice_above_the_target() -> None:
    proto = _boxes_and_scores_model()
    model, report = onnxopt.optimize(proto, "quantize", calib={"x": _x(1)},
                                     eval={"x": _x(3, 32)})
    record = report.records[-1]
    trace = record.stats["fallback"]
    assert trace["score_all_quantized"]["sqnr_worst"] == "y[:, 1]"
    assert trace["score_all_quantized"]["sqnr_db"] < trace["targets"]["sqnr_db"]
    assert not report.failures
    # on other data, through onnxruntime: the score channel now clears the floor
    x = _x(7, 128)
    want, out = run_model(proto, {"x": x})[0], run_model(model, {"x": x})[0]
    assert sqnr(want[:, 1], out[:, 1]) >= 10.0
    # conv_a (the shared range) and conv_score stay float, the box conv stays int8
    assert trace["reached"] is True and record.stats["quantized"] >= 1
    assert set(record.stats["kept_float"]) == {"Conv 'conv_a'", "Conv 'conv_score'"}
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph) >= 1


def test_slices_of_comparable_scale_are_judged_as_a_whole() -> None:
    # the same model with the box channel brought to the scale of the score channel
    proto = _boxes_and_scores_model()
    for init in proto.graph.initializer:
        if init.name == "wbox":
            w = numpy_helper.to_array(init).copy()
            w[0, 7] = 0.0003
            init.CopyFrom(numpy_helper.from_array(w, "wbox"))
    calib = _x(1)
    int8 = _int8(proto, calib)
    float_model = from_proto(proto)
    ref = reference(float_model, open_feeds({"x": calib}, float_model), limit=None,
                    batch_size=16, input_shapes=None)
    got = score(int8, ref)
    want, out = run_model(proto, {"x": calib})[0], run_model(int8, {"x": calib})[0]
    per_slice = [sqnr(want[:, c], out[:, c]) for c in range(2)]
    assert got.worst is None
    assert abs(got.sqnr_db - sqnr(want, out)) < 1e-3
    assert min(per_slice) < got.sqnr_db  # a worst slice exists, and is not what is judged


def test_output_sqnr_rule() -> None:
    noise = np.array([1.0, 1e-4])
    # RMS 1000 beside 1: the small slice (SQNR 40 dB) is worse than the whole (~60 dB)
    db, where = output_sqnr(np.array([1e6, 1.0]), noise)
    assert where == 1 and abs(db - 40.0) < 1e-9
    # RMS 10 beside 1: within the spread, the whole output
    db, where = output_sqnr(np.array([100.0, 1.0]), noise)
    assert where is None and abs(db - 10 * np.log10(101.0 / (1.0 + 1e-4))) < 1e-9
    # a slice without signal does not count, nor does a single slice
    assert output_sqnr(np.array([1e6, 0.0]), noise)[1] is None
    assert output_sqnr(np.array([4.0]), np.array([1.0]))[1] is None


def test_refusal_names_the_slice_below_the_target() -> None:
    proto = _boxes_and_scores_model()
    model, report = onnxopt.optimize(proto, "quantize(max_float_nodes=0)", calib={"x": _x(1)},
                                     eval={"x": _x(3, 32)})
    record = report.records[-1]
    assert record.stats["fallback"]["reached"] is False
    reasons = [r.reason for r in record.refusals if "stays below the quality floor" in r.reason]
    assert reasons and "dB in y[:, 1]" in reasons[0]
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph)  # nothing handed back


def _laid_out(proto: onnx.ModelProto, perm: list[int], dims: list) -> onnx.ModelProto:
    """The same model with ``y`` as ``[N, 2, 64]`` transposed by ``perm`` (dims declared)."""
    graph = proto.graph
    graph.node[-1].output[0] = "y_map"
    graph.initializer.append(numpy_helper.from_array(np.array([0, 2, 64], np.int64), "rows"))
    graph.node.extend([helper.make_node("Reshape", ["y_map", "rows"], ["y_rows"]),
                       helper.make_node("Transpose", ["y_rows"], ["y"], perm=perm)])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, dims))
    return proto


@pytest.mark.parametrize(("perm", "dims", "where", "batch_axis"), [
    ([0, 2, 1], ["N", 64, 2], "y[:, :, 1]", 0),  # class-last: [N, anchors, box + score]
    ([1, 0, 2], [2, "N", 64], "y[1]", 1),        # batch on axis 1, like a recurrent state
])
def test_slices_along_other_axes_and_never_along_the_batch(perm, dims, where,
                                                           batch_axis) -> None:
    proto = _laid_out(_boxes_and_scores_model(), perm, dims)
    calib = _x(1)
    int8 = _int8(proto, calib)
    float_model = from_proto(proto)
    ref = reference(float_model, open_feeds({"x": calib}, float_model), limit=None,
                    batch_size=16, input_shapes=None)
    assert ref.batch_axes == [batch_axis]
    got = score(int8, ref)
    want, out = run_model(proto, {"x": calib})[0], run_model(int8, {"x": calib})[0]
    scores = sqnr(np.take(want, 1, axis=perm.index(1)), np.take(out, 1, axis=perm.index(1)))
    assert got.worst == where
    assert abs(got.sqnr_db - scores) < 1e-3
    assert scores < Targets.from_floor(None, None).min_sqnr_db < sqnr(want, out)


def test_slice_axes() -> None:
    assert slice_axes((8, 22, 2100), 0) == [1]      # [N, 4 + C, anchors]
    assert slice_axes((8, 8400, 85), 0) == [2]      # [N, anchors, 5 + C]
    assert slice_axes((2, 8, 128), 1) == [0, 2]     # a state with the batch on axis 1
    assert slice_axes((8, 16, 40, 40), 0) == [1]    # a map: its channels only
    assert slice_axes((8, 1000), 0) == [1] and slice_axes((8,), 0) == []
