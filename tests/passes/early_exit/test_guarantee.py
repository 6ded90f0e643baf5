"""Tests of the threshold guarantees on synthetic scores whose true risk is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxopt.passes.early_exit.guarantee import (
    GRID,
    Guarantee,
    binomial_cdf,
    crc_level,
    envelope_scores,
    ltt_level,
    raw_losses,
    samples_needed,
)


def _draw(rng: np.random.Generator, n: int, slope: float) -> tuple[np.ndarray, np.ndarray]:
    """One exit; score ~ U(0, 10); disagreement with probability ``slope * (1 - s / 10)``."""
    s = rng.uniform(0, 10, n)
    disagree = rng.uniform(size=n) < slope * (1 - s / 10)
    return s[:, None], ~disagree[:, None]


def _true_risk(level: float, slope: float) -> float:
    """``P(s >= level and disagree)`` for :func:`_draw`: ``slope/10 * int_level^10 (1-s/10) ds``."""
    level = min(level, 10.0)
    return slope / 10 * ((10 - level) - (100 - level ** 2) / 20)


def test_conformal_risk_control_keeps_the_expected_risk() -> None:
    rng = np.random.default_rng(1)
    slope, target, n = 0.08, 0.99, 100
    risks, naive = [], []
    for _ in range(4000):
        s, agree = _draw(rng, n, slope)
        j, bound = crc_level(s, agree, target)
        risks.append(_true_risk(GRID[j], slope) if j is not None else 0.0)
        assert j is None or bound <= 1 - target + 1e-12
        # Without the finite-sample correction the risk would be too high on average.
        r = envelope_scores(s, agree)
        counts = n - np.searchsorted(np.sort(r), GRID, side="left")
        j_naive = int(np.flatnonzero(counts / n <= 1 - target).min())
        naive.append(_true_risk(GRID[j_naive], slope))
    assert _true_risk(0.0, slope) == pytest.approx(0.04)
    assert 0.8 * (1 - target) < np.mean(risks) <= 1 - target  # tight, and kept
    assert np.mean(naive) > 1 - target


def test_learn_then_test_keeps_the_risk_with_the_promised_probability() -> None:
    rng = np.random.default_rng(2)
    slope, target, confidence, n = 0.8, 0.9, 0.9, 200
    risks = []
    for _ in range(1000):
        s, agree = _draw(rng, n, slope)
        j, p_value = ltt_level(s, agree, target, confidence)
        assert j is not None and p_value <= 1 - confidence
        risks.append(_true_risk(GRID[j], slope))
    risks = np.asarray(risks)
    assert _true_risk(0.0, slope) == pytest.approx(0.4)
    assert np.mean(risks > 1 - target) <= 1 - confidence
    assert np.mean(risks) < 1 - target < risks.max() + 0.02  # not trivially conservative


def test_envelope_bounds_a_loss_that_is_not_monotone() -> None:
    # Exit 0 agrees at score 3; exit 1 disagrees at score 5: the staged answer disagrees only
    # for levels in (3, 5], so the raw loss goes 0 -> 1 -> 0 as the level rises.
    scores, agrees = np.array([[3.0, 5.0]]), np.array([[True, False]])
    grid = np.array([2.0, 4.0, 6.0])
    assert raw_losses(scores, agrees, grid).tolist() == [[False, True, False]]
    assert envelope_scores(scores, agrees).tolist() == [5.0]
    # A disagreeing exit behind a higher earlier score is never reached.
    assert envelope_scores(np.array([[6.0, 5.0]]), agrees).tolist() == [-math.inf]
    # Conformal risk control needs the level above 5 on one sample... and 99 samples at 0.99.
    many = np.repeat(scores, 99, axis=0), np.repeat(agrees, 99, axis=0)
    j, _ = crc_level(*many, 0.99)
    assert GRID[j] > 5.0 and GRID[j - 1] <= 5.0
    assert crc_level(*(a[:98] for a in many), 0.99) == (None, None)


def test_samples_needed_match_the_first_possible_level() -> None:
    assert samples_needed(0.99, None) == 99  # 1/(n+1) <= 0.01
    assert samples_needed(0.99, 0.9) == 230  # 0.99**n <= 0.1
    assert samples_needed(0.9, 0.9) == 22
    ok = np.ones((230, 1), dtype=bool)
    scores = np.full((230, 1), 1.0)
    assert ltt_level(scores, ok, 0.99, 0.9)[0] == 0
    assert ltt_level(scores[:229], ok[:229], 0.99, 0.9) == (None, None)
    assert crc_level(scores[:99], ok[:99], 0.99)[0] == 0
    assert crc_level(scores[:98], ok[:98], 0.99) == (None, None)


def test_binomial_cdf_matches_the_direct_sum() -> None:
    for n, p in ((10, 0.3), (50, 0.01), (230, 0.01)):
        for k in (0, 1, 3, n):
            direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i)
                         for i in range(min(k, n) + 1))
            assert binomial_cdf(k, n, p) == pytest.approx(direct, rel=1e-9)


def test_shortfall_message_names_the_samples_needed() -> None:
    g = Guarantee(0.99, 0.9, 128, 128, None, None, samples_needed(0.99, 0.9))
    message = g.shortfall(460)
    assert message is not None and "needs at least 230 (at least 460 calibration" in message
    assert "with probability 0.9" in message
    assert Guarantee(0.99, None, 128, 128, 3, 0.008, 99).shortfall(132) is None
    assert "in expectation (conformal risk control" in Guarantee(
        0.99, None, 128, 128, 3, 0.008, 99).describe()


def test_threshold_samples_by_default_cover_the_promise_when_they_can() -> None:
    from onnxopt.passes.early_exit.planning import samples_for, threshold_count

    assert threshold_count(256, None, 99) == 128  # half is plenty
    assert threshold_count(192, None, 99) == 123  # 1.25x of 99, the heads keep 69
    assert threshold_count(120, None, 99) == 90  # a quarter stays for the heads
    assert threshold_count(256, 0.5, 230) == 128 and threshold_count(256, None, 230) == 192
    assert samples_for(99, None) == 131 and samples_for(230, 0.5) == 460
    assert threshold_count(samples_for(230, None), None, 230) >= 230
    assert threshold_count(samples_for(230, None) - 1, None, 230) < 230
