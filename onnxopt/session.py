"""onnxruntime sessions for models, and the one loop that streams batches through them.

Every place that runs a model over a data set (the pass manager's validation, activation
statistics, pruning refits, early-exit planning and evaluation) goes through :func:`stream`:
batches cut by :meth:`FeedSource.batches <onnxopt.feeds.FeedSource.batches>`, each fed to one
or more sessions, with a progress bar on long runs. :func:`stream_tensors` does the same for
intermediate tensors, made extra outputs of a copy of the model. Comparing what comes out is
:mod:`onnxopt.compare`'s job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.cost import infer_shapes
from onnxopt.errors import DataError
from onnxopt.feeds import FeedSource, InputSpec, input_specs
from onnxopt.ir import clone_model, to_proto
from onnxopt.progress import progress

logger = logging.getLogger(__name__)

#: Above this many bytes of weights, onnxruntime gets the weights as fed inputs.
_PROTO_LIMIT = 1_800_000_000


def make_session(
    model: ir.Model | onnx.ModelProto | bytes | str | os.PathLike,
    *,
    threads: int = 0,
    optimized_path: str | None = None,
    graph_optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession | FedWeightsSession:
    """An onnxruntime CPU session for a model object or file (its threads do not spin).

    Args:
        model: The model: a file, a serialized model (bytes, for several sessions of one
            model without serializing it again), or a model object. onnx_ir models are
            serialized; one with more than 1.8 GB of weights gets a
            :class:`FedWeightsSession` instead, which never copies them.
        threads: Intra-op threads (0 lets onnxruntime choose).
        optimized_path: If given, onnxruntime writes its optimized graph there.
        graph_optimization: onnxruntime's graph optimization level.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = graph_optimization
    opts.log_severity_level = 4  # errors arrive as exceptions; no second copy on stderr
    # Threads that spin after a run take cores from what runs next: numpy's solves between
    # runs, the next session (prune measures through hundreds), other processes.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(model), opts, providers=providers)
    if isinstance(model, bytes):
        return ort.InferenceSession(model, opts, providers=providers)
    if isinstance(model, ir.Model):
        if not fits_one_proto(model):
            return _session_feeding_weights(model, opts, providers)
        model = _proto_with_inline_data(model)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


def fits_one_proto(model: ir.Model) -> bool:
    """Whether ``model``'s weights fit one serialized protobuf (under 1.8 GB)."""
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                if v.const_value is not None)
    return total <= _PROTO_LIMIT


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
    from onnxopt.large_weights import call_without_weights, is_large_weight

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


Session = ort.InferenceSession | FedWeightsSession


def run_feeds(session: Session, feeds: Mapping[str, Any],
              names: Sequence[str] | None = None) -> list[Any]:
    """Run ``session`` on the entries of ``feeds`` it takes as inputs.

    Args:
        session: The session.
        feeds: Input arrays; entries the session does not take are ignored.
        names: The outputs wanted, in order (None = every output). A wanted name that is
            one of the feeds is returned from the feeds, without running for it.
    """
    inputs = {i.name for i in session.get_inputs()}
    given = {k: v for k, v in feeds.items() if k in inputs}
    if names is None:
        return session.run(None, given)
    run_names = [n for n in names if n not in feeds]
    # An empty name list would make onnxruntime return every output.
    got = dict(zip(run_names, session.run(run_names, given), strict=True)) if run_names else {}
    return [feeds[n] if n in feeds else got[n] for n in names]


class Batch(NamedTuple):
    """One batch of :func:`stream`: its feeds, labels and each session's outputs."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    outputs: list[list[Any]]


def stream(
    sessions: Sequence[Session],
    source: FeedSource,
    specs: list[InputSpec],
    *,
    outputs: Sequence[Sequence[str] | None] | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    show_progress: bool = False,
    desc: str = "running",
    data_errors: bool = False,
) -> Iterator[Batch]:
    """Run every session on the same batches of ``source``.

    Args:
        sessions: Sessions of models sharing their graph inputs (e.g. a float model and its
            quantized copy).
        source: The data; batches are cut by :meth:`FeedSource.batches`.
        specs: The model inputs the batches are checked against.
        outputs: Per session, the output names wanted (None = all); see :func:`run_feeds`.
        batch_size: Batch size when the batch axis is dynamic.
        limit: Stop after this many samples.
        show_progress: Whether a progress bar may be shown (only on a terminal).
        desc: Progress bar label.
        data_errors: The sessions run models known to be valid (the user's input model),
            so onnxruntime refusing a batch means the data does not fit: a ``DataError``.

    Yields:
        One :class:`Batch` per batch.

    Raises:
        DataError: The data does not fit ``specs``, has no samples, or (``data_errors``)
            onnxruntime refuses it.
    """
    wanted = list(outputs) if outputs is not None else [None] * len(sessions)
    if len(wanted) != len(sessions):
        raise ValueError("give one output list per session")
    count = source.num_samples if limit is None else min(limit, source.num_samples or limit)
    total = -(-count // batch_size) if count else None
    batches = source.batches(specs, batch_size, limit)
    for feeds, labels in progress(batches, enabled=show_progress, desc=desc, total=total):
        try:
            outputs_ = [run_feeds(session, feeds, names)
                        for session, names in zip(sessions, wanted, strict=True)]
        except Exception as exc:  # onnxruntime raises several types
            if not data_errors:
                raise
            raise DataError(_refusal(source, specs, exc)) from None
        yield Batch(feeds, labels, outputs_)


def _refusal(source: FeedSource, specs: list[InputSpec], exc: Exception) -> str:
    """One line for onnxruntime refusing ``source``'s data on a model it can run."""
    # Nested errors (an If branch, a Loop body) repeat their callers; the innermost says it.
    text = " ".join(str(exc).split()).rsplit("Status Message: ", 1)[-1]
    text = text if len(text) <= 200 else text[:200] + "..."
    message = f"onnxruntime cannot run the model on {source.description}: {text}"
    if source.representative:
        return message
    ints = [f"'{s.name}'" for s in specs if s.dtype is not None and s.dtype.kind in "biu"]
    which = f" ({', '.join(ints)} got random integers in [0, 10))" if ints else ""
    return (f"{message}; random values do not fit every model{which}: give real data with "
            f"--calib or --eval")


def run_model(
    model: ir.Model | onnx.ModelProto | Session,
    feeds: Iterable[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
) -> list[np.ndarray]:
    """Run ``model`` on one feed dict or a stream of them; outputs are concatenated on axis 0."""
    session = (model if isinstance(model, ort.InferenceSession | FedWeightsSession)
               else make_session(model))
    if isinstance(feeds, Mapping):
        feeds = [feeds]
    chunks = [run_feeds(session, feed) for feed in feeds]
    if not chunks:
        return []
    return [concat_batches([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def concat_batches(parts: Sequence[Any], counts: Sequence[int] | None = None) -> np.ndarray:
    """Per-batch outputs joined along their batch axis (ragged or scalar ones as objects).

    The batch axis is the one whose size is each batch's sample count (``counts``), so a
    state ``[2, N, 128]`` is joined on axis 1; without counts, or when no axis fits, arrays
    are joined on the one axis their sizes differ in, else on axis 0.
    """
    if len(parts) == 1:
        return np.asarray(parts[0])
    arrays = [np.asarray(p) if not isinstance(p, (list, dict)) else None for p in parts]
    if all(a is not None and a.ndim == 0 for a in arrays):
        return np.stack(arrays)
    if all(a is not None and a.ndim for a in arrays):
        ndim = arrays[0].ndim
        shapes = {a.shape for a in arrays}
        if all(len(s) == ndim for s in shapes):
            differ = [i for i in range(ndim) if len({s[i] for s in shapes}) > 1]
            fitting = [] if counts is None else [
                i for i in range(ndim) if differ in ([], [i])
                and all(a.shape[i] == c for a, c in zip(arrays, counts, strict=True))]
            if fitting:
                return np.concatenate(arrays, axis=fitting[0])
            if len(differ) <= 1:
                return np.concatenate(arrays, axis=differ[0] if differ else 0)
    stacked = np.empty(len(parts), dtype=object)  # scalars, sequences or ragged outputs
    for i, part in enumerate(parts):
        stacked[i] = part
    return stacked


def sample_axis(output: np.ndarray, samples: int) -> int | None:
    """The axis of a joined output with one entry per sample (None: it has none)."""
    return next((i for i, d in enumerate(output.shape) if d == samples), None)


# -- intermediate tensors ---------------------------------------------------------------------


def expose_tensors(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` in which every tensor in ``names`` is also a graph output.

    Graph inputs among ``names`` are left alone (they are read from the feeds).

    Raises:
        KeyError: A name is not a node output or graph input of the main graph.
    """
    copy = clone_model(model)
    graph = copy.graph
    produced = {v.name: v for node in graph for v in node.outputs if v.name}
    inputs = {v.name for v in graph.inputs}
    outputs = {v.name for v in graph.outputs}
    missing = [n for n in names if n not in produced and n not in inputs]
    if missing:
        raise KeyError(f"no tensor named {missing[0]!r} in the main graph")
    wanted = [produced[n] for n in dict.fromkeys(names) if n in produced and n not in outputs]
    if any(v.type is None for v in wanted):
        copy = infer_shapes(copy)
        graph = copy.graph
        produced = {v.name: v for node in graph for v in node.outputs if v.name}
        wanted = [produced[v.name] for v in wanted]
    for value in wanted:
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        graph.outputs.append(value)
    return copy


#: Memory for the intermediate tensors one batch hands out (see :func:`batch_within`).
BATCH_BYTES = 512 << 20


def batch_within(model: ir.Model, names: Sequence[str], source: FeedSource, batch_size: int,
                 *, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                 budget: int = BATCH_BYTES) -> int:
    """The largest batch up to ``batch_size`` whose tensors ``names`` take at most ``budget``.

    Measured on one sample: the convolutions of a text detector take 180 MB a sample at
    640x640, every tensor of it 700 MB, so a batch of 32 of them would not fit in memory.
    A model that fixes its batch keeps it (the size is then not measured).
    """
    if batch_size <= 1 or not names:
        return batch_size
    specs = input_specs(model, input_shapes)
    if any(s.dims and s.dims[0] is not None for s in specs if s.is_tensor):
        return batch_size  # a fixed batch: FeedSource.batches ignores the size
    for (tensors,), _ in stream_tensors([model], [names], source, batch_size=1, limit=1,
                                        input_shapes=input_shapes):
        size = sum(a.nbytes for a in tensors.values() if isinstance(a, np.ndarray))
        return int(max(1, min(batch_size, budget // max(size, 1))))
    return batch_size


def stream_tensors(
    models: Sequence[ir.Model],
    names: Sequence[Sequence[str]],
    source: FeedSource,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    show_progress: bool = False,
    desc: str = "calibrating",
    threads: int = 0,
) -> Iterator[tuple[list[dict[str, np.ndarray]], np.ndarray | None]]:
    """Run each model on the same batches and yield the requested tensors of each.

    Args:
        models: Models sharing their graph inputs (e.g. a float model and its quantized copy).
        names: For each model, the tensors to return per batch.
        source: The feeds; batches are cut from it by :meth:`FeedSource.batches`.
        batch_size: Batch size when the batch axis is dynamic.
        limit: Stop after this many samples.
        input_shapes: Concrete shapes for dynamic inputs.
        show_progress: Whether a progress bar may be shown.
        desc: Progress bar label.
        threads: onnxruntime intra-op threads (0 = default).

    Yields:
        ``([tensors of model 0, tensors of model 1, ...], labels or None)`` per batch.
    """
    sessions = [make_session(expose_tensors(model, wanted), threads=threads)
                for model, wanted in zip(models, names, strict=True)]
    for _, labels, outputs in stream(
            sessions, source, input_specs(models[0], input_shapes),
            outputs=[list(wanted) for wanted in names], batch_size=batch_size, limit=limit,
            show_progress=show_progress, desc=desc):
        yield [dict(zip(wanted, arrays, strict=True))
               for wanted, arrays in zip(names, outputs, strict=True)], labels
