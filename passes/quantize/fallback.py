"""Accuracy-aware fallback and the per-node error report.

* Per-node SQNR: ``10 log10(sum x**2 / sum (x' - x)**2)`` between a tensor of the float model
  and the same tensor in the quantized model, over the calibration samples (streamed sums).
* Sensitivity of a node: the SQNR of the model *outputs* when that node alone is quantized;
  lower means more sensitive.
* Fallback: keep the ``k`` most sensitive nodes float, ``k = 0, 1, ...``, until the score meets
  the target. The score is top-1 agreement with the float model, or, when the calibration data
  has labels, the quantized accuracy relative to the float accuracy (``acc_q / acc_f``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.data import FeedSource
from onnxopt.session import BATCH_BYTES, batch_within, stream_tensors

logger = logging.getLogger(__name__)


@dataclass
class EvalData:
    """Float reference outputs on a fixed slice of the calibration data."""

    source: FeedSource
    limit: int | None
    batch_size: int
    input_shapes: Mapping[str, tuple[int, ...]] | None
    outputs: list[list[np.ndarray]]
    labels: np.ndarray | None
    names: list[str]


def sqnr_db(signal: float, noise: float) -> float:
    """SQNR in dB from summed squares (inf when there is no noise)."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def reference(float_model: ir.Model, source: FeedSource, *, limit: int | None, batch_size: int,
              input_shapes: Mapping[str, tuple[int, ...]] | None) -> EvalData:
    """Run the float model once and keep its outputs (and labels) for later comparisons."""
    names = [v.name or "" for v in float_model.graph.outputs]
    outputs: list[list[np.ndarray]] = []
    labels: list[np.ndarray] = []
    for (tensors,), lab in stream_tensors([float_model], [names], source, batch_size=batch_size,
                                          limit=limit, input_shapes=input_shapes):
        outputs.append([tensors[n] for n in names])
        if lab is not None:
            labels.append(np.asarray(lab).reshape(-1))
    joined = np.concatenate(labels) if labels and len(labels) == len(outputs) else None
    return EvalData(source, limit, batch_size, input_shapes, outputs, joined, names)


def score(model: ir.Model, ref: EvalData) -> tuple[float, float]:
    """``(score, output SQNR in dB)`` of ``model`` against the reference (see module doc)."""
    agree = total = correct = correct_ref = 0
    signal = noise = 0.0
    label_pos = 0
    batches = stream_tensors([model], [ref.names], ref.source, batch_size=ref.batch_size,
                             limit=ref.limit, input_shapes=ref.input_shapes)
    for ((tensors,), _), expected in zip(batches, ref.outputs, strict=False):
        got = tensors[ref.names[0]].astype(np.float64)
        want = expected[0].astype(np.float64)
        signal += float(np.sum(want**2))
        noise += float(np.sum((got - want) ** 2))
        if want.ndim == 2 and want.shape[1] > 1:
            n = want.shape[0]
            agree += int(np.sum(got.argmax(1) == want.argmax(1)))
            if ref.labels is not None:
                lab = ref.labels[label_pos:label_pos + n]
                correct += int(np.sum(got.argmax(1) == lab))
                correct_ref += int(np.sum(want.argmax(1) == lab))
            label_pos += n
            total += n
    if not total:
        return 1.0 - min(1.0, math.sqrt(noise / signal) if signal else 0.0), sqnr_db(signal, noise)
    if ref.labels is not None and correct_ref:
        return correct / correct_ref, sqnr_db(signal, noise)
    return agree / total, sqnr_db(signal, noise)


def tensor_sqnr(float_model: ir.Model, quant_model: ir.Model, names: Mapping[str, str],
                source: FeedSource, *, limit: int, batch_size: int,
                input_shapes: Mapping[str, tuple[int, ...]] | None) -> dict[str, float]:
    """SQNR per tensor: float-model name -> dB, with ``names`` mapping to the quantized model."""
    keys = list(names)
    signal = dict.fromkeys(keys, 0.0)
    noise = dict.fromkeys(keys, 0.0)
    # two models' tensors per batch: each gets half the memory
    batch_size = batch_within(float_model, keys, source, batch_size, input_shapes=input_shapes,
                              budget=BATCH_BYTES // 2)
    for (ref, got), _ in stream_tensors([float_model, quant_model],
                                        [keys, [names[k] for k in keys]], source,
                                        batch_size=batch_size, limit=limit,
                                        input_shapes=input_shapes, desc="per-node SQNR"):
        for k in keys:
            r, g = ref[k].reshape(-1), got[names[k]].reshape(-1)
            d = g - r if g.dtype == r.dtype else g.astype(np.float64) - r
            # sums of squares accumulated in float64 without float64 copies of the tensors
            signal[k] += float(np.einsum("i,i->", r, r, dtype=np.float64))
            noise[k] += float(np.einsum("i,i->", d, d, dtype=np.float64))
    return {k: sqnr_db(signal[k], noise[k]) for k in keys}


def choose_float_nodes(candidates: list[int], build: Callable[[set[int]], ir.Model],
                       ref: EvalData, target: float, max_nodes: int,
                       ) -> tuple[set[int], dict[str, object]]:
    """Rank ``candidates`` by sensitivity and keep the fewest most sensitive ones float.

    Args:
        candidates: Graph-order indices of the quantized compute nodes.
        build: Builds the quantized model with the given indices kept float.
        ref: Float reference outputs.
        target: Score to reach (see module doc).
        max_nodes: Most nodes to keep float.

    Returns:
        The indices to keep float and a trace for the report.
    """
    base, base_sqnr = score(build(set()), ref)
    trace: dict[str, object] = {"score_all_quantized": base, "target": target}
    if base >= target or not candidates:
        return set(), trace
    everything = set(candidates)
    sensitivity = {i: score(build(everything - {i}), ref)[1] for i in candidates}
    order = sorted(candidates, key=lambda i: sensitivity[i])
    trace["sensitivity_sqnr_db"] = {str(i): sensitivity[i] for i in order}
    best, best_score = set(), base
    steps = []
    for k in range(1, min(max_nodes, len(order)) + 1):
        kept = set(order[:k])
        value, _ = score(build(kept), ref)
        steps.append(value)
        if value > best_score:
            best, best_score = kept, value
        if value >= target:
            break
    trace["scores"] = steps
    trace["reached"] = best_score >= target
    logger.info("fallback keeps %d nodes float (score %.4f, target %.4f)", len(best),
                best_score, target)
    return best, trace
