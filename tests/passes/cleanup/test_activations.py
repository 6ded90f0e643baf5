"""cleanup's activation fusion: a hard swish written out as arithmetic becomes one op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.ir import to_proto
from onnxopt.pass_base import get_pass
from onnxopt.session import run_model
from tests.helpers import apply_pass, op_counts

F = TensorProto.FLOAT


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _model(form: str, opset: int, shift: float = 3.0) -> onnx.ModelProto:
    """Conv -> hard swish written out in ``form`` -> Conv; ``y`` also feeds the output."""
    rng = np.random.default_rng(0)
    head = [helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Add", ["y", "three"], ["a"], name="add"),
            helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip")]
    if form == "div":
        body = [helper.make_node("Mul", ["y", "c"], ["m"], name="mul"),
                helper.make_node("Div", ["m", "six"], ["h"], name="hs")]
    elif form == "mul_sixth":
        body = [helper.make_node("Mul", ["c", "y"], ["m"], name="mul"),
                helper.make_node("Mul", ["sixth", "m"], ["h"], name="hs")]
    else:  # the division on the clipped term
        body = [helper.make_node("Div", ["c", "six"], ["g"], name="gate"),
                helper.make_node("Mul", ["y", "g"], ["h"], name="hs")]
    tail = [helper.make_node("Conv", ["h", "w2"], ["out"], pads=[1, 1, 1, 1], name="conv2")]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.8).astype(np.float32), n)
             for n, s in (("w1", (8, 4, 3, 3)), ("w2", (8, 8, 3, 3)))]
    inits += [_scalar("three", shift), _scalar("zero", 0.0), _scalar("six", 6.0),
              _scalar("sixth", 1.0 / 6.0)]
    graph = helper.make_graph(
        head + body + tail, "g",
        [helper.make_tensor_value_info("x", F, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("out", F, ["N", 8, 8, 8]),
         helper.make_tensor_value_info("y", F, ["N", 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((4, 4, 8, 8)).astype(np.float32) * 3}


def _outputs_match(before: onnx.ModelProto, after) -> None:  # noqa: ANN001
    feeds = _feeds()
    for want, got in zip(run_model(before, feeds), run_model(after, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["div", "mul_sixth", "divided_gate"])
def test_each_written_out_form_becomes_one_hard_swish_from_opset_14(form: str) -> None:
    model = _model(form, 17)
    out, result = apply_pass(get_pass("cleanup")(), model)
    assert result.stats["hard_swish_fused"] == 1
    counts = op_counts(out)
    assert counts["HardSwish"] == 1 and counts["Clip"] == counts["Add"] == 0
    assert counts["Mul"] == counts["Div"] == 0
    proto = to_proto(out)
    node = next(n for n in proto.graph.node if n.op_type == "HardSwish")
    assert node.name == "hs" and list(node.input) == ["y"] and list(node.output) == ["h"]
    _outputs_match(model, out)


def test_before_opset_14_it_is_x_times_hard_sigmoid() -> None:
    model = _model("div", 13)
    out, result = apply_pass(get_pass("cleanup")(), model)
    assert result.stats["hard_swish_fused"] == 1
    counts = op_counts(out)
    assert counts["HardSigmoid"] == 1 and counts["Mul"] == 1 and counts["HardSwish"] == 0
    assert counts["Clip"] == counts["Add"] == counts["Div"] == 0
    _outputs_match(model, out)


def test_what_is_not_a_hard_swish_stays() -> None:
    """x + 2 is not the hard swish's shift; a Clip output read twice must stay."""
    shifted = _model("div", 17, shift=2.0)
    out, result = apply_pass(get_pass("cleanup")(), shifted)
    assert result.stats["hard_swish_fused"] == 0 and op_counts(out)["Clip"] == 1
    _outputs_match(shifted, out)

    shared = _model("div", 17)
    graph = shared.graph
    graph.output.append(helper.make_tensor_value_info("c", F, ["N", 8, 8, 8]))
    out, result = apply_pass(get_pass("cleanup")(), shared)
    assert result.stats["hard_swish_fused"] == 0 and op_counts(out)["Clip"] == 1
    _outputs_match(shared, out)

    off = _model("div", 17)
    out, result = apply_pass(get_pass("cleanup")(fuse_activations=False), off)
    assert "hard_swish_fused" not in result.stats or result.stats["hard_swish_fused"] == 0
    assert op_counts(out)["Clip"] == 1


def test_the_pass_manager_keeps_it_as_exact() -> None:
    """Validated by onnxruntime against the model's own noise floor, like every exact pass."""
    import onnxopt

    model = _model("div", 13)
    out, report = onnxopt.optimize(model, "cleanup", calib=_feeds())
    record = report.records[0]
    assert record.status == "kept", record.message
    assert record.stats["hard_swish_fused"] == 1
    _outputs_match(model, out)
