"""Importance: group scores over all producers, data criteria on calibration data, the greedy."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from onnxopt.channels import analyse_channels
from onnxopt.channels.tie import IN0, Port, Role
from onnxopt.data import input_specs, random_source
from onnxopt.ir import const_array, from_proto
from onnxopt.passes.prune.importance import CRITERIA, group_scores, thinet_order
from onnxopt.passes.prune.statistics import collect_statistics
from testmodels import zeroed
from testmodels.structures import conv_chain, flatten_gemm_head, residual_blocks

WEIGHT = Port(False, 1)


def _prunable(model):
    analysis = analyse_channels(model)
    return [g for g in analysis.groups if g.prunable and g.ties_with_role(Role.PRODUCER)]


def _stats(model, groups, needs):
    source = random_source(input_specs(model), 16, seed=1)
    return collect_statistics(model, groups, source, needs, batch_size=8, positions=8)


def test_l1_sums_normalised_norms_over_every_layer_of_a_residual_group() -> None:
    model = from_proto(residual_blocks())
    group = max(_prunable(model), key=lambda g: len(g.ties_with_role(Role.PRODUCER)))
    assert len(group.ties_with_role(Role.PRODUCER)) >= 2  # a residual group
    expected = np.zeros(group.size)
    ties = group.ties_with_role(Role.PRODUCER) + group.ties_with_role(Role.CONSUMER)
    for tie in ties:
        member = tie.member_at(WEIGHT)
        weight = np.moveaxis(const_array(tie.node.inputs[1]), member.axis, 0)
        norms = np.zeros(group.size)
        np.add.at(norms, member.channels, np.abs(weight.reshape(weight.shape[0], -1)).sum(1))
        expected += norms / norms.mean()
    (scores,) = group_scores([group], "l1").values()
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "apoz", "thinet"])
def test_zero_channels_rank_lowest(criterion: str) -> None:
    proto = conv_chain()
    chosen = zeroed.zeroed_filters(proto)
    model = from_proto(zeroed.zero_channels(proto))
    groups = _prunable(model)
    stats = _stats(model, groups, CRITERIA[criterion].needs)
    scores = group_scores(groups, criterion, stats)
    for group in groups:
        (producer,) = group.ties_with_role(Role.PRODUCER)
        zero = chosen[producer.node.name]
        order = np.argsort(scores[group.index], kind="stable")
        assert set(order[:len(zero)].tolist()) == set(zero.tolist()), (criterion, group.index)


def test_thinet_gram_adds_up_to_each_consumers_output() -> None:
    """``1' G 1`` per consumer is its output energy, so the normalised Gram sums to 1 each.

    This checks the contributions (im2col rows of padded, strided and dilated convs, and the
    flattened blocks of a Gemm) against the consumers' real outputs from onnxruntime.
    """
    for build in (conv_chain, flatten_gemm_head):
        model = from_proto(build())
        groups = _prunable(model)
        stats = _stats(model, groups, {"gram"})
        for group in groups:
            consumers = [t for t in group.ties_with_role(Role.CONSUMER) if t.member_at(IN0)]
            total = float(stats.gram[group.index].sum())
            assert total == pytest.approx(len(consumers), rel=1e-6)


def test_thinet_order_is_greedy_on_the_removed_energy() -> None:
    # channels 0 and 1 cancel each other; 2 is small; 3 is large
    z = np.array([[1.0, 2.0], [-1.0, -2.0], [0.3, 0.0], [3.0, 1.0]])
    gram = z @ z.T
    order, increase = thinet_order(gram)
    assert order[0] == 2  # the smallest alone
    assert set(order[1:3].tolist()) == {0, 1}  # then the pair that cancels
    assert order[3] == 3
    removed = []
    for step, c in enumerate(order):
        before = gram[np.ix_(removed, removed)].sum()
        removed.append(int(c))
        assert increase[step] == pytest.approx(gram[np.ix_(removed, removed)].sum() - before)


def test_thinet_scores_follow_the_greedy_order() -> None:
    model = from_proto(conv_chain())
    groups = _prunable(model)
    stats = _stats(model, groups, {"gram"})
    scores = group_scores(groups, "thinet", stats)
    for group in groups:
        order, _ = thinet_order(stats.gram[group.index])
        assert np.argsort(scores[group.index], kind="stable").tolist() == order.tolist()


def test_bn_without_normalization_falls_back_to_l2() -> None:
    from onnxopt.pass_base import PassContext, get_pass

    model = from_proto(conv_chain())
    assert get_pass("fold-bn")().run(model, PassContext()).modified
    groups = _prunable(model)
    bn, l2 = group_scores(groups, "bn"), group_scores(groups, "l2")
    for g in bn:
        np.testing.assert_allclose(bn[g], l2[g])


def test_random_is_seeded_and_criteria_match_the_pass_options() -> None:
    from onnxopt.passes.prune.prune import CriterionName

    groups = _prunable(from_proto(conv_chain()))
    a, b = group_scores(groups, "random", seed=3), group_scores(groups, "random", seed=3)
    c = group_scores(groups, "random", seed=4)
    assert all(np.array_equal(a[g], b[g]) for g in a)
    assert not all(np.array_equal(a[g], c[g]) for g in a)
    assert set(typing.get_args(CriterionName)) == {"auto", *CRITERIA}


def _system(x: np.ndarray, weight: np.ndarray, kernel: int):
    from onnxopt.passes.prune.statistics import ConsumerSystem

    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    channels = np.arange(x.shape[1] // kernel)
    columns = channels[:, None] * kernel + np.arange(kernel)
    energy = float(np.sum((x @ weight[:, :-1].T) ** 2))
    return ConsumerSystem(weight, (channels, columns), design.T @ design, energy)


def test_refit_order_matches_brute_force_least_squares() -> None:
    from onnxopt.passes.prune.importance import refit_order

    rng = np.random.default_rng(0)
    kernel, size = 2, 5
    x = rng.standard_normal((200, size * kernel)) @ rng.standard_normal((10, 10))
    weight = rng.standard_normal((3, size * kernel + 1))
    system = _system(x, weight, kernel)
    target = x @ weight[:, :-1].T + weight[:, -1]
    order, increase = refit_order(size, [system], ridge=1e-12)

    def error(removed: list[int]) -> float:
        kept = [c * kernel + j for c in range(size) if c not in removed for j in range(kernel)]
        design = np.concatenate([x[:, kept], np.ones((len(x), 1))], axis=1)
        beta = np.linalg.lstsq(design, target, rcond=None)[0]
        return float(np.sum((design @ beta - target) ** 2))

    removed: list[int] = []
    for step in range(size - 1):
        before = error(removed)
        best = min((c for c in range(size) if c not in removed),
                   key=lambda c: error(removed + [c]))
        assert order[step] == best
        removed.append(int(order[step]))
        assert increase[step] * system.energy == pytest.approx(error(removed) - before,
                                                                rel=1e-5, abs=1e-6)


def test_refit_aware_thinet_removes_a_duplicate_first() -> None:
    from onnxopt.passes.prune.importance import refit_order

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 4))
    x = np.concatenate([x, x[:, :1]], axis=1)  # channel 4 duplicates channel 0
    weight = np.concatenate([np.array([[3.0, 0.2, 0.3, 0.4, 3.0]]), np.zeros((1, 1))], axis=1)
    system = _system(x, weight, 1)
    order, _ = refit_order(5, [system], ridge=1e-9)
    assert order[0] in (0, 4)  # free after the refit, though the largest contribution
    gram_order, _ = thinet_order(np.einsum("sc,sd->cd", x * weight[0, :5], x * weight[0, :5]))
    assert gram_order[0] not in (0, 4)  # without the refit it looks the most important


def test_compensated_l1_keeps_one_of_two_channels_that_carry_the_same_signal() -> None:
    from onnxopt.passes.prune.compensation import Compensation, eliminate

    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 2))
    x = np.concatenate([x, x[:, :1]], axis=1)  # channel 2 carries channel 0's signal
    weight = np.array([[0.5, 0.9, 0.5, 0.0]])  # [M, b]: channels 0 and 2 look the weakest
    system = _system(x, weight, 1)
    target = x @ weight[0, :3]
    plain = np.argsort(np.abs(weight[0, :3]), kind="stable")
    assert set(plain[:2].tolist()) == {0, 2}  # uncompensated l1 drops the shared signal

    order, norms = eliminate(Compensation(3, [system], 1e-9),
                             lambda state: state.column_norms(1))
    assert order[0] in (0, 2) and order[1] == 1  # the twin inherits the weight: 1.0 > 0.9
    assert norms[1] == pytest.approx(0.9 / 0.95, rel=1e-3)  # 0.9 / mean(0.9, 1.0)

    def refit_error(kept: int) -> float:
        beta = np.linalg.lstsq(x[:, [kept]], target, rcond=None)[0]
        return float(np.sum((x[:, [kept]] @ beta - target) ** 2))

    assert refit_error(int(order[2])) < refit_error(1)  # keeping the twin loses less


def test_l1_with_refit_scores_the_compensated_weights_on_a_real_model() -> None:
    from onnxopt.passes.prune.compensation import Compensation, eliminate

    model = from_proto(residual_blocks())
    groups = _prunable(model)
    stats = _stats(model, groups, {"systems"})
    assert stats.systems
    plain = group_scores(groups, "l1", stats)  # no refit: the original weights
    refit = group_scores(groups, "l1", stats, refit_ridge=1e-2)
    assert any(not np.array_equal(np.argsort(plain[g]), np.argsort(refit[g])) for g in plain)
    for group in groups:
        if group.index not in stats.systems:
            np.testing.assert_array_equal(refit[group.index], plain[group.index])
            continue
        state = Compensation(group.size, stats.systems[group.index], 1e-2)
        producers = [t.member_at(WEIGHT) for t in group.ties_with_role(Role.PRODUCER)]
        first = np.zeros(group.size)
        for member in producers:  # the producers' part does not change with the refit
            rows = np.moveaxis(const_array(member.node.inputs[1]), member.axis, 0)
            norms = np.zeros(group.size)
            np.add.at(norms, member.channels, np.abs(rows.reshape(len(rows), -1)).sum(1))
            first += norms / norms.mean()
        order, _ = eliminate(state, lambda s, fixed=first: fixed + s.column_norms(1))
        assert np.argsort(refit[group.index], kind="stable").tolist() == order.tolist()
