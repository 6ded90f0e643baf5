"""Float fallback: the int8 model is scored against the quality floor; sensitive nodes stay float.

* Score of a model against the float model's outputs on the pass's own samples, with the
  quality floor's metrics (:class:`onnxopt.compare.QualityFloor`): for classifier outputs
  (``[N, C]``) top-1 agreement; for sequences of class distributions (``[N, T, C]``, a CTC
  recognizer's softmax) the share of samples whose whole per-step argmax path agrees (the same
  path decodes to the same text); for every other float output (maps, boxes, embeddings) the
  SQNR ``10 log10(sum x**2 / sum (x' - x)**2)``, and when the slices of that output along
  one of its slice axes differ in scale by more than :data:`SCALE_SPREAD` (RMS of the
  largest over the smallest), the worst slice's SQNR as well: one SQNR over a detector's
  ``[N, 4 + C, A]`` output is the SQNR of its pixel coordinates, blind to the class-score
  rows that decide which boxes are kept (:func:`output_sqnr`). The slice axes are those
  of at most :data:`MAX_SLICES` entries other than the output's batch axis (read from the
  model's dims like an input's, :func:`onnxopt.inputs.batch_axes`): both of a 3-d output
  (``[N, 4 + C, A]`` and the class-last ``[N, A, 5 + C]`` alike, and a recurrent state
  ``[2, N, H]`` on its first and last axes), only the channels of a map (``[N, C, H, W]``).
  One probability per sample (``[N]`` or ``[N, 1]`` in [0, 1], e.g. a voice-activity
  detector) is also a yes/no decision at 0.5, whose agreement the pass holds to the
  agreement target besides the SQNR (stricter than the floor, which only asks for the SQNR).
* Targets: the floor the manager will apply, plus a margin (the manager judges held-out
  samples), or the ``target`` agreement the user gave.
* Sensitivity of a node, from one run of the best model so far (all-int8, bias-corrected or
  compute-only; in the dynamic-MatMul stage its own model) beside the float model: the SQNR
  its output loses against its inputs, ``min_i SQNR(in_i) - SQNR(out)``, each tensor as its
  readers see it (after its QuantizeLinear/DequantizeLinear) and its SQNR averaged over
  channels: the error the node adds with its weights and its output's quantization. The
  report's per-node SQNR is the same streamed sum over whole tensors.
* Fallback (each probe is one build and one scoring run). When the all-int8 model misses
  the targets, first bias correction (when left to the search), then only the compute ops
  (Conv, ConvTranspose, Gemm, MatMul) keep int8 inputs: the elementwise ops, pools and
  activations between them stay float, which removes most requantizations at little cost in
  speed (onnxruntime still runs every compute op as an integer kernel). Then the ``k`` most
  sensitive planned nodes of the better of those models stay float, ``k`` found by doubling
  and then bisecting (:func:`choose_float_nodes`). On a model with MatMuls of a
  constant weight the search then tries them dynamic int8 beside static Convs, and last
  alone (:mod:`.search` has the stages). When no probe meets the targets, the pass
  quantizes nothing and reports the best probe: an int8 model below the floor is never
  handed back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.compare import (
    QualityFloor,
    class_sequence_like,
    classifier_like,
    same_top1,
    sqnr_db,
)
from onnxopt.data import FeedSource
from onnxopt.inputs import output_batch_axes
from onnxopt.session import BATCH_BYTES, batch_within, stream_tensors

logger = logging.getLogger(__name__)

#: Margins above the manager's floor that the pass aims for on its own samples.
AGREEMENT_MARGIN = 0.03
SQNR_MARGIN_DB = 1.0
#: SQNR credited to an input that is not quantized (a graph input, a float node's output).
CLEAN_DB = 60.0
#: RMS ratio of the largest to the smallest slice (along a slice axis) of a float output
#: above which each slice is held to the SQNR target on its own, not only the whole output.
SCALE_SPREAD = 100.0
#: Most entries a slice axis may have (anchors and sequence steps are not slices).
MAX_SLICES = 1024


@dataclass
class EvalData:
    """Float reference outputs on a fixed slice of the calibration data."""

    source: FeedSource
    limit: int | None
    batch_size: int
    input_shapes: Mapping[str, tuple[int, ...]] | None
    outputs: list[list[np.ndarray]]
    names: list[str]
    kinds: list[str]
    batch_axes: list[int] | None = None


@dataclass(frozen=True)
class Targets:
    """What the fallback aims for: agreement on class outputs, SQNR on the others."""

    min_agreement: float
    min_sqnr_db: float

    @classmethod
    def from_floor(cls, floor: QualityFloor | None, target: float | None) -> Targets:
        """The floor (default when None) plus the margins; ``target`` replaces the agreement."""
        floor = floor if floor is not None else QualityFloor()
        agreement = (target if target is not None else
                     min(1.0, floor.min_agreement + AGREEMENT_MARGIN) if floor.min_agreement > 0
                     else 0.0)
        sqnr = floor.min_sqnr_db + SQNR_MARGIN_DB if math.isfinite(floor.min_sqnr_db) \
            else -math.inf
        return cls(agreement, sqnr)

    def to_dict(self) -> dict[str, float | None]:
        """For the report."""
        return {"agreement": self.min_agreement, "sqnr_db": _finite(self.min_sqnr_db)}


@dataclass(frozen=True)
class Score:
    """A model's outputs against the float reference (worst output of each kind).

    ``sqnr_db`` is the worst SQNR of a whole output or, where it counts
    (:func:`output_sqnr`), of one slice of it, which ``worst`` then names (``boxes[:, 6]``).
    """

    agreement: float | None
    sqnr_db: float
    worst: str | None = None

    def meets(self, targets: Targets) -> bool:
        """Whether every output clears its target."""
        if self.agreement is not None and self.agreement < targets.min_agreement:
            return False
        return self.sqnr_db >= targets.min_sqnr_db

    def rank_key(self) -> tuple[float, float]:
        """Orders scores from worse to better: agreement first, then SQNR."""
        return (self.agreement if self.agreement is not None else 1.0, self.sqnr_db)

    def to_dict(self) -> dict[str, float | str | None]:
        """For the report (an SQNR without noise, or without such outputs, is None)."""
        found: dict[str, float | str | None] = {"agreement": self.agreement,
                                                "sqnr_db": _finite(self.sqnr_db)}
        if self.worst is not None:
            found["sqnr_worst"] = self.worst
        return found


def _finite(value: float) -> float | None:
    return round(value, 2) if math.isfinite(value) else None


def _kind(array: object) -> str:
    if not isinstance(array, np.ndarray):
        return "other"  # sequences, maps: no floor of their own
    if classifier_like(array):
        return "class"
    if class_sequence_like(array):
        return "sequence"
    if not np.issubdtype(array.dtype, np.floating):
        return "other"
    if (array.ndim in (1, 2) and array.shape[-1:] != (0,) and (array.ndim == 1 or
                                                             array.shape[1] == 1)
            and float(array.min()) >= 0.0 and float(array.max()) <= 1.0):
        return "binary"  # one probability per sample: a yes/no decision at 0.5
    return "float"


def reference(float_model: ir.Model, source: FeedSource, *, limit: int | None, batch_size: int,
              input_shapes: Mapping[str, tuple[int, ...]] | None) -> EvalData:
    """Run the float model once and keep its outputs for later comparisons."""
    names = [v.name or "" for v in float_model.graph.outputs]
    outputs: list[list[np.ndarray]] = []
    for (tensors,), _ in stream_tensors([float_model], [names], source, batch_size=batch_size,
                                        limit=limit, input_shapes=input_shapes):
        outputs.append([tensors[n] for n in names])
    kinds = [_kind(o) for o in outputs[0]] if outputs else []
    return EvalData(source, limit, batch_size, input_shapes, outputs, names, kinds,
                    output_batch_axes(float_model))


def slice_axes(shape: tuple[int, ...], batch_axis: int) -> list[int]:
    """The axes of an output whose slices :func:`output_sqnr` may judge one by one."""
    if len(shape) < 2:
        return []
    axes = [a for a in range(len(shape)) if a != batch_axis and 1 < shape[a] <= MAX_SLICES]
    if len(shape) > 3:  # a map: its channels, not its rows and columns
        axes = [a for a in axes if a <= 1]
    return axes


def score(model: ir.Model, ref: EvalData) -> Score:
    """Score ``model`` against the float reference (see the module docstring)."""
    agree = [0] * len(ref.names)
    total = [0] * len(ref.names)
    # per output: summed squares of the whole (key None) and per slice along each slice axis
    sums: list[dict[int | None, tuple[np.ndarray, np.ndarray]] | None] = [None] * len(ref.names)
    batch = ref.batch_axes or [0] * len(ref.names)
    batches = stream_tensors([model], [ref.names], ref.source, batch_size=ref.batch_size,
                             limit=ref.limit, input_shapes=ref.input_shapes)
    for ((tensors,), _), expected in zip(batches, ref.outputs, strict=False):
        for j, (name, kind) in enumerate(zip(ref.names, ref.kinds, strict=True)):
            if kind == "other":
                continue
            want, got = expected[j], np.asarray(tensors[name])
            if kind in ("class", "sequence"):
                agree[j] += int(np.sum(same_top1(want, got)))
                total[j] += want.shape[0]
            if kind == "binary":
                agree[j] += int(np.sum((got > 0.5) == (want > 0.5)))
                total[j] += want.size
            if kind in ("float", "binary"):
                found = _slice_squares(want, got, slice_axes(want.shape, batch[j]))
                before = sums[j]
                if before is not None:  # an axis that changed size is judged no more
                    found = {a: (s + before[a][0], n + before[a][1])
                             for a, (s, n) in found.items()
                             if a in before and before[a][0].shape == s.shape}
                sums[j] = found
    agreements = [a / t for a, t, k in zip(agree, total, ref.kinds, strict=True)
                  if k in ("class", "sequence", "binary") and t]
    sqnrs = [_worst_slice(found, name)
             for found, k, name in zip(sums, ref.kinds, ref.names, strict=True)
             if k in ("float", "binary") and found is not None]
    agreement = min(agreements) if agreements else None
    if not sqnrs:
        return Score(agreement, math.inf)
    db, where = min(sqnrs, key=lambda t: t[0])
    return Score(agreement, db, where)


def _slice_squares(want: np.ndarray, got: np.ndarray,
                   axes: list[int]) -> dict[int | None, tuple[np.ndarray, np.ndarray]]:
    """Sums of squares of the reference and of the error: of the whole (key None) and per
    slice along each of ``axes``."""
    w = want.astype(np.float64)
    d = got.astype(np.float64) - w
    found = {None: (np.atleast_1d(np.sum(w * w)), np.atleast_1d(np.sum(d * d)))}
    for axis in axes:
        w2, d2 = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), np.moveaxis(
            d, axis, 0).reshape(d.shape[axis], -1)
        found[axis] = np.einsum("cx,cx->c", w2, w2), np.einsum("cx,cx->c", d2, d2)
    return found


def _worst_slice(found: dict[int | None, tuple[np.ndarray, np.ndarray]],
                 name: str) -> tuple[float, str | None]:
    """The output's SQNR by :func:`output_sqnr` over its slice axes, and the slice it is
    (``boxes[:, 6]``, ``state[:, :, 3]``) or None for the whole output."""
    signal, noise = found[None]
    worst: tuple[float, str | None] = (sqnr_db(float(signal.sum()), float(noise.sum())), None)
    for axis, (signal, noise) in found.items():
        if axis is None:
            continue
        db, where = output_sqnr(signal, noise)
        if where is not None and db < worst[0]:
            worst = db, f"{name}[{', '.join([':'] * axis + [str(where)])}]"
    return worst


def output_sqnr(signal: np.ndarray, noise: np.ndarray) -> tuple[float, int | None]:
    """SQNR of one output from its summed squares per slice, and the slice it comes from.

    The SQNR of the whole output, unless its slices along axis 1 that carry signal differ
    in RMS by more than :data:`SCALE_SPREAD`: then the worst of the whole and of each
    slice. A detector's ``[N, 4 + C, anchors]`` output has box rows in pixels (RMS ~100)
    beside class-score rows in [0, 1] (RMS ~0.01): one SQNR over it is the boxes' SQNR, and
    a class-score row that int8 has turned into noise would not lower it. Where the slices
    have comparable scales, the whole is judged as before.

    Args:
        signal: Summed squares of the reference per slice.
        noise: Summed squares of the error per slice.

    Returns:
        The SQNR in dB, and the index of the slice it is or None for the whole output.
    """
    whole = sqnr_db(float(signal.sum()), float(noise.sum()))
    live = np.flatnonzero(signal > 0)
    if live.size < 2:
        return whole, None
    rms = np.sqrt(signal[live])
    if float(rms.max()) <= SCALE_SPREAD * float(rms.min()):
        return whole, None
    per_slice = [sqnr_db(float(signal[i]), float(noise[i])) for i in live]
    at = int(np.argmin(per_slice))
    if per_slice[at] >= whole:
        return whole, None
    return per_slice[at], int(live[at])


def tensor_sqnr(float_model: ir.Model, quant_model: ir.Model, names: Mapping[str, str],
                source: FeedSource, *, limit: int, batch_size: int,
                input_shapes: Mapping[str, tuple[int, ...]] | None,
                per_channel: bool = False) -> dict[str, float]:
    """SQNR per tensor: float-model name -> dB, with ``names`` mapping to the quantized model.

    With ``per_channel`` the SQNR is taken per channel (axis 1) and averaged in dB over the
    channels that carry signal, so that a tensor whose small channels are lost beside one
    large channel reads as damaged (one SQNR over the whole tensor would not show it).
    """
    keys = list(names)
    signal: dict[str, np.ndarray | float] = dict.fromkeys(keys, 0.0)
    noise: dict[str, np.ndarray | float] = dict.fromkeys(keys, 0.0)
    # two models' tensors per batch: each gets half the memory
    batch_size = batch_within(float_model, keys, source, batch_size, input_shapes=input_shapes,
                              budget=BATCH_BYTES // 2)
    for (ref, got), _ in stream_tensors([float_model, quant_model],
                                        [keys, [names[k] for k in keys]], source,
                                        batch_size=batch_size, limit=limit,
                                        input_shapes=input_shapes, desc="per-node SQNR"):
        for k in keys:
            r, g = np.asarray(ref[k]), np.asarray(got[names[k]])
            if per_channel and r.ndim >= 2 and r.shape == g.shape:
                r3 = r.reshape(r.shape[0], r.shape[1], -1).astype(np.float64)
                d3 = g.reshape(r3.shape) - r3
                signal[k] = signal[k] + np.einsum("ncx,ncx->c", r3, r3)
                noise[k] = noise[k] + np.einsum("ncx,ncx->c", d3, d3)
                continue
            r, g = r.reshape(-1), g.reshape(-1)
            d = g - r if g.dtype == r.dtype else g.astype(np.float64) - r
            # sums of squares accumulated in float64 without float64 copies of the tensors
            signal[k] = np.sum(signal[k]) + float(np.einsum("i,i->", r, r, dtype=np.float64))
            noise[k] = np.sum(noise[k]) + float(np.einsum("i,i->", d, d, dtype=np.float64))
    out = {}
    for k in keys:
        sig, noi = np.atleast_1d(signal[k]), np.atleast_1d(noise[k])
        live = sig > 0
        dbs = [min(sqnr_db(float(a), float(b)), CLEAN_DB)
               for a, b in zip(sig[live], noi[live], strict=True)]
        out[k] = float(np.mean(dbs)) if dbs else sqnr_db(float(sig.sum()), float(noi.sum()))
    return out


def rank_by_added_error(nodes: Sequence[tuple[int, ir.Node, Sequence[int]]],
                        sqnr: Mapping[str, float]) -> list[int]:
    """Node indices, most sensitive first: the SQNR each node's output loses to its inputs.

    Args:
        nodes: ``(index, node, activation input indices)`` of the candidate nodes.
        sqnr: Tensor name -> SQNR in the all-int8 model (:func:`tensor_sqnr`); tensors
            missing from it (graph inputs, float nodes' outputs) count as clean.
    """
    added: dict[int, float] = {}
    for index, node, activations in nodes:
        out = sqnr.get(node.outputs[0].name or "")
        if out is None:
            continue
        ins = [min(sqnr.get(node.inputs[i].name or "", CLEAN_DB), CLEAN_DB)
               for i in activations if node.inputs[i] is not None]
        added[index] = (min(ins) if ins else CLEAN_DB) - min(out, CLEAN_DB)
    return sorted(added, key=lambda i: -added[i])


def choose_float_nodes(order: list[int], build: Callable[[set[int]], ir.Model],
                       ref: EvalData, targets: Targets, base: Score, max_nodes: int,
                       max_probes: int) -> tuple[set[int] | None, dict[str, object]]:
    """Keep few of the most sensitive nodes float so that the score meets the targets.

    The float set grows along ``order`` by doubling (``k = 1, 2, 4, ...`` up to the cap),
    then, once a ``k`` meets the targets, bisects between it and the last ``k`` that did not,
    while probes remain: about ``2 log2(cap)`` probes find the smallest ``k`` that meets them
    (assuming the score rises with ``k``, which it does on the whole but not at every step).

    Args:
        order: Candidate node indices, most sensitive first.
        build: Builds the quantized model with the given indices kept float.
        ref: Float reference outputs.
        targets: What to reach.
        base: The starting model's score (below the targets).
        max_nodes: Most nodes to keep float.
        max_probes: Most models to build and score.

    Returns:
        The indices to keep float, or None when no probe met the targets, and a trace for
        the report (every probe, and the best one: the probe kept, or the closest miss).
    """
    steps: list[dict[str, object]] = []
    trace: dict[str, object] = {"score_all_quantized": base.to_dict(),
                                "targets": targets.to_dict(), "candidates": len(order),
                                "ranking": order[:max_nodes], "probes": steps}
    cap = min(max_nodes, len(order))
    best = base.rank_key(), {"float_nodes": 0, **base.to_dict()}

    def meets(k: int) -> bool:
        nonlocal best
        value = score(build(set(order[:k])), ref)
        step = {"float_nodes": k, **value.to_dict()}
        steps.append(step)
        logger.info("fallback: %d nodes float -> %s", k, value)
        key = value.rank_key()
        if key > best[0]:
            best = key, step
        return value.meets(targets)

    low, high, k = 0, None, 1  # low: most float nodes known to miss; high: fewest to meet
    while k <= cap and len(steps) < max_probes:
        if meets(k):
            high = k
            break
        low = k
        k = min(2 * k, cap) if k < cap else cap + 1
    while high is not None and high - low > 1 and len(steps) < max_probes:
        mid = (low + high) // 2
        if meets(mid):
            high = mid
        else:
            low = mid
    # the probe kept when one met the targets, else the one that came closest
    trace["best"] = best[1] if high is None else next(
        s for s in reversed(steps) if s["float_nodes"] == high)
    trace["reached"] = high is not None
    return (set(order[:high]) if high is not None else None), trace
