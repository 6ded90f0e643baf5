"""The three-model recipe, written into a temporary folder for each test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.build.recipes import make_recipe


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    return make_recipe(tmp_path / "project")
