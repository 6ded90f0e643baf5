"""prune-zero: zero channels removed across whole groups, exactly, and frozen groups left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt.channels import analyse_channels
from onnxopt.channels.tie import Role
from onnxopt.cost import infer_shapes, model_cost
from onnxopt.ir import from_proto, to_proto
from onnxopt.pass_base import get_pass
from onnxopt.passes.prune_zero import PruneZeroPass
from onnxopt.session import run_model
from testmodels import zeroed
from testmodels.structures import STRUCTURES, conv_chain, flatten_gemm_head
from tests.helpers import apply_pass, assert_same_outputs, random_feeds


def _weights(model: onnx.ModelProto | object) -> dict[str, tuple[int, ...]]:
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    return {t.name: tuple(t.dims) for t in proto.graph.initializer}


def _producer_output(tie) -> object:
    """The tensor a producer contributes: its output, or the BN output right after it."""
    value = tie.node.outputs[0]
    readers = [use.node for use in value.uses()]
    if len(readers) == 1 and readers[0].op_type == "BatchNormalization":
        return readers[0].outputs[0]
    return value


def legal_zero_channels(proto: onnx.ModelProto) -> dict[int, set[int]]:
    """Oracle: per prunable group, the channels that are zero in every producer of the group.

    A producer's contribution is its output, or the output of the BN that follows it (a BN
    with zero gamma and beta zeroes the channel whatever the conv produced). Zeros are
    measured in onnxruntime on random inputs, independently of the pass's constant analysis.
    """
    analysis = analyse_channels(from_proto(proto))
    sources = {}
    for group in analysis.groups:
        if group.prunable:
            ties = group.ties_with_role(Role.PRODUCER)
            sources[group.index] = [(_producer_output(t), t.tie.entries[0].axis) for t in ties]
    names = {value.name for found in sources.values() for value, _ in found}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in sorted(names - existing))
    session_names = [o.name for o in probe.graph.output]
    values = dict(zip(session_names, run_model(probe, random_feeds(proto, batch=3)), strict=True))
    legal = {}
    for group in analysis.groups:
        if group.index not in sources:
            continue
        zero = np.ones(group.size, dtype=bool)
        for value, axis in sources[group.index]:
            member = analysis.lookup(value, axis)[1]
            array = np.moveaxis(values[value.name], axis, 0)
            positions_zero = np.all(array.reshape(array.shape[0], -1) == 0, axis=1)
            np.logical_and.at(zero, member.channels, positions_zero)
        legal[group.index] = set(np.flatnonzero(zero).tolist()) if sources[group.index] else set()
    return legal


@pytest.mark.parametrize("aligned", [False, True], ids=["random", "aligned"])
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_removes_legal_zero_channels_exactly(name: str, aligned: bool) -> None:
    original = zeroed.zero_channels(STRUCTURES[name](), aligned=aligned)
    model, result = apply_pass(PruneZeroPass(), original)
    assert_same_outputs(original, model, random_feeds(original), rtol=1e-4)
    legal = legal_zero_channels(original)
    removed = {g["group"]: set(g["removed"]) for g in result.stats["groups"]}
    total = sum(len(c) for c in legal.values())
    hit = sum(len(c & removed.get(i, set())) for i, c in legal.items())
    assert result.modified  # se_block: its SE expand conv is never zero, yet x * s is
    assert hit >= 0.95 * total, f"{hit}/{total} legally removable zero channels removed"
    # Structure: the filters of the producers shrank by the channels removed.
    before, after = _weights(original), _weights(model)
    filters = sum(before[n][0] - after[n][0] for n in before
                  if n.endswith(".weight") and n.startswith("conv") and n in after)
    assert filters >= result.stats["channels_removed"]
    # Reported savings equal an independent cost count of both models.
    cost_before = model_cost(infer_shapes(from_proto(original)))
    cost_after = model_cost(infer_shapes(from_proto(to_proto(model))))
    assert result.stats["macs_saved"] == cost_before.macs - cost_after.macs > 0
    assert result.stats["params_saved"] == cost_before.params - cost_after.params > 0
    assert sum(g["macs_saved"] for g in result.stats["groups"]) == result.stats["macs_saved"]
    again, second = apply_pass(PruneZeroPass(), model)
    assert not second.modified
    assert _weights(again) == after


def test_conv_chain_loses_exactly_the_zeroed_filters() -> None:
    chosen = zeroed.zeroed_filters(conv_chain())
    model, result = apply_pass(PruneZeroPass(), zeroed.zero_channels(conv_chain()))
    shapes, full = _weights(model), _weights(conv_chain())
    for conv, channels in chosen.items():
        assert shapes[f"{conv}.weight"][0] == full[f"{conv}.weight"][0] - len(channels)
    assert result.stats["channels_removed"] == sum(len(c) for c in chosen.values())


def test_flatten_head_loses_whole_feature_blocks() -> None:
    original = zeroed.zero_channels(flatten_gemm_head())
    model, _ = apply_pass(PruneZeroPass(), original)
    removed = len(zeroed.zeroed_filters(flatten_gemm_head())["conv1"])
    assert _weights(model)["gemm0.weight"][1] == (16 - removed) * 16


@pytest.mark.parametrize(("name", "reason", "producer"), [
    ("channel_shuffle", "channel shuffle (Reshape->Transpose->Reshape)", "conv1"),
    ("custom_domain_op", "custom-domain op custom.ops::ScaledRelu", "conv1"),
    ("dynamic_channels", "channel count is dynamic", "conv1"),
    ("graph_output_features", "graph output 'relu1'", "conv1"),
])
def test_frozen_groups_are_left_alone_with_the_reason(name: str, reason: str,
                                                      producer: str) -> None:
    original = zeroed.zero_channels(zeroed.REFUSED[name]())
    model, result = apply_pass(PruneZeroPass(), original)
    assert any(reason in r.reason for r in result.refusals), result.refusals
    filters = _weights(model)[f"{producer}.weight"][0]  # its input channels may still go
    assert filters == _weights(original)[f"{producer}.weight"][0]
    assert_same_outputs(original, model, random_feeds(original), rtol=1e-5)
    assert result.modified  # the understood groups of the same model are still pruned


def test_constant_channels_are_folded_only_where_exact() -> None:
    original, counts = zeroed.constant_channels()
    model, result = apply_pass(PruneZeroPass(), original)
    assert_same_outputs(original, model, random_feeds(original))
    shapes = _weights(model)
    assert shapes["conv0.weight"][0] == 8 - counts["conv_fold"]  # into an unpadded 1x1 conv
    assert shapes["conv2.weight"][0] == 8  # read by a padded 3x3 conv: kept
    assert shapes["gemm0.weight"][1] == 8 - counts["gemm_fold"]  # into the Gemm head
    assert result.stats["folded_channels"] == counts["conv_fold"] + counts["gemm_fold"]
    _, plain = apply_pass(PruneZeroPass(fold_constants=False), original)
    assert not plain.modified


def test_split_slice_transpose_matmul_and_reshape_are_rewritten() -> None:
    original = zeroed.zero_channels(zeroed.index_mappings())
    model, result = apply_pass(PruneZeroPass(), original)
    assert_same_outputs(original, model, random_feeds(original))
    proto = to_proto(model)
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    conv0 = consts["conv0.weight"].shape[0]
    split = next(n for n in proto.graph.node if n.op_type == "Split")
    assert int(consts[split.input[1]].sum()) == conv0 < 16
    assert consts["matmul.weight"].shape[0] < 16
    assert result.stats["groups_pruned"] == 3


def test_registered() -> None:
    assert get_pass("prune-zero") is PruneZeroPass


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(STRUCTURES)), seed=st.integers(0, 1000),
       fraction=st.sampled_from([0.2, 0.5, 0.8]), aligned=st.booleans())
def test_any_zeroing_is_removed_exactly(name: str, seed: int, fraction: float,
                                        aligned: bool) -> None:
    original = zeroed.zero_channels(STRUCTURES[name](seed=seed), fraction, seed, aligned)
    model, result = apply_pass(PruneZeroPass(), original)
    # se_block's expand conv always has a bias, so a random zeroing may leave nothing legal
    assert result.modified or name == "se_block"
    assert_same_outputs(original, model, random_feeds(original, seed=seed))


def test_transposed_conv_resize_reductions_and_matmul_head() -> None:
    original = zeroed.zero_channels(zeroed.assorted_ops())
    model, result = apply_pass(PruneZeroPass(), original)
    assert_same_outputs(original, model, random_feeds(original))
    shapes = _weights(model)
    removed_in = len(zeroed.zeroed_filters(zeroed.assorted_ops())["conv0"])
    assert shapes["convt.weight"] == (8 - removed_in, 6, 3, 3)  # BN after it zeroes 2 channels
    assert shapes["head.weight"] == (6, 10) and shapes["bn1.scale"] == (6,)
