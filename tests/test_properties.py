"""Property tests: random valid CNN graphs keep their outputs through every exact pass.

Graphs are chains of blocks drawn by hypothesis (conv, residual, scaled ResConv residual with
a zero, scalar or per-channel scale, concat, depthwise-separable, squeeze-excitation, no-op
Identity/Dropout/Mul-by-one and, half of the time, exactly-zero channels), built with
:class:`testmodels.GraphBuilder`. Each exact pass that is registered runs alone and all of
them run as one pipeline, through the ``PassManager``; the pass must not be rolled back or
crash, and an independent onnxruntime run on fresh inputs must agree with the original model
within the pass tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxopt.compare import compare_outputs, scaled_tolerance
from onnxopt.data import from_iterable
from onnxopt.ir import to_proto
from onnxopt.manager import PassManager
from onnxopt.model_io import load
from onnxopt.pass_base import Tolerance, get_pass, registered_passes
from onnxopt.report import Status
from onnxopt.session import make_session
from testmodels import GraphBuilder
from testmodels.zeroed import zero_channels

#: The exact passes the property covers, in pipeline order; those not registered are skipped.
EXACT_PASSES = ("cleanup", "fold-bn", "fuse-resconv", "prune-zero", "dead-layers")
SIZE = 8

Block = tuple[str, int, int]
"""(kind, width, variant): what to append, its channel count and a kind-specific choice."""

#: Block kinds to draw from; the ones that give the rarer passes work appear twice.
KINDS = ("conv", "residual", "resconv", "resconv", "concat", "depthwise", "se", "noise",
         "noise")


def _present_passes() -> list[str]:
    passes = registered_passes()
    return [name for name in EXACT_PASSES if name in passes and passes[name].exact]


def _squeeze_excite(g: GraphBuilder, x: str) -> str:
    c = g.channels(x)
    s = g.relu(g.conv(g.global_avg_pool(x), max(1, c // 4), 1, bias=True))
    s = g.op("Sigmoid", [g.conv(s, c, 1, bias=True)], (c, 1, 1))
    return g.op("Mul", [x, s], g.shapes[x])


def _resconv(g: GraphBuilder, x: str, variant: int) -> str:
    """``x + a * [BN](Conv(x))`` with ``a`` zero, a scalar or per channel."""
    c = g.channels(x)
    y = g.conv(x, c, 3)
    if variant % 2 == 0:
        y = g.bn(y)
    a = [np.float32(0.0), np.float32(0.5), g.rng.uniform(0.2, 1.0, (1, c, 1, 1))][variant % 3]
    name = g.const(f"scale{len(g.nodes)}", np.asarray(a, np.float32))
    return g.add(x, g.op("Mul", [y, name], g.shapes[y]))


def _append(g: GraphBuilder, x: str, block: Block) -> str:
    kind, width, variant = block
    c = g.channels(x)
    if kind == "conv":
        stride = 2 if variant == 2 and g.shapes[x][1] >= 4 else 1
        return g.conv_bn_relu(x, width, 1 if variant == 1 else 3, stride)
    if kind == "residual":
        y = g.conv_bn(g.conv_bn_relu(x, c, 3), c, 3 if variant else 1)
        return g.relu(g.add(y, x))
    if kind == "resconv":
        return _resconv(g, x, variant)
    if kind == "concat":
        branches = [g.conv_bn_relu(x, width, 1), g.conv_bn_relu(x, max(2, width // 2), 3)]
        if variant == 2:
            branches.append(x)
        return g.concat(branches)
    if kind == "depthwise":
        y = g.conv_bn_relu(x, c, 3, groups=c, relu6=variant == 1)
        return g.conv_bn(y, width, 1)
    if kind == "se":
        return _squeeze_excite(g, x)
    # no-ops: an inference Dropout or an Identity (cleanup), a multiplication by one
    # (dead-layers)
    if variant == 2:
        return g.op("Mul", [x, g.const("one", np.ones(1, np.float32))], g.shapes[x])
    return g.op("Identity" if variant else "Dropout", [x], g.shapes[x])


@st.composite
def cnn_models(draw: st.DrawFn) -> onnx.ModelProto:
    """A random valid CNN: a stem, one to four blocks, a classifier head."""
    seed = draw(st.integers(0, 2**16))
    blocks = draw(st.lists(
        st.tuples(st.sampled_from(KINDS), st.sampled_from((4, 6, 8)), st.integers(0, 2)),
        min_size=1, max_size=4))
    g = GraphBuilder(seed, SIZE, "N")
    x = g.conv_bn_relu(g.input, draw(st.sampled_from((4, 8))), 3)
    for block in blocks:
        x = _append(g, x, block)
    model = g.build(g.classifier(x), "random_cnn")
    if draw(st.booleans()):
        model = zero_channels(model, fraction=0.3, seed=seed, aligned=draw(st.booleans()))
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(batch: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE))
    return {"input": x.astype(np.float32)}


def _check(model: onnx.ModelProto, pipeline: list[str], reference: list[np.ndarray],
           fresh: dict[str, np.ndarray]) -> None:
    passes = [get_pass(name)() for name in pipeline]
    manager = PassManager(passes, validation=from_iterable([_feeds(2, 0)], "property"))
    result, report = manager.run(load(model))
    for record in report.records:
        assert record.status in (Status.KEPT, Status.UNCHANGED), (record.name, record.status,
                                                                  record.message)
    actual = make_session(result).run(None, fresh)
    tolerance = max((p.tolerance for p in passes), key=lambda t: t.rtol, default=Tolerance())
    # Errors of a pipeline add up: allow each pass its own share.
    tolerance = Tolerance(rtol=tolerance.rtol * len(passes), atol=tolerance.atol * len(passes))
    names = [o.name for o in to_proto(result).graph.output]
    cmp = compare_outputs(reference, actual, names, scaled_tolerance(tolerance, reference))
    assert cmp, f"{pipeline}: {cmp.summary()}"


@pytest.mark.skipif(not _present_passes(), reason="no exact pass registered")
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(model=cnn_models())
def test_exact_passes_preserve_outputs(model: onnx.ModelProto) -> None:
    present = _present_passes()
    fresh = _feeds(3, 1)
    reference = make_session(model).run(None, fresh)
    for name in present:
        _check(model, [name], reference, fresh)
    if len(present) > 1:
        _check(model, present, reference, fresh)
