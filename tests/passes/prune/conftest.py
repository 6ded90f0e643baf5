"""Fixtures shared by the prune tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxopt.passes.prune.latency_cache import CACHE_ENV


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty latency cache (never the user's)."""
    folder = tmp_path / "latency-cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder
