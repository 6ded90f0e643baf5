"""Side-by-side timing: pairs adjacent to the baseline, interleaved, on a simulated clock."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt import timing


class _Clock:
    """A clock that only moves when a simulated session runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Session:
    """Takes ``cost`` seconds a run; every ``slow_every``-th run is interrupted (10x)."""

    def __init__(self, name: str, cost: float, clock: _Clock, log: list[str],
                 slow_every: int = 0) -> None:
        self.name, self.cost, self.clock, self.log = name, cost, clock, log
        self.slow_every, self.runs = slow_every, 0

    def run(self, outputs, feed):
        assert feed == {"x": self.name}  # each session gets its own feed
        self.runs += 1
        slow = self.slow_every and self.runs % self.slow_every == 0
        self.clock.now += self.cost * (10 if slow else 1)
        self.log.append(self.name)


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_paired_ratios_are_the_cost_ratios_and_every_pair_is_adjacent(clock) -> None:
    log: list[str] = []
    sessions = {name: _Session(name, cost, clock, log)
                for name, cost in (("base", 2e-3), ("aa", 2e-3), ("half", 1e-3))}
    feeds = {name: {"x": name} for name in sessions}
    found = timing.paired_samples(sessions, feeds, "base", rounds=9, sample_seconds=0.01)
    assert found.ratios["aa"] == pytest.approx([1.0] * 9)
    assert found.ratios["half"] == pytest.approx([0.5] * 9)
    assert found.inner == {"base": 5, "aa": 5, "half": 10}  # 10 ms a sample
    assert len(found.times["base"]) == 18  # pooled over both others' pairs
    # after the warm-up: blocks of inner runs, each other block next to a baseline block
    timed = log[-(18 * 5 + 9 * 5 + 9 * 10):]
    blocks = []
    for name in timed:
        if not blocks or blocks[-1][0] != name or blocks[-1][1] == found.inner[name]:
            blocks.append([name, 0])
        blocks[-1][1] += 1
    pairs = [blocks[i:i + 2] for i in range(0, len(blocks), 2)]
    assert len(pairs) == 18
    assert all([b[0] for b in pair].count("base") == 1 for pair in pairs)
    firsts = {pair[0][0] == "base" for pair in pairs}
    assert firsts == {True, False}  # which goes first is random


def test_min_statistic_ignores_interrupted_runs(clock) -> None:
    log: list[str] = []
    sessions = {"base": _Session("base", 1e-3, clock, log, slow_every=3),
                "other": _Session("other", 3e-3, clock, log, slow_every=4)}
    feeds = {name: {"x": name} for name in sessions}
    mean = timing.paired_samples(sessions, feeds, "base", rounds=5, min_runs=6)
    best = timing.paired_samples(sessions, feeds, "base", rounds=5, min_runs=6,
                                 statistic="min")
    assert best.ratios["other"] == pytest.approx([3.0] * 5)
    assert np.median(best.times["base"]) == pytest.approx(1e-3)
    assert not np.allclose(mean.ratios["other"], 3.0)  # the mean sees the interruptions


def test_baseline_alone_still_has_its_time_and_a_missing_baseline_is_refused(clock) -> None:
    sessions = {"base": _Session("base", 1e-3, clock, [])}
    found = timing.paired_samples(sessions, {"base": {"x": "base"}}, "base", rounds=4)
    assert found.ratios == {} and len(found.times["base"]) == 4
    with pytest.raises(KeyError, match="nope"):
        timing.paired_samples(sessions, {"base": {"x": "base"}}, "nope", rounds=1)
    assert timing.quartiles([1, 2, 3, 4, 5]) == (2.0, 3.0, 4.0)
