"""Tests of the ``fuse-resconv`` pass: ResConv fusion, layer pruning, RepVGG re-parameterisation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxopt.compare import compare_outputs
from onnxopt.ir import to_proto
from onnxopt.pass_base import PassContext, get_pass
from onnxopt.session import run_model
from testmodels.resconv import (
    REFUSAL_CASES,
    branch_sum_block,
    refusal_model,
    repvgg_net,
    resconv_bench_model,
    resconv_net,
    resconv_output_block,
)
from tests.helpers import apply_pass, assert_same_outputs, op_counts, random_feeds

FUSED_OPS = ("Conv", "Add", "Mul", "BatchNormalization")


def _fuse(**options: object):
    return get_pass("fuse-resconv")(**options)


def _counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = op_counts(model)
    return {op: counts[op] for op in FUSED_OPS}


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model)


def test_resconv_net_fuses_every_block_into_one_conv() -> None:
    model = resconv_net()
    assert _counts(model) == {"Conv": 9, "Add": 8, "Mul": 7, "BatchNormalization": 7}
    out, result = apply_pass(_fuse(), model)
    # stem Conv+BN stay; 6 blocks become one Conv each, the 2 blocks with a = 0 disappear
    assert _counts(out) == {"Conv": 7, "Add": 0, "Mul": 0, "BatchNormalization": 1}
    assert op_counts(out)["Relu"] == op_counts(model)["Relu"]  # activations after the Add stay
    assert result.modified and result.exact is None and not result.refusals
    stats = result.stats
    assert (stats["blocks_fused"], stats["blocks_removed"]) == (6, 2)
    assert (stats["adds_removed"], stats["branches_merged"]) == (8, 16)
    assert_same_outputs(model, out, random_feeds(model, batch=3))


def test_zero_scale_blocks_are_removed_exactly() -> None:
    model = _with_shapes(resconv_net())
    out, result = apply_pass(_fuse(), model)
    layers = result.stats["layers_removed"]
    assert [layer["a"] for layer in layers] == [0.0, 0.0]
    conv_macs = 16 * 16 * 8 * 8 * 9  # out pixels * out channels * in channels * 3x3
    assert all(layer["macs_saved"] >= conv_macs for layer in layers)
    assert result.stats["macs_saved"] > 2 * conv_macs
    removed = [layer["name"].split("'")[1] for layer in layers]
    remaining = [n.name for n in to_proto(out).graph.node]
    assert not any(name in node for name in removed for node in remaining)
    assert result.exact is None  # exactly-zero scales: the run stays exact
    assert_same_outputs(model, out, random_feeds(model))


def test_macs_saved_are_counted_at_concrete_shapes() -> None:
    """No shape inference is needed beforehand and the batch N counts 1 (per sample); while
    the spatial dims are unknown so are the MACs, and ``--input-shape`` fixes them."""
    _, shaped = apply_pass(_fuse(), _with_shapes(resconv_net()))
    _, plain = apply_pass(_fuse(), resconv_net())
    assert plain.stats["macs_saved"] == shaped.stats["macs_saved"] > 0
    dynamic = resconv_net()
    for dim, name in zip(dynamic.graph.input[0].type.tensor_type.shape.dim[2:], "HW",
                         strict=True):
        dim.dim_param = name
    _, unknown = apply_pass(_fuse(), dynamic)
    assert unknown.stats["macs_saved"] is None
    assert all(layer["macs_saved"] is None for layer in unknown.stats["layers_removed"])
    _, given = apply_pass(_fuse(), dynamic, PassContext(input_shapes={"input": (4, 3, 16, 16)}))
    assert given.stats["macs_saved"] == shaped.stats["macs_saved"]
    assert given.stats["layers_removed"] == shaped.stats["layers_removed"]


def test_threshold_removes_small_nonzero_scales_as_a_lossy_run() -> None:
    model = _with_shapes(resconv_net(small_a=1e-3))
    exact, exact_result = apply_pass(_fuse(), model)
    assert exact_result.stats["layers_removed"] == [] and exact_result.exact is None
    assert _counts(exact)["Conv"] == 9

    out, result = apply_pass(_fuse(threshold=0.01), model)
    assert result.exact is False
    layers = result.stats["layers_removed"]
    assert len(layers) == 2 and result.stats["blocks_removed"] == 2
    assert all(layer["a"] == pytest.approx(1e-3) and layer["macs_saved"] > 0 for layer in layers)
    assert _counts(out) == {"Conv": 7, "Add": 0, "Mul": 0, "BatchNormalization": 1}
    feeds = random_feeds(model, batch=8)
    cmp = compare_outputs(run_model(model, feeds), run_model(out, feeds), ["logits"])
    assert cmp.max_abs_error > 1e-5  # measurable ...
    assert cmp.cosine > 0.9999 and cmp.agreement == 1.0  # ... but small


def test_repvgg_net_merges_all_branches() -> None:
    model = repvgg_net()
    assert _counts(model) == {"Conv": 13, "Add": 11, "Mul": 0, "BatchNormalization": 17}
    out, result = apply_pass(_fuse(), model)
    # stem Conv+BN stay; each of the 5 blocks (3x3+1x1+BN(x), ACNet 1x3/3x1, stride-2
    # widening, right-nested sum, depthwise) is one Conv
    assert _counts(out) == {"Conv": 6, "Add": 0, "Mul": 0, "BatchNormalization": 1}
    assert result.stats["blocks_fused"] == 5 and result.stats["adds_removed"] == 11
    assert result.stats["branches_merged"] == 16
    assert not result.refusals
    kernels = [tuple(a.ints) for n in to_proto(out).graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "kernel_shape"]
    assert kernels == [(3, 3)] * 6
    assert_same_outputs(model, out, random_feeds(model, batch=3))


def test_reparam_false_fuses_only_single_branch_resconv_blocks() -> None:
    _, result = apply_pass(_fuse(reparam=False), repvgg_net())
    assert not result.modified and not result.refusals
    out, result = apply_pass(_fuse(reparam=False), resconv_net())
    assert _counts(out) == {"Conv": 7, "Add": 0, "Mul": 0, "BatchNormalization": 1}


@settings(max_examples=20, deadline=None)
@given(
    kernels=st.lists(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (5, 5), (5, 3)]),
                     min_size=1, max_size=3),
    identity=st.booleans(),
    groups=st.sampled_from([1, 2, 4]),
    dilation=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_any_aligned_branch_sum_is_one_conv(kernels: list[tuple[int, int]], identity: bool,
                                            groups: int, dilation: int, seed: int) -> None:
    if len(kernels) + identity < 2:
        kernels = kernels * 2
    model = branch_sum_block(kernels, identity=identity, groups=groups, dilation=dilation,
                             seed=seed)
    out, result = apply_pass(_fuse(), model)
    assert _counts(out) == {"Conv": 1, "Add": 0, "Mul": 0, "BatchNormalization": 0}
    assert result.stats["branches_merged"] == len(kernels) + identity
    assert [o.name for o in to_proto(out).graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, out, random_feeds(model, seed=seed))


REFUSAL_REASONS = {
    "stride2": "stride (2, 2): an identity shortcut needs stride 1",
    "channel_change": "channel change 8 -> 1",
    "shared_weight": "is shared with Conv",
    "asymmetric_pads": "do not keep the size with the input centred",
    "even_kernel": "even kernel (2, 2)",
    "vector_scale": "not per-channel",
    "outside_consumer": "outside the block",
}


def test_every_refusal_case_has_an_expected_reason() -> None:
    assert set(REFUSAL_REASONS) == set(REFUSAL_CASES)


@pytest.mark.parametrize("case", sorted(REFUSAL_REASONS))
def test_blocks_breaking_a_condition_are_left_alone_and_reported(case: str) -> None:
    model = refusal_model(case)
    out, result = apply_pass(_fuse(), model)
    assert not result.modified
    assert op_counts(out) == op_counts(model)
    assert len(result.refusals) == 1
    assert REFUSAL_REASONS[case] in result.refusals[0].reason
    assert result.refusals[0].where.startswith("Add")
    assert_same_outputs(model, out, random_feeds(model))


@pytest.mark.parametrize("build", [resconv_net, repvgg_net, lambda: refusal_model("stride2")])
def test_second_run_changes_nothing(build) -> None:
    once, _ = apply_pass(_fuse(), build())
    twice, result = apply_pass(_fuse(), once)
    assert not result.modified
    assert op_counts(twice) == op_counts(once)


@pytest.mark.parametrize("a, convs", [(0.5, 2), (0.0, 1)])
def test_block_at_the_graph_output_keeps_the_output_name(a: float, convs: int) -> None:
    model = resconv_output_block(a=a)
    out, result = apply_pass(_fuse(), model)
    assert result.modified
    assert op_counts(out)["Conv"] == convs and op_counts(out)["Add"] == 0
    assert [o.name for o in to_proto(out).graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, out, random_feeds(model))


@pytest.mark.parametrize("repvgg", [False, True])
def test_bench_model_fuses_to_a_plain_conv_stack(repvgg: bool) -> None:
    model = resconv_bench_model(width=8, size=8, depth=3, repvgg=repvgg)
    out, result = apply_pass(_fuse(), model)
    assert _counts(out) == {"Conv": 4, "Add": 0, "Mul": 0, "BatchNormalization": 1}
    assert result.stats["blocks_fused"] == 3
    assert_same_outputs(model, out, random_feeds(model))


def test_fused_kernel_is_a_times_w_bn_plus_identity() -> None:
    """The fused kernel of one per-channel block equals ``a * W_bn + I`` computed by hand."""
    model = resconv_output_block(a=0.5)
    out, _ = apply_pass(_fuse(), model)
    fused = next(n for n in out.graph if n.name.endswith("_fused"))
    weight = fused.inputs[1].const_value.numpy()
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("conv_rc"))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization"
              and n.input[0] == conv.output[0])
    gamma, beta, mean, var = (inits[name].astype(np.float64) for name in bn.input[1:])
    g = gamma / np.sqrt(var + 1e-5)
    expected = 0.5 * inits[conv.input[1]] * g[:, None, None, None]
    expected[np.arange(8), np.arange(8), 1, 1] += 1.0
    np.testing.assert_allclose(weight, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fused.inputs[2].const_value.numpy(), 0.5 * (beta - mean * g),
                               rtol=1e-6, atol=1e-7)
