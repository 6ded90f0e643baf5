"""Peer tools run on the same models and data: onnxruntime's quantize_static (QDQ) and onnxsim."""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

logger = logging.getLogger(__name__)

#: Calibration samples per CalibrationDataReader batch.
CALIB_BATCH = 32


class NpzCalibrationReader(CalibrationDataReader):
    """Feeds the arrays of a calibration ``.npz`` (keyed by input name) in batches.

    Keys that are not model inputs (``labels``) are ignored.
    """

    def __init__(self, npz_path: str | os.PathLike, input_names: list[str],
                 batch: int = CALIB_BATCH) -> None:
        with np.load(npz_path) as data:
            self._arrays = {name: np.asarray(data[name]) for name in input_names}
        self._batch = batch
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        n = len(next(iter(self._arrays.values())))
        for start in range(0, n, self._batch):
            yield {k: v[start:start + self._batch] for k, v in self._arrays.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def _input_names(model_path: str | os.PathLike) -> list[str]:
    model = onnx.load(os.fspath(model_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _preprocess(model_path: str, out_dir: str) -> tuple[str, str]:
    """onnxruntime's recommended pre-processing (shape inference, graph optimization).

    Returns the path to quantize and a note; falls back to the raw model if it fails.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = os.path.join(out_dir, "preprocessed.onnx")
    try:
        quant_pre_process(model_path, target, skip_symbolic_shape=False)
        return target, "quant_pre_process"
    except Exception as exc:  # the peer's own pre-processing failing is a result, not a crash
        logger.warning("quant_pre_process failed (%s); quantizing the raw model", exc)
        return model_path, f"quant_pre_process failed: {str(exc)[:80]}"


def _ort_qdq(per_channel: bool, activation: QuantType) -> Callable[[str, str, str | None], str]:
    def run(model_path: str, output_path: str, calib_path: str | None) -> str:
        if calib_path is None:
            raise ValueError("quantize_static needs calibration data")
        with tempfile.TemporaryDirectory() as tmp:
            source, note = _preprocess(model_path, tmp)
            reader = NpzCalibrationReader(calib_path, _input_names(source))
            quantize_static(
                source, output_path, reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        act = "U8" if activation == QuantType.QUInt8 else "S8"
        granularity = "per-channel" if per_channel else "per-tensor"
        return f"{note}; quantize_static QDQ, MinMax, {act} activations, S8 weights {granularity}"
    return run


def _onnxsim(model_path: str, output_path: str, calib_path: str | None) -> str:
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(model_path))
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model")
    onnx.save(simplified, output_path)
    return f"onnxsim {getattr(onnxsim, '__version__', '?')} simplify()"


@dataclass(frozen=True)
class Peer:
    """A tool we compare against.

    Attributes:
        label: Row label in the results.
        run: ``run(model_path, output_path, calib_path) -> note`` writes the peer's model.
        needs_calib: Whether it needs calibration data.
        module: Python module it needs; the peer is skipped when it is not importable.
        preload: Modules imported before the timed call, so import time and memory are
            not counted as the tool's work.
    """

    label: str
    run: Callable[[str, str, str | None], str]
    needs_calib: bool
    module: str
    preload: tuple[str, ...] = ()

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def import_modules(self) -> None:
        """Import the tool's modules (outside the timed block)."""
        for name in (self.module, *self.preload):
            importlib.import_module(name)


_ORT_PRELOAD = ("onnxruntime.quantization.shape_inference",
                "onnxruntime.tools.symbolic_shape_infer")
#: Every peer; one that is not importable is listed as skipped in the results.
PEERS: list[Peer] = [
    # U8 activations with S8 weights is the type pair onnxruntime's x86 int8 kernels are
    # fastest with (VNNI/VPMADDUBSW); S8/S8 is quantize_static's default.
    Peer("ort QDQ per-channel U8S8", _ort_qdq(True, QuantType.QUInt8), True,
         "onnxruntime.quantization", _ORT_PRELOAD),
    Peer("ort QDQ per-tensor U8S8", _ort_qdq(False, QuantType.QUInt8), True,
         "onnxruntime.quantization", _ORT_PRELOAD),
    Peer("ort QDQ per-channel S8S8 (default)", _ort_qdq(True, QuantType.QInt8), True,
         "onnxruntime.quantization", _ORT_PRELOAD),
    Peer("onnxsim", _onnxsim, False, "onnxsim"),
]


def get_peer(label: str) -> Peer:
    """The peer with this label (KeyError if unknown)."""
    for peer in PEERS:
        if peer.label == label:
            return peer
    raise KeyError(label)


def run_peer(label: str, model_path: str | Path, output_path: str | Path,
             calib_path: str | Path | None) -> str:
    """Run one peer; returns its note (what exactly was run)."""
    peer = get_peer(label)
    return peer.run(os.fspath(model_path), os.fspath(output_path),
                    None if calib_path is None else os.fspath(calib_path))
