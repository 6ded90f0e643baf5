"""Runners for artefacts that are more than one model: early-exit bundles.

``EarlyExitModel(path)`` loads a bundle folder (``manifest.json`` plus stage and head models)
written by :func:`write_bundle` and runs it sample by sample, stopping at the first confident
exit.
"""

from __future__ import annotations

from onnxopt.runtime.bundle import read_manifest, write_bundle
from onnxopt.runtime.early_exit import EarlyExitModel, EarlyExitResult

__all__ = ["EarlyExitModel", "EarlyExitResult", "read_manifest", "write_bundle"]
