"""cleanup's simplifications past folding: per-channel affine ops folded into the op before
them, duplicate nodes merged, shape values resolved from static dims."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.ir import to_proto
from onnxopt.pass_base import get_pass
from tests.helpers import apply_pass, assert_same_outputs, op_counts, random_feeds

F = TensorProto.FLOAT
RNG = np.random.default_rng(5)


def _model(nodes: Sequence[onnx.NodeProto], x_shape: Sequence[int | str],
           outputs: Sequence[str], inits: dict[str, np.ndarray], opset: int = 17,
           ) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes), "g", [helper.make_tensor_value_info("x", F, list(x_shape))],
        [helper.make_tensor_value_info(o, F, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model)  # output types get their shapes
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def _cleanup(model: onnx.ModelProto, feeds: dict | None = None, **options: object):
    out, result = apply_pass(get_pass("cleanup")(**options), model)
    assert_same_outputs(model, out, feeds or random_feeds(model))
    _, again = apply_pass(get_pass("cleanup")(**options), out)
    assert not again.modified, again.stats
    return out, result


def _w(*shape: int) -> np.ndarray:
    return RNG.normal(0, 0.5, shape).astype(np.float32)


def test_conv_mul_add_fold_into_the_conv() -> None:
    """``Conv -> Mul([C,1,1]) -> Add([C,1,1]) -> Div(scalar)``: one Conv is left."""
    model = _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]),
         helper.make_node("Mul", ["s", "c"], ["m"]),
         helper.make_node("Add", ["m", "t"], ["a"]),
         helper.make_node("Div", ["a", "d"], ["y"])],
        ["N", 3, 6, 6], ["y"],
        {"w": _w(4, 3, 3, 3), "b": _w(4), "s": _w(4, 1, 1), "t": _w(4, 1, 1),
         "d": np.array(2.5, np.float32)})
    out, result = _cleanup(model)
    assert op_counts(out) == {"Conv": 1}
    assert result.stats["affine_folded"] == 3 and not result.refusals
    assert [o.name for o in to_proto(out).graph.output] == ["y"]


def test_gemm_and_matmul_take_scales_and_shifts() -> None:
    """``Gemm -> Sub([N])``, and a 2-D ``MatMul -> Mul -> Add`` that becomes one Gemm."""
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=1, beta=0.5),
         helper.make_node("Sub", ["g", "t"], ["y0"]),
         helper.make_node("MatMul", ["y0", "v"], ["mm"]),
         helper.make_node("Mul", ["mm", "s"], ["ms"]),
         helper.make_node("Add", ["ms", "u"], ["y"])],
        [3, 5], ["y"],
        {"w": _w(4, 5), "c": _w(3, 4), "t": _w(4), "v": _w(4, 2), "s": _w(1, 2), "u": _w(2)})
    out, result = _cleanup(model)
    assert op_counts(out) == {"Gemm": 2}
    assert result.stats["affine_folded"] == 3


def test_batchnorm_takes_the_scale_after_it_and_fold_bn_then_folds_it() -> None:
    """caffe2-style ``Conv -> BatchNormalization -> Mul -> Add``."""
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
         helper.make_node("Mul", ["n", "s"], ["ns"]),
         helper.make_node("Add", ["ns", "t"], ["y"])],
        ["N", 3, 5, 5], ["y"],
        {"w": _w(4, 3, 1, 1), "g": _w(4), "b": _w(4), "m": _w(4),
         "v": RNG.uniform(0.5, 2, 4).astype(np.float32), "s": _w(4, 1, 1), "t": _w(4, 1, 1)})
    out, result = _cleanup(model)
    assert op_counts(out) == {"Conv": 1, "BatchNormalization": 1}
    folded, _ = apply_pass(get_pass("fold-bn")(), out)
    assert op_counts(folded) == {"Conv": 1}
    assert_same_outputs(model, folded, random_feeds(model))


@pytest.mark.parametrize("case", ["spatial", "other_reader", "zero_divisor", "shared_weight",
                                  "overridable_weight"])
def test_affine_ops_that_must_stay(case: str) -> None:
    inits = {"w": _w(4, 3, 1, 1), "s": _w(4, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["y"])]
    outputs = ["y"]
    refused = None
    if case == "spatial":  # varies over H and W: not per channel
        inits["s"] = _w(4, 5, 5)
    elif case == "other_reader":  # c is also an output: the Mul is no scale of the Conv alone
        outputs.append("c")
    elif case == "zero_divisor":
        nodes[1] = helper.make_node("Div", ["c", "s"], ["y"])
        inits["s"] = np.array([1, 0, 2, 3], np.float32).reshape(4, 1, 1)
        refused = "the divisor has a zero"
    elif case == "shared_weight":
        nodes.append(helper.make_node("Conv", ["x", "w"], ["c2"]))
        outputs.append("c2")
        refused = "is shared with another node"
    model = _model(nodes, ["N", 3, 5, 5], outputs, inits)
    feeds = random_feeds(model)
    if case == "overridable_weight":  # an initializer listed as input: callers may replace it
        model.graph.input.append(helper.make_tensor_value_info("w", F, [4, 3, 1, 1]))
        feeds["w"] = _w(4, 3, 1, 1)
    out, result = _cleanup(model, feeds)
    assert op_counts(out) == op_counts(model)
    assert result.stats["affine_folded"] == 0
    if refused is None:
        assert not result.refusals
    else:
        assert [r.reason for r in result.refusals] == [
            f"not folded into the op before it: {refused}" if case == "zero_divisor" else
            f"not folded into the op before it: weight of Conv -> c {refused}"]


def test_duplicates_with_equal_constants_merge_unequal_ones_stay() -> None:
    w = _w(4, 3, 1, 1)
    model = _model(
        [helper.make_node("Conv", ["x", "w1"], ["c1"]),
         helper.make_node("Conv", ["x", "w2"], ["c2"]),  # same contents as w1
         helper.make_node("Conv", ["x", "w3"], ["c3"]),  # different contents
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Relu", ["c2"], ["r2"]),
         helper.make_node("Sum", ["r1", "r2", "c3"], ["y"])],
        ["N", 3, 5, 5], ["y"], {"w1": w, "w2": w.copy(), "w3": _w(4, 3, 1, 1)})
    out, result = _cleanup(model)
    assert result.stats["duplicates_merged"] == 2  # the Conv, then its Relu
    assert op_counts(out) == {"Conv": 2, "Relu": 1, "Sum": 1}
    assert len(to_proto(out).graph.initializer) == 2  # no weight became shared: w2 is gone


def test_duplicate_graph_outputs_are_kept() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Relu", ["x"], ["y2"])],
        ["N", 3], ["y1", "y2"], {})
    out, result = _cleanup(model)
    assert op_counts(out) == {"Relu": 2} and not result.modified


def _flatten_by_shape(x_shape: Sequence[int | str]) -> onnx.ModelProto:
    """``Reshape(c, Concat(Shape(c)[0:1], Shape(c)[1] * prod(Shape(c)[2:4])))`` after a Conv
    with 4 filters, and ``Shape(c)[1]`` as a float output: exporters' flatten."""
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("Shape", ["c"], ["s"]),
         helper.make_node("Slice", ["s", "zero", "one"], ["batch"]),
         helper.make_node("Gather", ["s", "one_s"], ["ch"]),
         helper.make_node("Unsqueeze", ["ch", "zero"], ["ch1"]),
         helper.make_node("Slice", ["s", "two", "four"], ["hw"]),
         helper.make_node("ReduceProd", ["hw"], ["area"], keepdims=1),
         helper.make_node("Mul", ["ch1", "area"], ["feat"]),
         helper.make_node("Concat", ["batch", "feat"], ["target"], axis=0),
         helper.make_node("Reshape", ["c", "target"], ["y"]),
         helper.make_node("Cast", ["ch1"], ["y_ch"], to=F)],
        x_shape, ["y", "y_ch"],
        {"w": _w(4, 3, 1, 1), "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
         "one_s": np.array(1, np.int64), "two": np.array([2], np.int64),
         "four": np.array([4], np.int64)})


def test_shape_values_resolved_from_static_dims_batch_stays_dynamic() -> None:
    model = _flatten_by_shape(["N", 3, 4, 4])
    feeds = {"x": RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)}
    out, result = _cleanup(model, feeds)
    # y_ch = 4.0 is a graph output: it stays a node, a Constant.
    assert op_counts(out) == {"Conv": 1, "Reshape": 1, "Constant": 1}
    assert result.stats["shapes_resolved"] == 2  # Shape(c)[1] and Shape(c)[2:4]
    assert result.stats["reshape_targets"] == 1
    inits = {i.name: numpy_helper.to_array(i).tolist() for i in to_proto(out).graph.initializer}
    assert [-1, 64] in inits.values()
    for n in (1, 5):
        assert_same_outputs(model, out, {"x": RNG.normal(size=(n, 3, 4, 4)).astype(np.float32)})


def test_shape_values_of_dynamic_dims_stay() -> None:
    """With H and W dynamic only the channel count of ``c`` is known."""
    model = _flatten_by_shape(["N", 3, "H", "W"])
    feeds = {"x": RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)}
    out, result = _cleanup(model, feeds)
    assert op_counts(out) == {"Conv": 1, "Shape": 1, "Slice": 2, "ReduceProd": 1, "Mul": 1,
                              "Concat": 1, "Reshape": 1, "Constant": 1}  # Gather and Cast went
    assert result.stats["shapes_resolved"] == 1 and result.stats["reshape_targets"] == 0
    for size in (3, 6):
        x = RNG.normal(size=(2, 3, size, size)).astype(np.float32)
        assert_same_outputs(model, out, {"x": x})


def test_noop_cast_goes_and_slices_over_other_axes_merge() -> None:
    """``Cast(float->float) -> Slice(axis 0)``, read by two Slices over axis 2 and by one over
    axis 0 again; a Cast to int stays."""
    def bounds(name: str, *values: int) -> dict[str, np.ndarray]:
        return {name: np.array(values, np.int64)}

    model = _model(
        [helper.make_node("Cast", ["x"], ["xc"], to=F),
         helper.make_node("Slice", ["xc", "s0", "e0", "a0"], ["full"]),
         helper.make_node("Slice", ["full", "s1", "e1", "a2", "st"], ["left"]),
         helper.make_node("Slice", ["full", "s2", "e2", "an1"], ["right"]),
         helper.make_node("Slice", ["right", "s1", "e1", "a0"], ["right0"]),
         helper.make_node("Cast", ["left"], ["li"], to=TensorProto.INT32),
         helper.make_node("Cast", ["li"], ["lf"], to=F),
         helper.make_node("Add", ["lf", "right0"], ["y"])],
        [3, 4, 6], ["y"],
        {**bounds("s0", 1), **bounds("e0", 2**63 - 1), **bounds("a0", 0),
         **bounds("s1", 0), **bounds("e1", 2), **bounds("a2", 2), **bounds("st", 1),
         **bounds("s2", 3), **bounds("e2", 5), **bounds("an1", -1)})
    feeds = {"x": (RNG.normal(size=(3, 4, 6)) * 4).astype(np.float32)}
    out, result = _cleanup(model, feeds)
    assert result.stats["casts"] == 1  # the float -> float one; int32 -> float stays
    assert result.stats["slices_merged"] == 1  # "full" into "left" and "right"
    # right0 slices axis 0 again, as "right" did through "full": it stays apart
    assert op_counts(out) == {"Slice": 3, "Cast": 2, "Add": 1}
