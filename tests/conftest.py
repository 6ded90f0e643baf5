"""Shared fixtures: paths to the bundled trained model and its data, built test models."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so CI never flakes on a new draw;
# widen them locally with HYPOTHESIS_PROFILE=explore.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parents[1]
TESTMODELS = ROOT / "testmodels"


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return TESTMODELS / "digits_resnet.onnx"


@pytest.fixture(scope="session")
def digits_vgg() -> Path:
    return TESTMODELS / "digits_vgg.onnx"


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


@pytest.fixture()
def umask_027():
    """Run with umask 027 (files 0640, folders 0750), then restore the old one."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)
