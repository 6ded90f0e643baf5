"""Weights are always visible: Constant-node weights lifted, computed weights materialized,
and refusals that say why a weight is not a constant."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main
from onnxopt.cost import model_cost
from onnxopt.ir import from_proto, to_proto
from onnxopt.model_io import load
from onnxopt.pass_base import get_pass
from onnxopt.passes.prune import PrunePass
from onnxopt.session import run_model
from testmodels.structures import conv_chain
from tests.helpers import apply_pass, assert_same_outputs, op_counts, random_feeds

F = TensorProto.FLOAT


def _as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer moved into a Constant node, as Paddle2ONNX exports weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    nodes = constants + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out, full_check=True)
    return out


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_constant_node_weights_are_lifted_then_fold_bn_and_prune_work() -> None:
    original = conv_chain()
    model = _as_constant_nodes(original)
    feeds = random_feeds(model)
    cleaned, result = apply_pass(get_pass("cleanup")(), model)
    assert result.stats["constants_lifted"] == len(original.graph.initializer)
    assert "Constant" not in op_counts(cleaned)
    assert op_counts(cleaned) == op_counts(original)
    assert_same_outputs(model, cleaned, feeds)

    folded, bn = apply_pass(get_pass("fold-bn")(), cleaned)
    assert bn.stats["folded"] == 3 and not bn.refusals
    assert "BatchNormalization" not in op_counts(folded)
    assert_same_outputs(model, folded, feeds)

    pruned, plan = apply_pass(PrunePass(ratio=0.5, criterion="l1", round_to=1), folded)
    assert plan.modified and plan.stats["groups"], plan.summary
    assert model_cost(pruned).params < model_cost(folded).params
    outputs = run_model(pruned, feeds)  # lossy: it runs and keeps the output shape
    assert outputs[0].shape == run_model(model, feeds)[0].shape


def test_info_counts_constant_node_weights(tmp_path, capsys) -> None:
    original = conv_chain()
    model = _as_constant_nodes(original)
    expected = _params(original)
    assert model_cost(load(model)).params == expected == model_cost(load(original)).params
    path = tmp_path / "constants.onnx"
    onnx.save(model, path)
    assert main(["info", str(path)]) == 0
    assert f"params    {expected:,}" in capsys.readouterr().out


def _conv_with_computed_weight(shape_source: str = "ConstantOfShape") -> onnx.ModelProto:
    """``Conv(x, Cast(ConstantOfShape([6, 4, 3, 3], 0.05)) * w)``: a weight of 216 elements
    built from constants, followed by a BatchNormalization."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([6, 4, 3, 3], np.int64), "shape"),
             numpy_helper.from_array(rng.normal(0, 1, (6, 4, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 6).astype(np.float32), "g"),
             numpy_helper.from_array(rng.normal(0, 1, 6).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 1, 6).astype(np.float32), "m"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 6).astype(np.float32), "v")]
    fill = helper.make_tensor("fill", TensorProto.DOUBLE, [1], [0.05])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=fill),
             helper.make_node("Cast", ["ones"], ["onesf"], to=F),
             helper.make_node("Mul", ["onesf", "w"], ["weight"]),
             helper.make_node("Conv", ["x", "weight"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 4, 5, 5])],
                              [helper.make_tensor_value_info("y", F, ["N", 6, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_weight_above_the_size_limit_is_materialized() -> None:
    model = _conv_with_computed_weight()
    feeds = random_feeds(model)
    cleaned, result = apply_pass(get_pass("cleanup")(max_fold_elements=100), model)
    assert op_counts(cleaned) == {"Conv": 1, "BatchNormalization": 1}
    assert result.stats["folded"] == 3 and result.stats["weights_materialized"] == 3
    assert result.stats["fold_skipped"] == {}
    assert_same_outputs(model, cleaned, feeds)
    folded, bn = apply_pass(get_pass("fold-bn")(), cleaned)
    assert bn.stats["folded"] == 1 and op_counts(folded) == {"Conv": 1}
    assert_same_outputs(model, folded, feeds)


def test_large_constant_that_is_no_weight_keeps_the_limit() -> None:
    fill = helper.make_tensor("fill", F, [1], [2.0])
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=fill),
         helper.make_node("Add", ["x", "big"], ["y"])],
        "g", [helper.make_tensor_value_info("x", F, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", F, ["N", 4, 8, 8])],
        [numpy_helper.from_array(np.array([4, 8, 8], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, result = apply_pass(get_pass("cleanup")(max_fold_elements=100), model)
    assert op_counts(out) == {"ConstantOfShape": 1, "Add": 1}
    assert result.stats["fold_skipped"] == {"too_large": 1}
    assert result.stats["weights_materialized"] == 0
    assert_same_outputs(model, out, random_feeds(model))
    _, unlimited = apply_pass(get_pass("cleanup")(), model)  # under the default limit it folds
    assert unlimited.stats["folded"] == 1


def _weight_from_input() -> onnx.ModelProto:
    """The Conv weight is ``w * scale`` with ``scale`` a graph input."""
    model = _conv_with_computed_weight()
    graph = model.graph
    mul = next(n for n in graph.node if n.op_type == "Mul")
    mul.name = "rescale"
    mul.input[0] = "scale"
    graph.input.append(helper.make_tensor_value_info("scale", F, [1]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fold_bn_says_the_weight_comes_from_a_graph_input() -> None:
    model = _weight_from_input()
    feeds = {**random_feeds(model), "scale": np.array([0.7], np.float32)}
    cleaned, _ = apply_pass(get_pass("cleanup")(), model)
    out, result = apply_pass(get_pass("fold-bn")(), cleaned)
    assert not result.modified and op_counts(out) == op_counts(cleaned)
    assert [r.reason for r in result.refusals] == [
        "weight of Conv -> c is not a constant: 'weight' is produced by Mul 'rescale' "
        "from graph input 'scale'"]
    assert_same_outputs(model, out, feeds)


def test_prune_names_why_it_found_no_group() -> None:
    model = _weight_from_input()
    feeds = {**random_feeds(model), "scale": np.array([0.7], np.float32)}
    out, result = apply_pass(PrunePass(ratio=0.5, criterion="l1"), model)
    assert not result.modified
    assert_same_outputs(model, out, feeds)
    reason = ("Conv weight is not a constant: 'weight' is produced by Mul 'rescale' from "
              "graph input 'scale'")
    assert result.refusals and all(reason in r.reason for r in result.refusals)
    assert "0 groups" in result.summary and reason in result.summary


def test_why_not_constant_names_a_subgraph_op() -> None:
    from onnxopt.provenance import why_not_constant

    then_out = helper.make_tensor_value_info("t", F, [2])
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(
            np.ones(2, np.float32)))], "then", [], [then_out])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["w"], name="pick", then_branch=branch,
                          else_branch=branch),
         helper.make_node("Neg", ["w"], ["n"], name="flip"),
         helper.make_node("Mul", ["x", "n"], ["y"])],
        "g", [helper.make_tensor_value_info("x", F, [2]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, [2])])
    model = from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert why_not_constant(values["w"]) == "'w' is computed by If 'pick'"
    assert why_not_constant(values["n"]) == "'n' is produced by Neg 'flip', computed by If 'pick'"
    assert to_proto(model).graph.node[0].op_type == "If"


def test_lifting_keeps_a_constant_graph_output_and_body_constants_lift() -> None:
    k = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "k")
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["bk"], value=numpy_helper.from_array(
            np.array([3.0, 4.0], np.float32), "bk")),
         helper.make_node("Add", ["x", "bk"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", F, [2])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=k),
         helper.make_node("Constant", [], ["out_k"], value_floats=[5.0, 6.0]),
         helper.make_node("If", ["c"], ["y0"], then_branch=body, else_branch=body),
         helper.make_node("Mul", ["y0", "k"], ["y"])],
        "g", [helper.make_tensor_value_info("x", F, [2]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, [2]),
         helper.make_tensor_value_info("out_k", F, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    out, result = apply_pass(get_pass("cleanup")(), model)
    proto = to_proto(out)
    # k and the two body constants (If keeps one graph per branch) lift; out_k stays a node.
    assert result.stats["constants_lifted"] == 3
    assert [n.op_type for n in proto.graph.node] == ["Constant", "If", "Mul"]
    branch = proto.graph.node[1].attribute[0].g
    assert [n.op_type for n in branch.node] == ["Add"] and len(branch.initializer) == 1
    for cond in (True, False):
        feeds = {"x": np.array([1.0, -1.0], np.float32), "c": np.array(cond)}
        assert_same_outputs(model, out, feeds)
    assert model_cost(out).params == model_cost(from_proto(model)).params == 8
