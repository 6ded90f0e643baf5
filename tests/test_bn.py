"""onnxopt.bn: inference BatchNormalization as a per-channel affine map."""

from __future__ import annotations

import numpy as np

from onnxopt.bn import bn_affine


def test_bn_affine_matches_batchnorm() -> None:
    rng = np.random.default_rng(0)
    gamma, beta, mean = rng.normal(size=(3, 4))
    var = rng.uniform(0.5, 1.5, 4)
    g, h = bn_affine(gamma, beta, mean, var, 1e-3)
    y = rng.normal(size=(2, 4))
    np.testing.assert_allclose(g * y + h, gamma * (y - mean) / np.sqrt(var + 1e-3) + beta)
