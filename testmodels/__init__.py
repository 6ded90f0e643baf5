"""Deterministic test models: random-weight structure builders and the trained digits classifier."""

from __future__ import annotations

from pathlib import Path

from testmodels.graph_builder import GraphBuilder
from testmodels.structures import (
    STRUCTURES,
    bottleneck_blocks,
    concat_branches,
    conv_chain,
    flatten_gemm_head,
    inverted_residual,
    residual_blocks,
    se_block,
)

_HERE = Path(__file__).resolve().parent
DIGITS_MODEL = _HERE / "digits_resnet.onnx"
"""Trained digits classifier: "input" [N, 1, 32, 32] -> "logits" [N, 10]."""
DIGITS_VGG = _HERE / "digits_vgg.onnx"
"""Trained VGG-style digits classifier (Flatten -> Gemm head), same input, output and data."""
DIGITS_CALIB = _HERE / "digits_calib.npz"
"""256 calibration samples: "input" float32 [256, 1, 32, 32], "labels" int64 [256]."""
DIGITS_EVAL = _HERE / "digits_eval.npz"
"""512 evaluation samples, disjoint from training and calibration data."""

__all__ = [
    "DIGITS_CALIB",
    "DIGITS_EVAL",
    "DIGITS_MODEL",
    "DIGITS_VGG",
    "STRUCTURES",
    "GraphBuilder",
    "bottleneck_blocks",
    "concat_branches",
    "conv_chain",
    "flatten_gemm_head",
    "inverted_residual",
    "residual_blocks",
    "se_block",
]
