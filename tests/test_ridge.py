"""The sample-space ridge solve against the normal equations it replaces."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.ridge import ridge_in_sample_space


def _normal_equations(x: np.ndarray, y: np.ndarray, lam: float, intercept: bool):
    """The d x d ridge solution with an unpenalised intercept column."""
    design = np.c_[x, np.ones(len(x))] if intercept else x
    penalty = np.r_[np.full(x.shape[1], lam), [0.0] * intercept]
    theta = np.linalg.solve(design.T @ design + np.diag(penalty), design.T @ y)
    return theta[:x.shape[1]], (theta[-1] if intercept else np.zeros(y.shape[1]))


@pytest.mark.parametrize("intercept", [True, False])
def test_matches_the_normal_equations_with_fewer_rows_than_columns(intercept):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 40)) + 3.0  # off-centre, so the intercept matters
    y = x[:, :5] @ rng.normal(size=(5, 3)) + 2.0 + rng.normal(0, 0.1, (12, 3))
    weight, bias = ridge_in_sample_space(x, y, 0.5, intercept=intercept)
    want_weight, want_bias = _normal_equations(x, y, 0.5, intercept)
    np.testing.assert_allclose(weight, want_weight, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bias, want_bias, rtol=1e-8, atol=1e-10)


def test_a_singular_system_raises():
    x = np.ones((4, 6))
    with pytest.raises(np.linalg.LinAlgError):
        ridge_in_sample_space(x, np.ones((4, 1)), 0.0, intercept=False)
