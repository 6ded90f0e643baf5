"""CI sample of the corpus self-check: every K-th real ONNX model through each default pass.

The full run is ``python -m onnxopt.selfcheck`` (about 1,500 runnable models). Here every
``SAMPLE``-th case of the same corpus, plus the cases that once failed, goes through each pass
of :func:`onnxopt.selfcheck.default_passes` (the registered exact passes and ``quantize``):
never a crash, an invalid model or a silent output change. ``cleanup`` and ``fold-bn`` must
not even need a rollback on this sample.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest

from onnxopt.selfcheck import (
    FAILURES,
    Case,
    _run_original,
    check_case,
    collect,
    default_passes,
)

#: Every SAMPLE-th corpus case (about 80 models, a few seconds per pass on 2 cores).
SAMPLE = 25
#: Cases that once crashed, were rolled back or were invalid; always in the sample.
REGRESSIONS = (
    "test_affine_grid_2d_align_corners_expanded",  # If on a folded Size -> Range of [1]
    "test_affine_grid_3d_expanded",
    "test_if_opt",  # optional/sequence values typed as tensors by shape inference
    "test_loop16_seq_none",
    "test_sequence_map_identity_1_sequence_expanded",  # SequenceEmpty folded to a tensor
    "simple/test_sequence_model1",
)
#: Passes for which even a rollback on the sample is a failure.
NO_ROLLBACK = ("cleanup", "fold-bn")


@pytest.fixture(scope="module")
def corpus() -> Iterator[list[tuple[Case, list[list[np.ndarray]]]]]:
    """The sampled cases that onnxruntime can run, with their reference outputs."""
    logger = logging.getLogger("onnxopt")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # rollbacks are asserted on, not logged
    cases = collect()
    names = {c.name for c in cases}
    assert set(REGRESSIONS) <= names, set(REGRESSIONS) - names
    picked = cases[::SAMPLE]
    picked += [c for c in cases if c.name in REGRESSIONS and c not in picked]
    runnable = []
    for case in picked:
        reference = _run_original(case)
        if reference is not None:
            runnable.append((case, reference))
    assert len(runnable) > 60
    yield runnable
    logger.setLevel(level)


@pytest.mark.parametrize("pass_name", default_passes())
def test_corpus_sample(corpus: list[tuple[Case, list[list[np.ndarray]]]],
                       pass_name: str) -> None:
    outcomes = [check_case(case, pass_name, reference) for case, reference in corpus]
    bad = [o for o in outcomes if o.verdict in FAILURES]
    if pass_name in NO_ROLLBACK:
        bad += [o for o in outcomes if o.verdict == "rolled back"]
    assert not bad, "\n".join(f"{o.verdict}: {o.case}: {o.detail[:200]}" for o in bad)
