"""Test of the OCR benchmark's rec strata: agreement by fp32 confidence, accuracy vs the truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import ocr_quantize


def _probs(paths: list[list[int]], margins: list[float], classes: int = 4) -> np.ndarray:
    """Per-step distributions whose argmax follows ``paths``, with the given top-1 minus top-2."""
    out = np.zeros((len(paths), len(paths[0]), classes), np.float32)
    for n, (path, margin) in enumerate(zip(paths, margins, strict=True)):
        for t, c in enumerate(path):
            rest = (1.0 - (0.5 + margin / 2) - (0.5 - margin / 2)) / (classes - 2)
            out[n, t] = rest
            out[n, t, c] = 0.5 + margin / 2
            out[n, t, (c + 1) % classes] = 0.5 - margin / 2
    return out


def test_strata_split_agreement_by_fp32_margin_and_score_against_the_truth(
        tmp_path: Path) -> None:
    chars = ["blank", "a", "b", " "]
    paths = [[1, 0, 2], [2, 2, 1], [1, 1, 0], [2, 0, 2]]  # "ab", "ba", "a", "bb"
    ref = _probs(paths, [0.05, 0.2, 0.5, 0.9])
    other = [[1, 0, 1], [2, 2, 1], [2, 2, 0], [2, 0, 2]]  # "aa", "ba", "b", "bb"
    out = _probs(other, [0.5] * 4)
    (tmp_path / "rec_eval_meta.json").write_text(json.dumps(["ab", "bb", "a", "bb"]))
    res = ocr_quantize.rec_strata(out, ref, tmp_path, chars)
    assert res["agree"] == 0.5
    assert res["< 0.1"] == [0.0, 1] and res["0.1-0.3"] == [1.0, 1]
    assert res[">= 0.3"] == [0.5, 2]
    assert res["fp32_right"] == [1 / 3, 3]  # fp32 reads "ab", "a", "bb" right
    assert res["truth_exact"] == 0.25  # only "bb"
    # "aa" vs "ab": 1 edit, "ba" vs "bb": 1, "b" vs "a": 1, of 7 characters
    assert abs(res["truth_char"] - (1 - 3 / 7)) < 1e-9
    # fp32 against itself agrees everywhere; one gray level of noise spares the padding
    assert ocr_quantize.rec_strata(ref, ref, tmp_path, chars)["agree"] == 1.0
    x = np.zeros((2, 3, 4, 6), np.float32)
    x[:, :, :, :3] = 0.5
    noise = ocr_quantize._gray_level_noise(x)
    assert np.all(noise[..., 3:] == 0) and 0 < np.abs(noise[..., :3]).max() <= 2 / 255
