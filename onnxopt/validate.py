"""Run models in onnxruntime and compare their outputs: the numeric check behind every pass."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.ir import to_proto
from onnxopt.pass_base import Tolerance

logger = logging.getLogger(__name__)

#: Above this many bytes of weights, onnxruntime gets the weights as fed inputs.
_PROTO_LIMIT = 1_800_000_000


def make_session(
    model: ir.Model | onnx.ModelProto | str | os.PathLike,
    *,
    threads: int = 0,
    optimized_path: str | None = None,
    graph_optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession | FedWeightsSession:
    """An onnxruntime CPU session for a model object or file.

    Args:
        model: The model. onnx_ir models are serialized; one with more than 1.8 GB of
            weights gets a :class:`FedWeightsSession` instead, which never copies them.
        threads: Intra-op threads (0 lets onnxruntime choose).
        optimized_path: If given, onnxruntime writes its optimized graph there.
        graph_optimization: onnxruntime's graph optimization level.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = graph_optimization
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), opts, providers=providers)
    if isinstance(model, ir.Model):
        total = sum(
            v.const_value.nbytes for v in model.graph.initializers.values()
            if v.const_value is not None
        )
        if total > _PROTO_LIMIT:
            return _session_feeding_weights(model, opts, providers)
        model = _proto_with_inline_data(model)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


class FedWeightsSession:
    """An onnxruntime session whose large weights are graph inputs, fed on every run.

    onnxruntime reads fed arrays in place, whereas initializers, even ones added from
    memory with ``add_external_initializers``, are copied into the session; feeding them keeps
    a big model's weights in memory once (memory-mapped files stay mapped, in-memory weights
    are shared with the model). Offers what callers of :func:`make_session` use:
    ``get_inputs`` (the data inputs only), ``get_outputs`` and ``run``.
    """

    def __init__(self, session: ort.InferenceSession, weights: dict[str, np.ndarray]) -> None:
        self.session = session
        self.weights = weights

    def get_inputs(self) -> list:
        """The inputs a caller feeds (the weights are fed by the session itself)."""
        return [i for i in self.session.get_inputs() if i.name not in self.weights]

    def get_outputs(self) -> list:
        """The model outputs."""
        return self.session.get_outputs()

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, object],
            run_options: ort.RunOptions | None = None) -> list:
        """``InferenceSession.run`` with the weights added to ``input_feed``."""
        return self.session.run(output_names, {**input_feed, **self.weights}, run_options)


def _session_feeding_weights(model: ir.Model, opts: ort.SessionOptions,
                             providers: list[str]) -> FedWeightsSession:
    from onnxopt.ir import call_without_weights, is_large_weight

    weights = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()
               if is_large_weight(v.const_value)}
    proto = call_without_weights(lambda p: p.SerializeToString(), model)
    return FedWeightsSession(ort.InferenceSession(proto, opts, providers=providers), weights)


def _proto_with_inline_data(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` with lazily loaded external weights read into the proto.

    onnxruntime resolves external data only relative to a model file, so a model handed
    over as bytes must carry its weights inline.
    """
    from onnx.external_data_helper import load_external_data_for_model

    proto = to_proto(model)
    base_dirs = {
        os.fspath(v.const_value.base_dir) for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    for base_dir in base_dirs:
        load_external_data_for_model(proto, base_dir)
    return proto


def run_model(
    model: ir.Model | onnx.ModelProto | ort.InferenceSession | FedWeightsSession,
    feeds: Iterable[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
) -> list[np.ndarray]:
    """Run ``model`` on one feed dict or a stream of them; outputs are concatenated on axis 0."""
    session = (model if isinstance(model, ort.InferenceSession | FedWeightsSession)
               else make_session(model))
    if isinstance(feeds, Mapping):
        feeds = [feeds]
    names = [i.name for i in session.get_inputs()]
    chunks: list[list[np.ndarray]] = []
    for feed in feeds:
        chunks.append(session.run(None, {k: feed[k] for k in names if k in feed}))
    if not chunks:
        return []
    return [_concat([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def as_comparable(output: object) -> np.ndarray:
    """An onnxruntime output as one array: sequences are flattened and joined.

    Sequence and map outputs (lists and dicts) have no common array form; for comparison
    their elements are concatenated in order, which keeps every value and its position.
    """
    if isinstance(output, np.ndarray):
        return output
    if isinstance(output, dict):
        output = [output[k] for k in sorted(output)]
    if isinstance(output, list):
        parts = [as_comparable(o).reshape(-1) for o in output]
        if not parts:
            return np.zeros(0, np.float32)
        if all(p.dtype.kind in "biuf" for p in parts):
            return np.concatenate([p.astype(np.float64) for p in parts])
        return np.concatenate([p.astype(object) for p in parts])
    return np.asarray(output)


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return np.asarray(parts[0])
    try:
        return np.concatenate([np.asarray(p) for p in parts], axis=0)
    except ValueError:  # scalars or ragged outputs: keep them stacked as objects
        return np.asarray(parts, dtype=object)


@dataclass
class OutputMetrics:
    """How far one output moved from its reference."""

    name: str
    max_abs_error: float
    needed_rtol: float
    cosine: float
    sqnr_db: float
    agreement: float | None = None


@dataclass
class Comparison:
    """Result of comparing a model's outputs to reference outputs.

    Truthy when every output is within tolerance; ``needed_rtol`` says what tolerance
    would have made it pass (in the style of Polygraphy's comparator).
    """

    passed: bool
    tolerance: Tolerance
    outputs: list[OutputMetrics] = field(default_factory=list)
    accuracy: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def needed_rtol(self) -> float:
        return max((o.needed_rtol for o in self.outputs), default=0.0)

    @property
    def cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def sqnr_db(self) -> float:
        return min((o.sqnr_db for o in self.outputs), default=float("inf"))

    @property
    def agreement(self) -> float | None:
        values = [o.agreement for o in self.outputs if o.agreement is not None]
        return min(values) if values else None

    def summary(self) -> str:
        """One line for logs and error messages."""
        text = (f"max abs err {self.max_abs_error:.3g}, needed rtol {self.needed_rtol:.3g} "
                f"(allowed {self.tolerance.rtol:g}), cosine {self.cosine:.6f}")
        if self.agreement is not None:
            text += f", top-1 agreement {self.agreement:.4f}"
        return text


def classifier_like(array: np.ndarray) -> bool:
    """Whether an output looks like per-sample class scores (``[N, C]`` with C > 1)."""
    return array.ndim == 2 and array.shape[1] > 1 and np.issubdtype(array.dtype, np.floating)


def compare_outputs(
    reference: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    names: Sequence[str],
    tolerance: Tolerance | None = None,
    labels: np.ndarray | None = None,
) -> Comparison:
    """Compare two output lists elementwise.

    An element passes when ``|a - r| <= atol * max|r| + rtol * |r|``. NaN in the
    actual output where the reference is finite always fails.
    """
    tolerance = tolerance or Tolerance()
    result = Comparison(passed=True, tolerance=tolerance)
    if len(reference) != len(actual):
        result.passed = False
        return result
    for name, ref, act in zip(names, reference, actual, strict=True):
        ref_f = np.asarray(ref)
        act_f = np.asarray(act)
        if ref_f.shape != act_f.shape:
            result.passed = False
            result.outputs.append(OutputMetrics(name, float("inf"), float("inf"), 0.0, -np.inf))
            continue
        if not np.issubdtype(ref_f.dtype, np.number) and ref_f.dtype != np.bool_:
            same = bool(np.array_equal(ref_f, act_f))
            result.passed &= same
            err = 0.0 if same else float("inf")
            result.outputs.append(OutputMetrics(name, err, err, 1.0 if same else 0.0, np.inf))
            continue
        metrics = _metrics(name, ref_f.astype(np.float64), act_f.astype(np.float64), tolerance)
        if classifier_like(ref_f):
            metrics.agreement = float(np.mean(ref_f.argmax(1) == act_f.argmax(1)))
        result.passed &= metrics.needed_rtol <= tolerance.rtol
        result.outputs.append(metrics)
    if labels is not None:
        result.accuracy = accuracy_of(actual, labels)
    return result


def _metrics(name: str, ref: np.ndarray, act: np.ndarray, tol: Tolerance) -> OutputMetrics:
    finite = np.isfinite(ref)
    same_nonfinite = np.array_equal(np.isnan(ref), np.isnan(act)) and np.array_equal(
        ref[~finite & ~np.isnan(ref)], act[~finite & ~np.isnan(ref)])
    if not same_nonfinite or not np.all(np.isfinite(act[finite])):
        return OutputMetrics(name, float("inf"), float("inf"), 0.0, -np.inf)
    r, a = ref[finite], act[finite]
    if r.size == 0:
        return OutputMetrics(name, 0.0, 0.0, 1.0, np.inf)
    diff = np.abs(a - r)
    scale = float(np.max(np.abs(r)))
    slack = np.maximum(diff - tol.atol * scale, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        needed = np.where(slack > 0, slack / np.abs(r), 0.0)
    needed_rtol = float(np.max(needed)) if needed.size else 0.0
    noise = float(np.sum(diff**2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        sqnr = float("inf")
    elif signal == 0.0:
        sqnr = float("-inf")
    else:
        sqnr = 10.0 * np.log10(signal / noise)
    denom = float(np.linalg.norm(r) * np.linalg.norm(a))
    if denom:
        cosine = float(np.dot(r, a) / denom)
    else:
        cosine = 1.0 if noise == 0.0 else 0.0
    return OutputMetrics(name, float(diff.max()), needed_rtol, cosine, sqnr)


def accuracy_of(outputs: Sequence[np.ndarray], labels: np.ndarray) -> float | None:
    """Top-1 accuracy of the first classifier-like output against ``labels``."""
    for out in outputs:
        arr = np.asarray(out)
        if classifier_like(arr) and arr.shape[0] == len(labels):
            return float(np.mean(arr.argmax(1) == np.asarray(labels).reshape(-1)))
    return None


#: Minimum tolerances for low-precision outputs: a few units in the last place.
_LOW_PRECISION = {np.dtype(np.float16): Tolerance(rtol=4e-3, atol=4e-3)}


def scaled_tolerance(tolerance: Tolerance, outputs: Sequence[np.ndarray]) -> Tolerance:
    """Widen ``tolerance`` to what the outputs' dtype can represent (float16, bfloat16)."""
    rtol, atol = tolerance.rtol, tolerance.atol
    for out in outputs:
        dtype = np.asarray(out).dtype
        floor = _LOW_PRECISION.get(dtype)
        if floor is None and dtype.name == "bfloat16":
            floor = Tolerance(rtol=3e-2, atol=3e-2)
        if floor is not None:
            rtol, atol = max(rtol, floor.rtol), max(atol, floor.atol)
    return Tolerance(rtol=rtol, atol=atol)
