"""Tests of activation-range equalization: exactness, equal ranges, refusals, int8 effect."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.data import open_feeds
from onnxopt.ir import clone_model, from_proto
from onnxopt.pass_base import PassResult
from onnxopt.passes.quantize.equalize import channel_ranges, equalize_activations
from onnxopt.session import run_model
from tests.helpers import random_feeds, sqnr

#: Output-channel gains of the first conv: its channels span three decades.
GAINS = np.array([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 0.05], np.float32)


def _pair_model(between: str = "Relu", second_reader: bool = False,
                depthwise: bool = True, balanced: bool = False) -> onnx.ModelProto:
    """x -> Conv (8 channels of very different size) -> ``between`` -> Conv -> Sigmoid -> Conv.

    With ``balanced`` the second conv undoes the gains, so every channel matters to ``y``.
    """
    rng = np.random.default_rng(0)
    c = len(GAINS)
    w1 = rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * GAINS[:, None, None, None]
    b1 = rng.standard_normal(c).astype(np.float32) * GAINS * 0.1
    w2 = (rng.standard_normal((c, 1, 3, 3)) if depthwise
          else rng.standard_normal((c, c, 1, 1))).astype(np.float32)
    if balanced:
        w2 = (w2 / GAINS[None, :, None, None] if not depthwise
              else w2 / GAINS[:, None, None, None])
    w3 = rng.standard_normal((4, c, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1] * 4)]
    mid = "a"
    if between:
        nodes.append(helper.make_node(between, ["a"], ["m"], name="act"))
        mid = "m"
    nodes.append(helper.make_node("Conv", [mid, "w2"], ["d"], name="conv2", pads=[1] * 4,
                                  group=c if depthwise else 1))
    nodes.append(helper.make_node("Sigmoid", ["d"], ["e"], name="gate"))  # no second pair
    nodes.append(helper.make_node("Conv", ["e", "w3"], ["y"], name="conv3"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_reader:
        outputs.append(helper.make_tensor_value_info(mid, TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _equalized(proto: onnx.ModelProto, **kwargs) -> tuple:
    model = from_proto(proto)
    before = clone_model(model)
    source = open_feeds("random:16", model)
    result = PassResult(False)
    pairs = equalize_activations(model, result, source, batch_size=8, limit=None,
                                 input_shapes=None, **kwargs)
    return before, model, pairs, result, source


def _spread(model, source) -> float:
    conv2 = next(n for n in model.graph if n.name == "conv2")
    name = conv2.inputs[0].name
    r = channel_ranges(model, [name], source, batch_size=8, limit=None, input_shapes=None)[name]
    return float(r.max() / r.min())


@pytest.mark.parametrize("depthwise", [True, False])
def test_exact_in_float_and_ranges_made_equal(depthwise: bool) -> None:
    before, after, pairs, _, source = _equalized(_pair_model(depthwise=depthwise),
                                                 max_scale=1e6)
    assert pairs == 1
    conv1 = next(n for n in after.graph if n.name == "conv1")
    assert conv1.inputs[1].name != "w1" and conv1.inputs[2].name != "b1"  # new weights
    assert [n.op_type for n in after.graph] == [n.op_type for n in before.graph]
    feeds = random_feeds(before, batch=4, seed=3)
    np.testing.assert_allclose(run_model(after, feeds)[0], run_model(before, feeds)[0],
                               rtol=1e-4, atol=1e-4)
    spread_before, spread_after = _spread(before, source), _spread(after, source)
    assert spread_before > 100
    if depthwise:  # the factors are the full ratios: equal up to rounding
        assert spread_after < 1.01
    else:  # their square roots
        assert spread_after == pytest.approx(np.sqrt(spread_before), rel=0.01)


def test_factors_are_capped() -> None:
    _, after, pairs, _, source = _equalized(_pair_model(), max_scale=4.0)
    assert pairs == 1
    w1 = next(n for n in after.graph if n.name == "conv1").inputs[1].const_value.numpy()
    w1_old = _pair_model().graph.initializer[0]
    ratio = np.abs(w1).reshape(8, -1).max(1) / np.abs(
        numpy_helper.to_array(w1_old)).reshape(8, -1).max(1)
    assert ratio.min() == pytest.approx(1.0) and ratio.max() == pytest.approx(4.0)


@pytest.mark.parametrize(("between", "reader"), [("HardSwish", False), ("Sigmoid", False),
                                                 ("Relu", True)])
def test_refuses_non_homogeneous_op_or_second_reader(between: str, reader: bool) -> None:
    before, after, pairs, _, _ = _equalized(_pair_model(between, second_reader=reader))
    assert pairs == 0
    for a, b in zip(before.graph, after.graph, strict=True):
        assert [v.name for v in a.inputs] == [v.name for v in b.inputs]


def test_quantize_option_rescales_and_improves_int8() -> None:
    proto = _pair_model(balanced=True)
    feeds = random_feeds(proto, batch=4, seed=5)
    ref = run_model(from_proto(proto), feeds)[0]
    out = {}
    for flag in ("false", "true"):
        model, report = onnxopt.optimize(
            proto, f"quantize(fallback=false,equalize_activations={flag})", calib="random:32",
            validate=False)
        record = report.records[-1]
        assert record.status == "kept", record.message
        assert record.stats.get("activation_equalized_pairs", 0) == (flag == "true")
        assert sum(n.op_type == "QuantizeLinear" for n in model.graph) >= 3
        out[flag] = sqnr(ref, run_model(model, feeds)[0])
    assert out["true"] > out["false"] + 10  # dB: the small channels were rounded to nothing


def test_quantize_option_needs_per_channel_weights() -> None:
    _, report = onnxopt.optimize(
        _pair_model(), "quantize(fallback=false,per_channel=false,equalize_activations=true)",
        calib="random:8", validate=False)
    record = report.records[-1]
    assert "activation_equalized_pairs" not in (record.stats or {})
    assert any("per-channel" in r.reason for r in record.refusals)


def test_quantize_leaves_the_weights_alone_when_it_quantizes_nothing() -> None:
    proto = _pair_model()
    # no int8 model can be faster than a millionth of the float one: nothing is quantized
    model, report = onnxopt.optimize(proto, "quantize(fallback=false,max_latency=0.000001)",
                                     calib="random:16", validate=False)
    record = report.records[-1]
    assert any("max_latency" in r.reason for r in record.refusals)
    assert "activation_equalized_pairs" not in (record.stats or {})
    before = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    conv1 = next(n for n in model.graph if n.name == "conv1")
    assert conv1.inputs[1].name == "w1"
    np.testing.assert_array_equal(conv1.inputs[1].const_value.numpy(), before["w1"])
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)
