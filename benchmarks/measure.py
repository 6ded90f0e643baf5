"""Measurements of one model file: its cost, its outputs, their fidelity, and the inputs used."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import onnxopt
from onnxopt.cost import infer_shapes, model_cost
from onnxopt.model_io import file_size


def measure_cost(path: Path) -> dict[str, Any]:
    """Params, MACs per sample and bytes on disk of a model file.

    ``main_graph_only`` is set when the model has control flow (``If``/``Loop``): the MACs
    then count the main graph only, and how much of the rest runs depends on the data.
    """
    cost = model_cost(infer_shapes(onnxopt.load(path)))
    control_flow = any(cost.op_histogram.get(op) for op in ("If", "Loop", "Scan"))
    # The batched early-exit form runs its later stages on a number of samples known only at
    # run time, so their MACs are unknown: count what is known (the pass reports the expected).
    macs = cost.macs if cost.macs is not None or not control_flow else cost.macs_counted
    return {"params": cost.params, "macs": macs, "file_bytes": file_size(path),
            "main_graph_only": control_flow}


def predict(session: ort.InferenceSession, inputs: dict[str, np.ndarray],
            batch: int = 32) -> np.ndarray:
    """First output of ``session`` over all samples, in batches."""
    n = len(next(iter(inputs.values())))
    names = [i.name for i in session.get_inputs()]
    parts = [session.run(None, {k: inputs[k][s:s + batch] for k in names})[0]
             for s in range(0, n, batch)]
    return np.concatenate(parts, axis=0)


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of ``actual`` against ``reference`` in dB
    (None when the outputs are identical)."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((actual.astype(np.float64) - ref) ** 2))
    return None if noise == 0.0 else float(10 * np.log10(float(np.sum(ref**2)) / noise))


def random_npz(path: Path, model_path: Path, n: int, seed: int) -> Path:
    """Standard-normal samples for every model input, shaped from the model (batch axis n)."""
    proto = onnx.load(os.fspath(model_path), load_external_data=False)
    rng = np.random.default_rng(seed)
    arrays = {}
    for inp in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 1
                for d in inp.type.tensor_type.shape.dim]
        arrays[inp.name] = rng.standard_normal((n, *dims[1:]), dtype=np.float32)
    np.savez(path, **arrays)
    return path


def load_inputs(npz: Path, names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The arrays of ``names`` from an ``.npz``, and its ``labels`` if it has them."""
    with np.load(npz) as data:
        labels = np.asarray(data["labels"]).reshape(-1) if "labels" in data else None
        return {k: np.asarray(data[k]) for k in names}, labels


def static_batch(model_path: Path) -> int | None:
    """The fixed batch size of the model's first input; None when it is symbolic."""
    proto = onnx.load(os.fspath(model_path), load_external_data=False)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def take(array: np.ndarray, batch: int) -> np.ndarray:
    """The first ``batch`` samples of ``array``, repeating it when it has fewer."""
    reps = math.ceil(batch / len(array))
    return np.concatenate([array] * reps, axis=0)[:batch] if reps > 1 else array[:batch]
