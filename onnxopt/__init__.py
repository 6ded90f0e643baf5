"""onnxopt: an ONNX graph-rewriting optimizer that checks every rewrite with onnxruntime."""

from __future__ import annotations

from onnxopt.api import optimize
from onnxopt.data import FeedSource, open_feeds
from onnxopt.errors import DataError, ModelError, PipelineError, UserError
from onnxopt.manager import PassManager
from onnxopt.model_io import load, save
from onnxopt.options import option
from onnxopt.pass_base import (
    Pass,
    PassContext,
    PassResult,
    Refusal,
    Tolerance,
    get_pass,
    register_pass,
    registered_passes,
)
from onnxopt.pipeline import parse_pipeline
from onnxopt.report import PassRecord, RunReport, Status
from onnxopt.validation import Gates

__all__ = [
    "DataError",
    "FeedSource",
    "Gates",
    "ModelError",
    "Pass",
    "PassContext",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PipelineError",
    "Refusal",
    "RunReport",
    "Status",
    "Tolerance",
    "UserError",
    "get_pass",
    "load",
    "open_feeds",
    "optimize",
    "option",
    "parse_pipeline",
    "register_pass",
    "registered_passes",
    "save",
]

__version__ = "0.1.0"
