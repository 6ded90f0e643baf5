"""Exit thresholds with a stated guarantee on new samples: conformal risk control, Learn-then-Test.

Setting. Every exit ``k`` gives a sample a calibrated score ``s_k`` (:mod:`.heads`); with one
shared level ``lam`` the sample answers at the first exit whose score reaches ``lam``, and
runs the full model when none does. The loss of a sample is 1 when its staged answer differs
from the full model's top-1 class, else 0 (no labels needed). The levels form a grid
(:data:`GRID`) fixed before any data is seen, ordered from aggressive (low) to conservative
(high); above the grid no sample exits and the loss is 0.

- **In expectation** (conformal risk control, Angelopoulos et al. 2022). The raw loss is not
  monotone in ``lam`` (raising it can move a sample from an agreeing exit to a disagreeing
  later one), so it is bounded by its monotone envelope ``L'(lam) = max over lam' >= lam of
  L(lam')``: 1 exactly when some disagreeing exit ``k`` has ``s_k >= lam`` and a score above
  every earlier exit's. On ``n`` calibration samples the smallest ``lam`` with
  ``n/(n+1) * mean L'(lam) + 1/(n+1) <= 1 - target`` gives ``E[L] <= E[L'] <= 1 - target``
  on a new sample from the same distribution: expected agreement at least ``target``.
  Possible only when ``1/(n+1) <= 1 - target``.
- **With probability** ``confidence`` over the calibration draw (Learn-then-Test, Angelopoulos,
  Bates et al. 2021; as CALM uses it for early-exit language models). For each level from the
  most conservative down, test "risk(lam) > 1 - target" with the exact binomial p-value
  ``P(Binomial(n, 1 - target) <= disagreements)``; stop at the first level not rejected at
  ``delta = 1 - confidence`` and keep the last rejected one (fixed-sequence testing, valid for
  any loss, monotone or not). Possible only when ``target ** n <= delta``.

Both only need the calibration samples to be exchangeable with the new ones and untouched by
whatever was fitted (heads, temperatures, the choice of exits): :mod:`.exits` holds out the
threshold samples for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Levels of calibrated margin, aggressive to conservative, fixed before seeing data.
GRID = np.linspace(0.0, 50.0, 2001)


@dataclass(frozen=True)
class Guarantee:
    """What the thresholds promise, and on what evidence.

    Attributes:
        target: Promised agreement with the full model on new samples.
        confidence: None for the in-expectation promise, else the probability over the
            calibration draw (Learn-then-Test).
        samples: Calibration samples the level was chosen on.
        head_samples: Calibration samples the heads were fitted on (held apart).
        level: Chosen level (index into :data:`GRID`), None when no exit is allowed.
        bound: The certified quantity at the chosen level: the corrected risk (in
            expectation) or the p-value (with probability); None without exits.
        needed: Threshold samples the promise needs before any exit is possible.
    """

    target: float
    confidence: float | None
    samples: int
    head_samples: int
    level: int | None
    bound: float | None
    needed: int

    @property
    def kind(self) -> str:
        """``in expectation`` or ``with probability P``."""
        return ("in expectation" if self.confidence is None
                else f"with probability {self.confidence:g}")

    @property
    def method(self) -> str:
        """The procedure that chose the level."""
        return ("conformal risk control" if self.confidence is None
                else "Learn-then-Test, binomial p-value")

    def describe(self) -> str:
        """One line: the promise and its evidence."""
        return (f"promised: agreement >= {self.target:g} on new samples {self.kind} "
                f"({self.method} on {self.samples} held-out samples; heads fitted on "
                f"{self.head_samples})")

    def shortfall(self, total: int) -> str | None:
        """A message saying how many samples are needed, when the given ones are too few.

        Args:
            total: Calibration samples whose threshold part would be :attr:`needed`.
        """
        if self.samples >= self.needed:
            return None
        return (f"{self.samples} threshold samples are too few for agreement {self.target:g} "
                f"{self.kind}: it needs at least {self.needed} (at least {total} calibration "
                f"samples; unlabelled ones will do)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"target": self.target, "kind": self.kind, "method": self.method,
                "confidence": self.confidence, "threshold_samples": self.samples,
                "head_samples": self.head_samples,
                "level": None if self.level is None else float(GRID[self.level]),
                "bound": self.bound, "samples_needed": self.needed}


def samples_needed(target: float, confidence: float | None) -> int:
    """Fewest threshold samples for which any exit can be allowed (with no disagreement seen)."""
    alpha = 1.0 - target
    if alpha <= 0:
        return math.inf  # type: ignore[return-value]
    if confidence is None:
        return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))
    return max(1, math.ceil(math.log(1.0 - confidence) / math.log(target) - 1e-9))


def exit_index(scores: np.ndarray, grid: np.ndarray = GRID) -> np.ndarray:
    """Per sample and level, the exit that answers (``K`` = the full model): ``[n, levels]``."""
    n, k_exits = scores.shape
    index = np.full((n, len(grid)), k_exits, dtype=np.int64)
    for k in reversed(range(k_exits)):
        index[scores[:, k][:, None] >= grid[None, :]] = k
    return index


def raw_losses(scores: np.ndarray, agrees: np.ndarray, grid: np.ndarray = GRID) -> np.ndarray:
    """Disagreement of the staged answer per sample and level, ``[n, levels]`` booleans."""
    n = len(scores)
    agree_full = np.c_[agrees, np.ones(n, dtype=bool)]
    return ~agree_full[np.arange(n)[:, None], exit_index(scores, grid)]


def envelope_scores(scores: np.ndarray, agrees: np.ndarray) -> np.ndarray:
    """Per sample, the highest level at which the monotone envelope loss is still 1.

    ``L'(lam) = 1`` iff ``lam <= r`` with ``r`` the largest score of a disagreeing exit
    whose score beats every earlier exit's; ``-inf`` when there is none.
    """
    n = len(scores)
    if scores.shape[1] == 0:
        return np.full(n, -np.inf)
    earlier = np.c_[np.full(n, -np.inf), np.maximum.accumulate(scores, axis=1)[:, :-1]]
    record = ~agrees & (scores > earlier)
    return np.where(record, scores, -np.inf).max(axis=1)


def crc_level(scores: np.ndarray, agrees: np.ndarray, target: float,
              grid: np.ndarray = GRID) -> tuple[int | None, float | None]:
    """Conformal risk control: the lowest grid level whose corrected envelope risk is allowed.

    Returns:
        ``(index into grid, corrected risk there)``, or ``(None, None)`` when no level is.
    """
    n = len(scores)
    alpha = 1.0 - target
    if n == 0:
        return None, None
    r = envelope_scores(scores, agrees)
    # mean L'(lam) = share of r >= lam; non-increasing in lam.
    counts = n - np.searchsorted(np.sort(r), grid, side="left")
    corrected = n / (n + 1) * counts / n + 1.0 / (n + 1)
    ok = np.flatnonzero(corrected <= alpha + 1e-12)
    if len(ok) == 0:
        return None, None
    j = int(ok.min())
    return j, float(corrected[j])


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= k)``, summed in log space."""
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p
             + (n - i) * log_q for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def ltt_level(scores: np.ndarray, agrees: np.ndarray, target: float, confidence: float,
              grid: np.ndarray = GRID) -> tuple[int | None, float | None]:
    """Learn-then-Test with fixed-sequence testing from the most conservative level down.

    Returns:
        ``(index into grid, p-value there)``, or ``(None, None)`` when the first test fails.
    """
    n = len(scores)
    alpha, delta = 1.0 - target, 1.0 - confidence
    if n == 0:
        return None, None
    losses = raw_losses(scores, agrees, grid).sum(axis=0)
    chosen: tuple[int | None, float | None] = (None, None)
    cache: dict[int, float] = {}
    for j in reversed(range(len(grid))):
        k = int(losses[j])
        if k not in cache:
            cache[k] = binomial_cdf(k, n, alpha)
        if cache[k] > delta:
            break
        chosen = (j, cache[k])
    return chosen


def choose_level(scores: np.ndarray, agrees: np.ndarray, target: float,
                 confidence: float | None, grid: np.ndarray = GRID,
                 ) -> tuple[int | None, float | None]:
    """The level of the requested guarantee (see the module docstring)."""
    if confidence is None:
        return crc_level(scores, agrees, target, grid)
    return ltt_level(scores, agrees, target, confidence, grid)
