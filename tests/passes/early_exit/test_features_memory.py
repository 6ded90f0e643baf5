"""Early exit's feature collection: batches held to a memory budget give the same features."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from onnxopt import session
from onnxopt.cost import infer_shapes
from onnxopt.data import from_npz
from onnxopt.model_io import load
from onnxopt.passes.early_exit import exits
from onnxopt.passes.early_exit.cuts import find_cut_points


def test_features_of_batches_within_a_memory_budget_are_those_of_whole_batches(
        digits_model: Path, digits_eval: Path, monkeypatch) -> None:
    model = infer_shapes(load(digits_model))
    cuts = [p for p in find_cut_points(model) if p.name in ("relu2", "relu4", "relu8")]
    assert len(cuts) == 3
    sizes: list[int] = []
    stream_tensors = exits.stream_tensors

    def spy(*args, **kwargs):
        sizes.append(kwargs["batch_size"])
        return stream_tensors(*args, **kwargs)

    monkeypatch.setattr(exits, "stream_tensors", spy)
    whole = exits.collect_features(model, from_npz(digits_eval), cuts, limit=48)
    # a budget below one sample's cut tensors: one sample a batch
    monkeypatch.setattr(exits, "batch_within",
                        functools.partial(session.batch_within, budget=1))
    small = exits.collect_features(model, from_npz(digits_eval), cuts, limit=48)
    assert sizes == [64, 1]  # the batch asked for; then what the budget allows
    np.testing.assert_allclose(small.logits, whole.logits, rtol=1e-5, atol=1e-5)
    assert set(small.pooled) == set(whole.pooled) == {"relu2", "relu4", "relu8"}
    for name, mine in small.pooled.items():
        assert mine.shape[0] == 48
        np.testing.assert_allclose(mine, whole.pooled[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(small.labels, whole.labels)
