"""Tests of the ``cleanup`` pass: structure after the rewrite and numerics through onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.ir import from_proto, to_proto
from onnxopt.pass_base import PassContext, get_pass
from testmodels import STRUCTURES
from tests.helpers import apply_pass, assert_same_outputs, op_counts, random_feeds

F = TensorProto.FLOAT


def _cleanup(**options: object):
    return get_pass("cleanup")(**options)


def _model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
           outputs: Sequence[onnx.ValueInfoProto],
           initializers: Sequence[onnx.TensorProto] = (), opset: int = 17,
           ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs),
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _vi(name: str, shape: Sequence[int | str], elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _run_checked(model: onnx.ModelProto, feeds: dict | None = None, **options: object):
    """Apply cleanup, check numerics and that a second run changes nothing."""
    out, result = apply_pass(_cleanup(**options), model)
    assert_same_outputs(model, out, feeds if feeds is not None else random_feeds(model))
    _, again = apply_pass(_cleanup(**options), out)
    assert again.modified is False, again.stats
    return out, result


def _output_names(model) -> list[str]:
    return [o.name for o in to_proto(model).graph.output]


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_structures_are_already_clean(name: str) -> None:
    model = STRUCTURES[name]()
    out, result = _run_checked(model)
    assert result.modified is False, result.stats
    assert op_counts(out) == op_counts(model)


def test_identity_chain_removed() -> None:
    model = _model(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("Identity", ["b"], ["c"]), helper.make_node("Sigmoid", ["c"], ["y"])],
        [_vi("x", [2, 3])], [_vi("y", [2, 3])])
    out, result = _run_checked(model)
    assert op_counts(out) == {"Relu": 1, "Sigmoid": 1}
    assert result.stats["identities"] == 2 and result.modified


def test_identity_graph_output_keeps_name() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["out1"]),
         helper.make_node("Sigmoid", ["r"], ["out2"])],
        [_vi("x", [2, 3])], [_vi("out1", [2, 3]), _vi("out2", [2, 3])])
    out, result = _run_checked(model)
    assert "Identity" not in op_counts(out)
    assert _output_names(out) == ["out1", "out2"]
    proto = to_proto(out)
    assert proto.graph.node[0].op_type == "Relu" and proto.graph.node[0].output[0] == "out1"
    assert proto.graph.node[1].input[0] == "out1"
    assert result.stats["identities"] == 1


def test_identity_from_graph_input_to_output_is_kept() -> None:
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])])
    out, result = _run_checked(model)
    assert op_counts(out) == {"Identity": 1}
    assert result.modified is False
    assert len(result.refusals) == 1 and "graph output" in result.refusals[0].reason


def _dropout_model(training: bool | None = None, mask_used: bool = False) -> onnx.ModelProto:
    inputs = ["x", "ratio"] + (["training"] if training is not None else [])
    outputs = ["d", "mask"] if mask_used else ["d"]
    inits = [_init("ratio", np.array(0.5, np.float32))]
    if training is not None:
        inits.append(_init("training", np.array(training)))
    graph_outputs = [_vi("y", [2, 3])] + ([_vi("mask", [2, 3], TensorProto.BOOL)]
                                          if mask_used else [])
    return _model(
        [helper.make_node("Dropout", inputs, outputs), helper.make_node("Relu", ["d"], ["y"])],
        [_vi("x", [2, 3])], graph_outputs, inits)


def test_dropout_removed() -> None:
    model = _dropout_model(training=False)
    out, result = _run_checked(model)
    assert op_counts(out) == {"Relu": 1}
    assert result.stats["dropouts"] == 1
    assert result.stats["initializers_removed"] == 2
    assert not to_proto(out).graph.initializer


@pytest.mark.parametrize(("training", "mask_used", "reason"), [
    (True, False, "kept: training_mode is true"),
    (None, True, "kept: its mask output is used"),
])
def test_dropout_kept(training: bool | None, mask_used: bool, reason: str) -> None:
    model = _dropout_model(training=training, mask_used=mask_used)
    out, result = apply_pass(_cleanup(), model)
    assert op_counts(out)["Dropout"] == 1
    assert result.modified is False
    assert [r.reason for r in result.refusals] == [reason]
    if not training:
        assert_same_outputs(model, out, random_feeds(model))


def test_dead_branch_removed() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Mul", ["x", "w"], ["m"]),
         helper.make_node("Exp", ["m"], ["unused"])],
        [_vi("x", [2, 3])], [_vi("y", [2, 3])], [_init("w", np.ones((2, 3), np.float32))])
    out, result = _run_checked(model)
    assert op_counts(out) == {"Relu": 1}
    assert result.stats["dead_nodes"] == 2
    assert result.stats["initializers_removed"] == 1


def test_constant_add_folded() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = _model(
        [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Mul", ["x", "c"], ["y"])],
        [_vi("x", [2, 3])], [_vi("y", [2, 3])],
        [_init("a", a), _init("b", np.full((2, 3), 0.5, np.float32))])
    out, result = _run_checked(model)
    assert op_counts(out) == {"Mul": 1}
    assert result.stats["folded"] == 1
    inits = {i.name: numpy_helper.to_array(i) for i in to_proto(out).graph.initializer}
    assert list(inits) == ["c"]
    np.testing.assert_array_equal(inits["c"], a + 0.5)


def test_shape_gather_on_static_input_folded() -> None:
    # The export idiom Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])).
    model = _model(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
         helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
         helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
         helper.make_node("Reshape", ["x", "target"], ["y"])],
        [_vi("x", [2, 3, 4])], [_vi("y", [2, 12])],
        [_init("zero", np.array(0, np.int64)), _init("axes", np.array([0], np.int64)),
         _init("minus_one", np.array([-1], np.int64))])
    out, result = _run_checked(model)
    assert op_counts(out) == {"Reshape": 1}
    assert result.stats["folded"] == 4
    inits = {i.name: numpy_helper.to_array(i) for i in to_proto(out).graph.initializer}
    np.testing.assert_array_equal(inits["target"], [2, -1])


def test_shape_of_dynamic_input_not_folded() -> None:
    model = _model(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Reshape", ["x", "s"], ["y"])],
        [_vi("x", ["N", "M"])], [_vi("y", ["N", "M"])])
    out, result = _run_checked(model)
    assert op_counts(out) == {"Shape": 1, "Reshape": 1}
    assert result.modified is False


@pytest.mark.parametrize("declared", [-1, "N"])
def test_reshape_target_with_one_dynamic_entry_becomes_minus_one(declared) -> None:
    """``Reshape(x, Shape(x))`` with ``x [N, 3]``: the target is ``[-1, 3]`` for every N; a
    declared ``-1`` dim is dynamic too (Shape must not fold to ``-1``)."""
    model = _model(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Reshape", ["x", "s"], ["y"])],
        [_vi("x", [declared, 3])], [_vi("y", [declared, 3])])
    out, result = _run_checked(model, {"x": np.ones((2, 3), np.float32)})
    assert op_counts(out) == {"Reshape": 1}
    assert result.stats["reshape_targets"] == 1 and result.stats["folded"] == 0
    inits = {i.name: numpy_helper.to_array(i) for i in to_proto(out).graph.initializer}
    assert [a.tolist() for a in inits.values()] == [[-1, 3]]
    for n in (1, 5):  # the batch stays dynamic
        x = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
        assert_same_outputs(model, out, {"x": x})


def test_dequantize_and_large_results_not_folded() -> None:
    q = np.arange(-4, 4, dtype=np.int8)
    model = _model(
        [helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["w"]),
         helper.make_node("Add", ["a", "a"], ["b"]),
         helper.make_node("Add", ["w", "b"], ["wb"]),
         helper.make_node("Mul", ["x", "wb"], ["y"])],
        [_vi("x", [8])], [_vi("y", [8])],
        [_init("q", q), _init("scale", np.array(0.1, np.float32)),
         _init("zp", np.array(0, np.int8)), _init("a", np.ones(8, np.float32))])
    out, result = _run_checked(model, max_fold_elements=4)
    assert op_counts(out) == op_counts(model)
    assert result.stats["fold_skipped"] == {"quantization": 1, "too_large": 1}
    assert result.modified is False


def test_old_ir_initializer_inputs() -> None:
    """IR 3: every initializer is an overridable input, never folded; unread ones go."""
    model = _model(
        [helper.make_node("Add", ["w", "one"], ["w1"]),
         helper.make_node("Mul", ["x", "w1"], ["y"])],
        [_vi("x", [2, 3]), _vi("w", [2, 3]), _vi("one", [2, 3]), _vi("spare", [4]),
         _vi("unread", [4])],
        [_vi("y", [2, 3])],
        [_init("w", np.full((2, 3), 2.0, np.float32)), _init("one", np.ones((2, 3), np.float32)),
         _init("spare", np.zeros(4, np.float32))],
        opset=9, ir_version=3)
    out, result = _run_checked(model)
    proto = to_proto(out)
    assert [i.name for i in proto.graph.input] == ["x", "w", "one", "unread"]
    assert sorted(i.name for i in proto.graph.initializer) == ["one", "w"]
    assert op_counts(out) == {"Add": 1, "Mul": 1}
    assert result.stats["inputs_removed"] == 1 and result.stats["folded"] == 0
    # The overridable weight still works when fed.
    feeds = {"x": np.ones((2, 3), np.float32), "w": np.zeros((2, 3), np.float32),
             "unread": np.zeros(4, np.float32)}
    assert_same_outputs(model, out, feeds)


def test_overridable_initializer_not_folded() -> None:
    """IR >= 4 with a weight listed as input: that weight is not a constant; the other is."""
    model = _model(
        [helper.make_node("Add", ["w", "one"], ["w1"]), helper.make_node("Neg", ["one"], ["m"]),
         helper.make_node("Mul", ["x", "w1"], ["p"]), helper.make_node("Add", ["p", "m"], ["y"])],
        [_vi("x", [2, 3]), _vi("w", [2, 3])], [_vi("y", [2, 3])],
        [_init("w", np.full((2, 3), 2.0, np.float32)), _init("one", np.ones((2, 3), np.float32))])
    out, result = _run_checked(model)
    assert op_counts(out) == {"Add": 2, "Mul": 1}
    assert result.stats["folded"] == 1
    assert [i.name for i in to_proto(out).graph.input] == ["x", "w"]
    feeds = {"x": np.ones((2, 3), np.float32), "w": np.full((2, 3), -3.0, np.float32)}
    assert_same_outputs(model, out, feeds)


def _branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [_vi(output, [2])])


def test_subgraph_identity_removed_and_dead_if_dropped() -> None:
    then_branch = _branch("then", [helper.make_node("Identity", ["r"], ["t0"]),
                                   helper.make_node("Neg", ["t0"], ["t"])], "t")
    else_branch = _branch("else", [helper.make_node("Exp", ["r"], ["e"])], "e")
    dead_branch = _branch("dead", [helper.make_node("Abs", ["only_dead"], ["d"])], "d")
    model = _model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Sigmoid", ["x"], ["only_dead"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch),
         helper.make_node("If", ["c"], ["z"], then_branch=dead_branch, else_branch=dead_branch)],
        [_vi("x", [2]), _vi("c", [], TensorProto.BOOL)], [_vi("y", [2])])
    for cond in (True, False):
        feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(cond)}
        out, result = _run_checked(model, feeds)
    assert op_counts(out) == {"Relu": 1, "If": 1}
    assert result.stats["identities"] == 1
    assert result.stats["dead_nodes"] == 2
    assert result.stats["subgraphs_skipped"] == 2
    then_nodes = to_proto(out).graph.node[1].attribute[0].g.node
    assert [n.op_type for n in then_nodes] in (["Neg"], ["Exp"])


def test_unsorted_graph_is_sorted() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])]
    graph = helper.make_graph(nodes[::-1], "g", [_vi("x", [2])], [_vi("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    work = from_proto(model)
    result = _cleanup().run(work, PassContext())
    assert result.modified and result.stats["reordered"] == 1
    assert [n.op_type for n in to_proto(work).graph.node] == ["Relu", "Neg"]
    onnx.checker.check_model(to_proto(work))


def test_body_output_identity_and_constant_node_input() -> None:
    """A body output fed by a body node is renamed; one fed from outer scope stays."""
    then_branch = _branch("then", [helper.make_node("Neg", ["r"], ["t0"]),
                                   helper.make_node("Identity", ["t0"], ["t"])], "t")
    else_branch = _branch("else", [helper.make_node("Identity", ["r"], ["e"])], "e")
    k = helper.make_tensor("k", TensorProto.INT64, [2], [2, 3])
    model = _model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Constant", [], ["k"], value=k),
         helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
         helper.make_node("If", ["c"], ["y0"], then_branch=then_branch, else_branch=else_branch),
         helper.make_node("Mul", ["y0", "kf"], ["y"])],
        [_vi("x", [2]), _vi("c", [], TensorProto.BOOL)], [_vi("y", [2])])
    for cond in (True, False):
        feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(cond)}
        out, result = _run_checked(model, feeds)
    assert op_counts(out) == {"Relu": 1, "If": 1, "Mul": 1}
    # The Constant is lifted to an initializer first, so it is no dead node once Cast folds.
    assert (result.stats["constants_lifted"], result.stats["identities"], result.stats["folded"],
            result.stats["dead_nodes"]) == (1, 1, 1, 0)
    branches = {a.name: a.g for a in to_proto(out).graph.node[1].attribute}
    assert [(n.op_type, n.output[0]) for n in branches["then_branch"].node] == [("Neg", "t")]
    assert [n.op_type for n in branches["else_branch"].node] == ["Identity"]
    assert [r.where for r in result.refusals] == ["Identity -> e"]


def _constant(name: str, **value: object) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], **value)


def _affine_grid_like() -> onnx.ModelProto:
    """The pattern of ``AffineGrid``'s function expansion (onnx corpus).

    ``If(Size(size) == 4)`` picks the count ``D`` as a ``[1]`` tensor that feeds ``Range``,
    whose inputs the spec wants scalar. onnxruntime accepts it while ``D`` is computed, but
    once folding makes the condition constant it inlines the If at load time and then
    rejects ``Range`` with constant ``[1]`` inputs.
    """
    then_branch = helper.make_graph([helper.make_node("Identity", ["one_1d"], ["d_then"])],
                                    "then", [], [_vi("d_then", [1], TensorProto.INT64)])
    else_branch = helper.make_graph([helper.make_node("Shape", ["size"], ["d_else"])],
                                    "else", [], [_vi("d_else", [1], TensorProto.INT64)])
    return _model(
        [_constant("four", value_int=4), _constant("one_1d", value_ints=[3]),
         _constant("zero", value_int=0), _constant("one", value_int=1),
         helper.make_node("Size", ["size"], ["ndim"]),
         helper.make_node("Equal", ["ndim", "four"], ["is_2d"]),
         helper.make_node("If", ["is_2d"], ["d"], then_branch=then_branch,
                          else_branch=else_branch),
         helper.make_node("Range", ["zero", "d", "one"], ["steps"]),
         helper.make_node("Cast", ["steps"], ["steps_f"], to=F),
         helper.make_node("Add", ["x", "steps_f"], ["y"])],
        [_vi("x", [3]), _vi("size", [4], TensorProto.INT64)], [_vi("y", [3])], opset=20)


def test_if_on_folded_shape_condition_is_inlined() -> None:
    """Regression: cleanup on test_affine_grid_2d_*_expanded was rolled back by onnxruntime."""
    from onnxopt.data import from_iterable
    from onnxopt.manager import PassManager
    from onnxopt.model_io import load

    model = _affine_grid_like()
    feeds = {"x": np.array([1.0, 2.0, 3.0], np.float32), "size": np.array([2, 3, 5, 6])}
    out, result = _run_checked(model, feeds)
    assert op_counts(out) == {"Add": 1}
    assert result.stats["ifs_inlined"] == 1 and result.stats["identities"] == 1
    assert not result.refusals  # the branch's Identity was refused in the body, then removed
    _, report = PassManager([_cleanup()], validation=from_iterable([feeds])).run(load(model))
    assert report.records[0].status == "kept", report.records[0].message


def test_inlined_branch_names_and_initializers_do_not_clash() -> None:
    """Branch values are renamed when the name exists anywhere else in the model."""
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["r", "w"], ["t"]), helper.make_node("Neg", ["t"], ["tn"])],
        "then", [], [_vi("tn", [2])], initializer=[_init("w", np.array([2.0, 3.0], np.float32))])
    else_branch = _branch("else", [helper.make_node("Exp", ["r"], ["e"])], "e")
    other_then = _branch("other_then", [helper.make_node("Abs", ["x"], ["t"])], "t")
    other_else = _branch("other_else", [helper.make_node("Sin", ["x"], ["s"])], "s")
    model = _model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("If", ["yes"], ["y"], then_branch=then_branch,
                          else_branch=else_branch),
         helper.make_node("If", ["c"], ["z"], then_branch=other_then, else_branch=other_else)],
        [_vi("x", [2]), _vi("c", [], TensorProto.BOOL)], [_vi("y", [2]), _vi("z", [2])],
        [_init("yes", np.array(True)), _init("w_", np.zeros(2, np.float32))])
    for cond in (True, False):
        feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(cond)}
        out, result = _run_checked(model, feeds)
    assert op_counts(out) == {"Relu": 1, "Mul": 1, "Neg": 1, "If": 1}
    assert result.stats["ifs_inlined"] == 1 and result.stats["subgraphs_skipped"] == 2
    proto = to_proto(out)
    assert _output_names(out) == ["y", "z"]
    mul = next(n for n in proto.graph.node if n.op_type == "Mul")
    assert mul.output[0] == "t_1" and mul.input[1] == "w"
    assert sorted(i.name for i in proto.graph.initializer) == ["w"]


def test_if_with_constant_condition_refused_when_output_is_a_branch_initializer() -> None:
    then_branch = helper.make_graph([], "then", [], [_vi("k", [2])],
                                    initializer=[_init("k", np.array([1.0, 2.0], np.float32))])
    else_branch = _branch("else", [helper.make_node("Exp", ["r"], ["e"])], "e")
    model = _model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("If", ["yes"], ["y"], then_branch=then_branch,
                          else_branch=else_branch)],
        [_vi("x", [2])], [_vi("y", [2])], [_init("yes", np.array(True))])
    out, result = _run_checked(model, {"x": np.array([-1.0, 2.0], np.float32)})
    assert op_counts(out) == {"Relu": 1, "If": 1}
    assert result.stats["ifs_inlined"] == 0
    assert [r.where for r in result.refusals] == ["If -> y"]
    assert "initializer" in result.refusals[0].reason


def test_folded_graph_output_becomes_constant_node() -> None:
    model = _model(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Relu", ["x"], ["y"])],
        [_vi("x", [2, 3])], [_vi("y", [2, 3]), _vi("s", [2], TensorProto.INT64)])
    out, result = _run_checked(model)
    assert op_counts(out) == {"Relu": 1, "Constant": 1}
    assert _output_names(out) == ["y", "s"] and result.stats["folded"] == 1


def test_sequence_results_are_not_folded() -> None:
    model = _model(
        [helper.make_node("SequenceEmpty", [], ["empty"], dtype=F),
         helper.make_node("SequenceInsert", ["empty", "x"], ["seq"]),
         helper.make_node("SequenceAt", ["seq", "zero"], ["y"])],
        [_vi("x", [2])], [_vi("y", [2])], [_init("zero", np.array(0, np.int64))])
    out, result = _run_checked(model)
    assert op_counts(out) == op_counts(model) and result.modified is False
