"""dead-layers: zero residual branches, unreachable nodes and no-op ops are removed exactly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.pass_base import get_pass
from onnxopt.passes.dead_layers import DeadLayersPass
from testmodels import zeroed
from testmodels.structures import residual_blocks
from tests.helpers import apply_pass, assert_same_outputs, op_counts, random_feeds


def _check(original: onnx.ModelProto):
    model, result = apply_pass(DeadLayersPass(), original)
    assert_same_outputs(original, model, random_feeds(original))
    _, again = apply_pass(DeadLayersPass(), model)
    assert not again.modified
    return model, result


def test_zero_scaled_and_all_zero_residual_branches_become_identity() -> None:
    original = zeroed.zero_scaled_residual()
    model, result = _check(original)
    assert result.stats["bypassed"] == {"zero-branch": 2}
    before, after = op_counts(original), op_counts(model)
    assert before["Conv"] == 5 and after["Conv"] == 1  # both branches (2 convs each) gone
    assert after["Add"] == 0 and after["Mul"] == 0
    assert result.stats["params_saved"] > 0 and result.stats["macs_saved"] > 0


def test_unreachable_subgraph_is_removed() -> None:
    original = zeroed.unreachable_subgraph()
    model, result = _check(original)
    assert result.stats["nodes_removed"] == 9
    assert op_counts(model) == {"Conv": 2, "BatchNormalization": 2, "Relu": 2,
                                "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    names = {t.name for t in original.graph.initializer}
    kept = set(model.graph.initializers)
    assert kept < names and len(names - kept) == result.stats["initializers_removed"]


def test_noop_ops_are_bypassed() -> None:
    model, result = _check(zeroed.noop_ops())
    assert result.stats["bypassed"] == {"mul-by-1": 1, "add-of-0": 1, "pad-of-0": 1,
                                        "full-slice": 1, "same-reshape": 1}
    assert not {"Mul", "Add", "Pad", "Slice", "Reshape"} & set(op_counts(model))


def test_model_without_dead_layers_is_unchanged() -> None:
    original = residual_blocks()
    model, result = _check(original)
    assert not result.modified and op_counts(model) == op_counts(original)


def _single(nodes: list[onnx.NodeProto], inits: list[np.ndarray], in_shape: list[int],
            out_shape: list[int] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(a.astype(np.float32), f"c{i}") for i, a in enumerate(inits)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_graph_input_feeding_a_graph_output_is_refused() -> None:
    original = _single([helper.make_node("Mul", ["x", "c0"], ["y"])], [np.ones(4)], [2, 4])
    model, result = _check(original)
    assert not result.modified and op_counts(model) == {"Mul": 1}
    assert "graph output" in result.refusals[0].reason


def test_broadcasting_zero_add_is_kept() -> None:
    original = _single([helper.make_node("Add", ["x", "c0"], ["y"])],
                       [np.zeros((1, 4, 3, 3))], [2, 4, 1, 1])
    model, result = _check(original)
    assert not result.modified and op_counts(model) == {"Add": 1}


def test_registered() -> None:
    assert get_pass("dead-layers") is DeadLayersPass


def _dead_if(custom_sink: bool) -> onnx.ModelProto:
    """``y = Relu(x)`` plus an If nobody reads whose branches read ``Relu(x)`` from outside;
    optionally a custom-domain node without outputs reading it too (a side effect)."""
    branch = [helper.make_graph([helper.make_node(op, ["r"], [f"{op.lower()}_out"])], op,
                                [], [helper.make_tensor_value_info(f"{op.lower()}_out",
                                                                   TensorProto.FLOAT, [2, 4])])
              for op in ("Identity", "Neg")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Identity", ["r"], ["y"]),
             helper.make_node("If", ["c0"], ["unused"], then_branch=branch[0],
                              else_branch=branch[1])]
    if custom_sink:
        nodes.append(helper.make_node("Log", ["r"], [], domain="custom"))
    model = _single(nodes, [], [2, 4], [2, 4])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "c0"))
    if custom_sink:
        model.opset_import.append(helper.make_opsetid("custom", 1))
    return model


def test_dead_if_goes_with_its_outer_reads() -> None:
    model, result = _check(_dead_if(custom_sink=False))  # numerics through onnxruntime
    assert result.stats["nodes_removed"] == 1 and result.stats["initializers_removed"] == 1
    assert op_counts(model) == {"Relu": 1, "Identity": 1}
    relu_out = model.graph.node(0).outputs[0]
    assert [use.node.op_type for use in relu_out.uses()] == ["Identity"]


def test_custom_node_without_outputs_is_kept() -> None:
    # onnxruntime cannot run the custom op, so this checks structure only.
    work, result = apply_pass(DeadLayersPass(), _dead_if(custom_sink=True))
    assert result.stats["nodes_removed"] == 1 and result.stats["initializers_removed"] == 1
    assert op_counts(work) == {"Relu": 1, "Identity": 1, "Log": 1}
    relu_out = work.graph.node(0).outputs[0]
    assert {use.node.op_type for use in relu_out.uses()} == {"Identity", "Log"}
