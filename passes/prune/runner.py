"""Level-by-level activations: every node of a model rewritten between levels runs once.

The refit (:mod:`.reconstruct`) rewrites a model level by level and needs, before each level,
the inputs of that level's consumers as the model computes them with every refit above them
in place. Running the model from its graph inputs up to those tensors for every level costs
a forward pass per level (26 levels of a 62-Conv OCR detector: 13 full passes).
:class:`LevelRunner` runs only what is new: a level's tensors depend on nodes that no later
refit changes (a node that reads a refitted node is at a higher level), so the nodes computed
for one level are final; their outputs that later nodes read (the *frontier*) are kept per
batch and fed to the next level's segment as inputs. Over all levels each node runs once.
The frontier is held in memory up to ``cache_bytes``; above that the runner drops it and the
next level runs from the graph inputs again.

Segments are built as small ``ModelProto``s straight from the onnx_ir graph (only the nodes
and weights a segment needs), instead of cloning and serializing the whole model per level.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxopt.feeds import FeedSource, InputSpec
from onnxopt.ir import subgraphs
from onnxopt.progress import progress
from onnxopt.session import make_session

logger = logging.getLogger(__name__)

__all__ = ["LevelRunner", "outer_names", "segment", "stream_segments"]

#: Above this many bytes of weights, segments are not built as protos (2 GB protobuf limit).
PROTO_WEIGHTS = 1_500_000_000


def outer_names(graph: ir.Graph) -> set[str]:
    """Names a subgraph reads from the scopes around it."""
    inner = {v.name for v in graph.inputs} | set(graph.initializers)
    read: set[str] = set()
    for node in graph:
        inner.update(v.name for v in node.outputs)
        read.update(v.name for v in node.inputs if v is not None)
        for sub in subgraphs(node):
            read |= outer_names(sub)
    return {n for n in read if n and n not in inner}


def _reads(node: ir.Node) -> list[str]:
    names = [v.name for v in node.inputs if v is not None and v.name]
    for sub in subgraphs(node):
        names.extend(sorted(outer_names(sub)))
    return names


def _walk_back(names: Iterable[str], visit: Callable[[str], Iterable[str]]) -> None:
    """Visit each tensor once, from ``names`` towards the inputs: ``visit(name)`` returns
    the tensors to go on to (the reads of the node to walk through, or none)."""
    stack, seen = list(names), set()
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(visit(name))


def _info(value: ir.Value | None, name: str) -> onnx.ValueInfoProto:
    if value is not None and value.type is not None:
        return ir.serde.serialize_value(value)
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


def segment(model: ir.Model, outputs: Sequence[str], cut: Collection[str] = (),
            cut_types: Mapping[str, np.ndarray] | None = None,
            ) -> tuple[onnx.ModelProto | None, list[ir.Node], list[str]]:
    """The nodes of ``model`` that compute ``outputs`` from ``cut`` and the graph inputs.

    Args:
        model: The model.
        outputs: Tensors wanted.
        cut: Tensors that are given (become graph inputs of the segment).
        cut_types: An example array per cut tensor (its dtype and rank type the input).

    Returns:
        ``(proto, nodes, reads)``: the segment as a model (None when no node is needed),
        its nodes in graph order, and the cut tensors and graph inputs it reads.

    Raises:
        KeyError: An output is not a tensor of the main graph.
    """
    graph = model.graph
    producer = {v.name: node for node in graph for v in node.outputs}
    inputs = {v.name: v for v in graph.inputs}
    weights = graph.initializers
    needed: set[int] = set()
    reads: list[str] = []
    used: list[str] = []

    def visit(name: str) -> list[str]:
        if name in cut or (name in inputs and name not in weights):
            reads.append(name)
        elif name in weights:
            used.append(name)
        elif name in producer:
            needed.add(id(producer[name]))
            return _reads(producer[name])
        else:
            raise KeyError(f"no tensor named {name!r} in the main graph")
        return []

    _walk_back(outputs, visit)
    nodes = [node for node in graph if id(node) in needed]
    if not nodes:
        return None, [], reads
    cut_types = cut_types or {}
    values = {v.name: v for node in nodes for v in node.outputs}
    graph_inputs = []
    for name in reads:
        if name in cut_types:
            array = cut_types[name]
            graph_inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(array.dtype), [None] * array.ndim))
        else:
            graph_inputs.append(_info(inputs.get(name), name))
    proto_graph = helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "segment", graph_inputs,
        [_info(values.get(name), name) for name in outputs if name in values],
        [ir.serde.serialize_tensor(weights[name].const_value) for name in used])
    proto = helper.make_model(
        proto_graph, ir_version=model.ir_version,
        opset_imports=[helper.make_opsetid(d, v) for d, v in model.opset_imports.items()])
    for function in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(function))
    return proto, nodes, reads


def stream_segments(models: Sequence[ir.Model], names: Sequence[str], source: FeedSource,
                    specs: list[InputSpec], *, batch_size: int = 32, limit: int | None = None,
                    show_progress: bool = False, desc: str = "running",
                    ) -> Iterator[list[dict[str, np.ndarray]]]:
    """The tensors ``names`` of each model per batch, from sessions of only what they need.

    Like :func:`onnxopt.session.stream_tensors` without cloning each model to expose them;
    graph inputs among ``names`` come from the feeds.
    """
    sessions = []
    for model in models:
        proto, _, _ = segment(model, names)
        sessions.append(make_session(proto) if proto is not None else None)
    inputs = [set() if s is None else {i.name for i in s.get_inputs()} for s in sessions]
    batches = source.batches(specs, batch_size, limit)
    for feeds, _ in progress(batches, enabled=show_progress, desc=desc):
        found = []
        for session, wanted in zip(sessions, inputs, strict=True):
            run = [n for n in names if n not in feeds]
            got = dict(zip(run, session.run(run, {k: v for k, v in feeds.items() if k in wanted}),
                           strict=True)) if run and session is not None else {}
            found.append({n: feeds[n] if n in feeds else got[n] for n in names})
        yield found


class LevelRunner:
    """Runs the levels of a model that is rewritten between them, each node once.

    Args:
        model: The model; it may change between :meth:`run` calls, but only in nodes that
            no earlier level's tensors depend on.
        levels: The tensors each level needs, in order.
        source: Calibration feeds.
        specs: The model inputs the batches are checked against.
        batch_size: Batch size when the batch axis is dynamic.
        limit: At most this many samples.
        cache_bytes: Memory for the frontier kept between levels.
        show_progress: Allow a progress bar.
        desc: Progress bar label.
    """

    def __init__(self, model: ir.Model, levels: Sequence[Sequence[str]], source: FeedSource,
                 specs: list[InputSpec], *, batch_size: int = 32, limit: int | None = None,
                 cache_bytes: int = 1 << 30, show_progress: bool = False,
                 desc: str = "running") -> None:
        self.model = model
        self.levels = [list(dict.fromkeys(level)) for level in levels]
        self.source = source
        self.specs = specs
        self.batch_size = batch_size
        self.limit = limit
        self.cache_bytes = cache_bytes
        self.show_progress = show_progress
        self.desc = desc
        self.cache: list[dict[str, np.ndarray]] = []
        self.computed: set[int] = set()
        weights = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                      if v.const_value is not None)
        self.caching = weights <= PROTO_WEIGHTS

    def _frontier(self, k: int, computed: set[int]) -> list[str]:
        """Tensors of computed nodes that a later level (or a node it needs) reads."""
        graph = self.model.graph
        producer = {v.name: node for node in graph for v in node.outputs}
        future = [name for level in self.levels[k + 1:] for name in level]
        keep: list[str] = []

        def visit(name: str) -> list[str]:
            node = producer.get(name)
            if node is None:
                return []  # a graph input or weight: read again, never cached
            if id(node) in computed:
                keep.append(name)
                return []
            return _reads(node)

        _walk_back(future, visit)
        return keep

    def run(self, k: int) -> Iterator[dict[str, np.ndarray]]:
        """Level ``k``'s tensors per batch, with the model's current weights."""
        wanted = self.levels[k]
        cached = set(self.cache[0]) if self.cache else set()
        example = self.cache[0] if self.cache else {}
        proto, nodes, _ = segment(self.model, wanted, cached, example)
        computed = self.computed | {id(n) for n in nodes}
        frontier = self._frontier(k, computed) if self.caching else []
        new = [n for n in dict.fromkeys(frontier) if n not in cached and n not in wanted]
        if proto is not None and new:  # the segment also hands out the new frontier
            values = {v.name: v for node in nodes for v in node.outputs}
            proto.graph.output.extend(_info(values.get(n), n) for n in new)
        session = make_session(proto) if proto is not None else None
        names = [o.name for o in session.get_outputs()] if session is not None else []
        feeds_wanted = {i.name for i in session.get_inputs()} if session is not None else set()
        cache: list[dict[str, np.ndarray]] = []
        held = 0
        keeping = bool(frontier)
        batches = self.source.batches(self.specs, self.batch_size, self.limit)
        for b, (feeds, _) in enumerate(progress(batches, enabled=self.show_progress,
                                                desc=self.desc)):
            known = {**feeds, **(self.cache[b] if self.cache else {})}
            got = dict(known)
            if session is not None:
                arrays = session.run(names, {n: known[n] for n in feeds_wanted})
                got.update(zip(names, arrays, strict=True))
            if keeping:
                kept = {n: got[n] for n in frontier}
                held += sum(a.nbytes for a in kept.values())
                if held > self.cache_bytes:
                    logger.debug("level %d: frontier above %d bytes; not cached", k,
                                 self.cache_bytes)
                    keeping, cache = False, []
                else:
                    cache.append(kept)
            yield {n: got[n] for n in wanted}
        if keeping:
            self.cache, self.computed = cache, computed
        else:  # the next level runs from the graph inputs
            self.cache, self.computed = [], set()
