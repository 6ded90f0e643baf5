"""Exit heads: the ridge fit."""

from __future__ import annotations

import numpy as np

from onnxopt.passes.early_exit.heads import fit_head


def test_ridge_head_from_fewer_samples_than_features_is_the_normal_equations_one() -> None:
    """A wide cut with few calibration samples is solved in the space of the samples; the
    head is the one the normal equations give (same weights and bias)."""
    rng = np.random.default_rng(0)
    for n, c in ((16, 300), (200, 20)):  # fewer samples than features, and more
        x = rng.standard_normal((n, c)) * rng.uniform(0.1, 3, c) + rng.standard_normal(c)
        y = rng.standard_normal((n, 5))
        weight, bias = fit_head(x, y)
        mean, std = x.mean(axis=0), x.std(axis=0)
        z = np.c_[(x - mean) / std, np.ones(n)]
        w = np.linalg.solve(z.T @ z + 1e-3 * n * np.diag(np.r_[np.ones(c), 0.0]), z.T @ y)
        np.testing.assert_allclose(weight, (w[:-1] / std[:, None]).T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bias, w[-1] - (mean / std) @ w[:-1], rtol=1e-5, atol=1e-6)
