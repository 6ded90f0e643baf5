"""Test of the shared OCR renderer: the lines and pages both OCR benchmarks feed."""

from __future__ import annotations

import string

import numpy as np

from benchmarks.corpus import ocr_task

CHARS = list(string.ascii_letters + string.digits + ".,:-/")


def test_text_lines_and_pages_are_seeded_padded_turned_and_bgr_on_request() -> None:
    x, texts, angles = ocr_task.text_lines(ocr_task.Renderer(CHARS, 5), 6, 48, 192, turn=True)
    assert x.shape == (6, 3, 48, 192) and x.dtype == np.float32
    assert angles == [0, 180, 0, 180, 0, 180] and all(texts)
    assert x.min() >= -1.0 and x.max() <= 1.0
    # right padding stays exactly zero; text is dark on light paper
    for line in x:
        inked = np.flatnonzero(np.abs(line).sum(axis=(0, 1)) > 0)
        assert inked[0] == 0 and np.all(line[:, :, inked[-1] + 1:] == 0)
    again, texts2, _ = ocr_task.text_lines(
        ocr_task.Renderer(CHARS, np.random.default_rng(5)), 6, 48, 192, turn=True, bgr=True)
    assert texts2 == texts  # the same seed, as an int or a generator, renders the same lines
    np.testing.assert_array_equal(again, x[:, ::-1])  # BGR: only the channel order differs
    pages, lines = ocr_task.text_pages(ocr_task.Renderer(CHARS, 2), 2, 96)
    assert pages.shape == (2, 3, 96, 96) and len(lines) == 2 and all(lines)
