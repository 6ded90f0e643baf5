"""The refit: solved in the space of the rows when there are fewer rows than inputs, the same
weights as from the normal equations, and an output closer to the unpruned model's."""

from __future__ import annotations

import numpy as np

from onnxopt.channels import analyse_channels
from onnxopt.cost import infer_shapes
from onnxopt.data import input_specs, random_source
from onnxopt.ir import from_proto
from onnxopt.pass_base import PassContext
from onnxopt.passes.prune import reconstruct as refit
from onnxopt.passes.prune.capture import linear_view
from onnxopt.passes.prune.prune import PruneOptions
from onnxopt.passes.prune.sensitivity import pruned_copy, refit_targets
from onnxopt.session import run_model
from testmodels.structures import residual_blocks
from tests.helpers import random_feeds


def _refitted(monkeypatch, samples: int, positions: int, rows_space: bool):
    """The half-width residual model refitted on ``samples x positions`` rows per consumer,
    with the row-space solve allowed or not; also how often it was used."""
    proto = residual_blocks(width=16)
    model = infer_shapes(from_proto(proto))
    ctx = PassContext(calib=random_source(input_specs(model), samples, seed=1))
    groups = [g for g in analyse_channels(model).groups if g.size >= 8 and not g.frozen]
    keep = {g.index: np.arange(g.size) < g.size // 2 for g in groups}
    used = []
    solve_rows = refit._solve_rows

    def spy(system, ridge):
        if not rows_space:
            raise np.linalg.LinAlgError("normal equations only")
        used.append(system.rows)
        return solve_rows(system, ridge)

    monkeypatch.setattr(refit, "_solve_rows", spy)
    opts = PruneOptions(macs=0.5, positions=positions)
    pruned = pruned_copy(model, ctx, opts, keep, refit=True)
    names = [t.node.name for t in refit_targets(groups, keep)]
    weights = {n: linear_view(next(x for x in pruned.graph if x.name == n)) for n in names}
    return proto, pruned, weights, used


def test_few_rows_are_solved_in_their_space_with_the_normal_equations_weights(
        monkeypatch) -> None:
    proto, dual, dual_w, used = _refitted(monkeypatch, samples=4, positions=4, rows_space=True)
    _, primal, primal_w, unused = _refitted(monkeypatch, samples=4, positions=4,
                                            rows_space=False)
    assert sorted(used) == [4, 16, 16, 16, 16] and not unused  # a Gemm: one row a sample
    for name, view in dual_w.items():  # the normal equations are summed in float32
        for mine, theirs in ((view.weight, primal_w[name].weight),
                             (view.bias, primal_w[name].bias)):
            np.testing.assert_allclose(mine, theirs, atol=1e-3 * np.abs(theirs).max())
    feeds = random_feeds(proto, batch=8, seed=5)
    for got, want in zip(run_model(dual, feeds), run_model(primal, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_more_rows_than_inputs_use_the_normal_equations(monkeypatch) -> None:
    _, _, _, used = _refitted(monkeypatch, samples=32, positions=64, rows_space=True)
    assert not used
