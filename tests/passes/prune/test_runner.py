"""Segments and the level runner: the tensors they hand out are those of full onnxruntime runs."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.channels.surgery import set_weight
from onnxopt.cost import infer_shapes
from onnxopt.data import from_arrays, input_specs
from onnxopt.ir import clone_model, const_array, from_proto
from onnxopt.passes.prune.capture import linear_view
from onnxopt.passes.prune.reconstruct import reconstruct
from onnxopt.passes.prune.runner import LevelRunner, segment, stream_segments
from onnxopt.passes.prune.targets import TargetCache
from onnxopt.session import expose_tensors, run_model
from testmodels.structures import residual_blocks


def _model():
    return infer_shapes(from_proto(residual_blocks(width=8)))


def _full(model, names, feeds):
    """The tensors ``names`` from one run of the whole model."""
    return dict(zip(names, run_model(expose_tensors(model, names), feeds)[-len(names):],
                    strict=True))


def _images(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((n, 3, 16, 16)).astype(np.float32)}


def test_segment_computes_a_tensor_from_a_cut() -> None:
    model = _model()
    convs = [n for n in model.graph if n.op_type == "Conv"]
    cut, wanted = convs[1].inputs[0].name, convs[3].inputs[0].name
    feeds = _images(3)
    full = _full(model, [cut, wanted], feeds)
    proto, nodes, reads = segment(model, [wanted], {cut}, {cut: full[cut]})
    assert reads == [cut] and convs[0] not in nodes and convs[2] in nodes
    assert [i.name for i in proto.graph.input] == [cut]
    got = run_model(proto, {cut: full[cut]})[0]
    np.testing.assert_allclose(got, full[wanted], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError):
        segment(model, ["no such tensor"])


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])
def test_level_runner_hands_out_what_full_runs_give_after_each_rewrite(cache_bytes) -> None:
    model = _model()
    convs = [n for n in model.graph if n.op_type == "Conv"]
    levels = [[convs[1].inputs[0].name], [convs[3].inputs[0].name],
              [convs[4].inputs[0].name, convs[5].inputs[0].name]]
    arrays = _images()
    source = from_arrays(arrays, "test")
    runner = LevelRunner(model, levels, source, input_specs(model), batch_size=5,
                         cache_bytes=cache_bytes)
    for k, level in enumerate(levels):
        got = list(runner.run(k))
        assert [len(b[level[0]]) for b in got] == [5, 5, 2]
        expected = _full(model, level, arrays)
        for name in level:
            np.testing.assert_allclose(np.concatenate([b[name] for b in got]), expected[name],
                                       rtol=1e-5, atol=1e-5)
        assert bool(runner.cache) == (cache_bytes > 0 and k < len(levels) - 1)
        if k == 0:  # rewrite a node below level 0: the next levels must see it
            weight = const_array(convs[2].inputs[1])
            set_weight(model.graph, convs[2], 1, (2.0 * weight).astype(np.float32))


def test_stream_segments_reads_inputs_from_the_feeds() -> None:
    model = _model()
    convs = [n for n in model.graph if n.op_type == "Conv"]
    names = ["input", convs[2].outputs[0].name]
    arrays = _images(4)
    got = next(stream_segments([model, model], names, from_arrays(arrays, "test"),
                               input_specs(model), batch_size=4))
    expected = _full(model, names[1:], arrays)
    for tensors in got:
        np.testing.assert_array_equal(tensors["input"], arrays["input"])
        np.testing.assert_allclose(tensors[names[1]], expected[names[1]], rtol=1e-5, atol=1e-5)


def test_a_shared_target_cache_refits_as_a_private_one() -> None:
    from onnxopt.channels import analyse_channels
    from onnxopt.channels.surgery import remove_channels
    from onnxopt.passes.prune.sensitivity import refit_targets

    original = _model()
    source = from_arrays(_images(24, seed=3), "test")
    groups = [g for g in analyse_channels(original).groups if g.prunable and g.size >= 8]
    keep = {g.index: np.arange(g.size) % 3 != 0 for g in groups}
    cache = TargetCache(original, source, batch_size=8, seed=5)
    weights = []
    for shared in (None, cache, cache):  # private; shared and filled; shared, reused
        pruned = clone_model(original)
        twins = [g for g in analyse_channels(pruned, infer=False).groups if g.index in keep]
        targets = refit_targets(twins, keep)
        for twin in twins:
            remove_channels(pruned, twin, np.flatnonzero(~keep[twin.index]).tolist())
        results = reconstruct(original, pruned, targets, source, batch_size=8, seed=5,
                              cache=shared)
        assert any(r.refitted for r in results)
        weights.append([linear_view(t.node).weight for t in targets])
    assert cache.rows  # filled once, then read
    for other in weights[1:]:
        for a, b in zip(weights[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
