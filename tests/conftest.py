"""Shared fixtures: paths to the bundled trained model and its data, built test models."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTMODELS = ROOT / "testmodels"


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return TESTMODELS / "digits_resnet.onnx"


@pytest.fixture(scope="session")
def digits_calib() -> Path:
    return TESTMODELS / "digits_calib.npz"


@pytest.fixture(scope="session")
def digits_eval() -> Path:
    return TESTMODELS / "digits_eval.npz"


@pytest.fixture()
def conv_chain_path(tmp_path: Path) -> Path:
    from testmodels.structures import conv_chain

    path = tmp_path / "conv_chain.onnx"
    onnx.save(conv_chain(), path)
    return path
