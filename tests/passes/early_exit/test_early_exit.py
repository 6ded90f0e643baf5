"""Tests of early exit: heads, thresholds, the If-form pass, bundles and ``onnxopt split``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.api import optimize
from onnxopt.cost import infer_shapes
from onnxopt.data import from_arrays, from_npz
from onnxopt.ir import to_proto
from onnxopt.model_io import load
from onnxopt.pass_base import PassContext, get_pass
from onnxopt.passes.early_exit import EarlyExitModel, read_manifest, write_bundle
from onnxopt.passes.early_exit.cli import split_main
from onnxopt.passes.early_exit.cuts import (
    CANDIDATE_FRACTIONS,
    CutError,
    choose_cuts,
    find_cut_points,
)
from onnxopt.passes.early_exit.exits import collect_features, simulate
from onnxopt.passes.early_exit.heads import fit_head, fit_temperature, margin, pool, softmax
from onnxopt.passes.early_exit.planning import plan_exits
from onnxopt.passes.early_exit.runner import evaluate_bundle
from onnxopt.session import make_session
from testmodels import STRUCTURES
from tests.helpers import apply_pass, op_counts

# -- fitting and thresholds -------------------------------------------------------------------


def test_ridge_head_recovers_a_linear_map() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) * [1, 2, 3, 4, 5, 6] + 7
    w_true = rng.standard_normal((4, 6))
    y = x @ w_true.T + [1, 2, 3, 4]
    w, b = fit_head(x, y, "ridge", l2=0.0)
    assert w.shape == (4, 6) and b.shape == (4,)
    np.testing.assert_allclose(x @ w.T + b, y, atol=1e-3)


def test_logistic_head_separates_classes() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    x = np.eye(3)[labels] * 4 + rng.standard_normal((300, 3))
    w, b = fit_head(x, np.eye(3)[labels], "logistic", l2=1e-3)
    assert np.mean((x @ w.T + b).argmax(1) == labels) > 0.95


def test_grid_pool_is_the_mean_of_each_quadrant() -> None:
    x = np.arange(2 * 3 * 4 * 6, dtype=np.float64).reshape(2, 3, 4, 6)
    got = pool(x, "grid").reshape(2, 3, 2, 2)
    np.testing.assert_allclose(got[1, 2, 1, 0], x[1, 2, 2:, :3].mean())
    np.testing.assert_allclose(pool(x, "avg"), x.mean(axis=(2, 3)))


def test_margin_and_temperature() -> None:
    z = np.array([[3.0, 1.0, 2.5], [0.0, 0.0, -1.0]])
    np.testing.assert_allclose(margin(z), [0.5, 0.0])
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, 400)
    logits = np.eye(3)[classes] * 2.0 + rng.standard_normal((400, 3))
    # Logits scaled up 5x are overconfident: the fitted temperature undoes the scale.
    assert fit_temperature(5 * logits, classes) == pytest.approx(
        5 * fit_temperature(logits, classes), rel=0.1)
    # A head without mistakes keeps a finite temperature (the targets are smoothed): the
    # smoothed target odds, class against each other one, are (0.99 + 0.01/3) / (0.01/3) =
    # 298, so the margin 2 / T should be log(298).
    perfect = np.eye(3)[classes] * 2.0
    assert fit_temperature(perfect, classes) == pytest.approx(2 / np.log(298), rel=0.06)


# -- the trained classifier --------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(digits_model: Path) -> object:
    return infer_shapes(load(digits_model))


@pytest.fixture(scope="module")
def plan(digits, digits_calib: Path):
    return plan_exits(digits, from_npz(digits_calib),
                      choose_cuts(find_cut_points(digits), CANDIDATE_FRACTIONS))


@pytest.fixture(scope="module")
def eval_data(digits_eval: Path) -> dict[str, np.ndarray]:
    with np.load(digits_eval) as npz:
        return {"input": npz["input"], "labels": npz["labels"]}


@pytest.fixture(scope="module")
def single_file(digits_model: Path, digits_calib: Path):
    model = load(digits_model)
    ctx = PassContext(calib=from_npz(digits_calib))
    out, result = apply_pass(get_pass("early-exit")(), model, ctx)
    return out, result


def test_plan_on_digits(plan, digits, digits_eval: Path) -> None:
    assert set(plan.cuts) | set(plan.dropped) == {"relu0", "relu2", "relu4", "relu6", "relu8"}
    assert len(plan.cuts) >= 2 and plan.output == "logits" and plan.classes == 10
    assert all(h.pooling == "grid" and h.temperature > 0 for h in plan.heads)
    g = plan.guarantee
    assert g.kind == "in expectation" and g.samples == 128 and g.head_samples == 128
    assert g.bound <= 0.01 and g.needed == 99
    assert "agreement >= 0.99 on new samples in expectation" in plan.calib_report.promise
    # The level is shared: every threshold is the level times the exit's temperature.
    levels = [h.threshold / h.temperature for h in plan.heads]
    assert max(levels) == pytest.approx(min(levels), rel=1e-5)
    report = simulate(plan, collect_features(digits, from_npz(digits_eval),
                                             [p for p in find_cut_points(digits)
                                              if p.name in plan.cuts]))
    assert report.samples == 512
    assert report.agreement >= 0.99
    assert report.macs_ratio <= 0.5
    assert sum(r.fraction for r in report.rows) == pytest.approx(1.0)
    assert report.rows[0].fraction > 0.1  # the first exit answers a real share
    macs = plan.exit_macs()
    assert macs == sorted(macs) and macs[-1] > plan.total_macs  # heads are counted


def test_single_file_structure_and_numerics(single_file, digits_model: Path, eval_data) -> None:
    model, result = single_file
    exits = len(result.stats["exits"])
    assert result.modified and exits >= 2
    assert all("dropped" in r.reason for r in result.refusals)
    proto = to_proto(model)
    assert [o.name for o in proto.graph.output] == ["logits"]
    counts = op_counts(proto)
    nested = Counter(n.op_type for g in _subgraphs(proto.graph) for n in g.node)
    assert counts["If"] == 1 and nested["If"] == exits - 1
    assert counts["Conv"] + nested["Conv"] == 13  # every conv once, most of them nested
    assert nested["GatherND"] == nested["ScatterND"] == exits and "Where" not in nested
    assert counts["Gemm"] + nested["Gemm"] == exits + 1  # the heads and the classifier
    x = eval_data["input"]
    reference = make_session(digits_model).run(None, {"input": x})[0]
    session = make_session(proto)
    batched = session.run(None, {"input": x})[0]
    one_by_one = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0]
                                 for i in range(0, len(x), 4)])
    np.testing.assert_allclose(one_by_one, batched[::4], rtol=1e-5, atol=1e-5)
    assert np.mean(batched.argmax(1) == reference.argmax(1)) >= 0.99
    exited = np.abs(batched - reference).max(axis=1) > 1e-3
    assert 0.5 < exited.mean() < 1.0  # most samples answered early, some ran to the end
    assert result.stats["calibration"]["macs_ratio"] <= 0.5
    assert result.stats["guarantee"]["kind"] == "in expectation"


def test_single_file_at_opset_18_uses_axes_inputs(digits_model: Path, digits_calib: Path,
                                                   eval_data) -> None:
    proto = onnx.load(digits_model)
    proto.opset_import[0].version = 18  # the model's ops did not change between 17 and 18
    ctx = PassContext(calib=from_npz(digits_calib))
    out, result = apply_pass(get_pass("early-exit")(exits=("relu4",)), proto, ctx)
    assert op_counts(out)["If"] == 1 and op_counts(out)["TopK"] == 1
    x = eval_data["input"][:64]
    reference = make_session(proto).run(None, {"input": x})[0]
    got = make_session(to_proto(out)).run(None, {"input": x})[0]
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.95


def test_below_opset_11_whole_batches_go_on_and_where_picks(digits_model: Path,
                                                             digits_calib: Path,
                                                             eval_data) -> None:
    proto = onnx.load(digits_model)
    proto.opset_import[0].version = 10  # the digits model's ops read the same at opset 10
    ctx = PassContext(calib=from_npz(digits_calib))
    out, result = apply_pass(get_pass("early-exit")(), proto, ctx)
    assert result.modified
    exits = len(result.stats["exits"])
    out_proto = to_proto(out)
    nested = Counter(n.op_type for g in _subgraphs(out_proto.graph) for n in g.node)
    assert nested["Where"] == exits and "GatherND" not in nested and "ScatterND" not in nested
    x = eval_data["input"][:96]
    session = make_session(out_proto)
    batched = session.run(None, {"input": x})[0]
    one_by_one = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0]
                                 for i in range(len(x))])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)
    reference = make_session(proto).run(None, {"input": x})[0]
    assert np.mean(batched.argmax(1) == reference.argmax(1)) >= 0.97
    assert (np.abs(batched - reference).max(axis=1) > 1e-3).mean() > 0.5  # exits were taken


def _subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += [attr.g, *_subgraphs(attr.g)]
    return found


def test_bundle_matches_single_file(plan, digits, single_file, tmp_path: Path,
                                    eval_data, digits_eval: Path) -> None:
    path = write_bundle(tmp_path / "bundle", digits, plan)
    manifest = read_manifest(path)
    stages = len(plan.heads) + 1
    assert [s["file"] for s in manifest["stages"]] == [f"stage{k}.onnx" for k in range(stages)]
    assert [e["cut"] for e in manifest["exits"]] == plan.cuts
    assert manifest["inputs"] == ["input"] and manifest["outputs"] == ["logits"]
    assert manifest["guarantee"]["kind"] == "in expectation"
    for file in [*(s["file"] for s in manifest["stages"]), *(e["head"] for e in manifest["exits"])]:
        onnx.checker.check_model(onnx.load(path / file), full_check=True)
    runner = EarlyExitModel(path, threads=1)
    x = eval_data["input"][:128]
    result = runner.run({"input": x})
    assert result.outputs[0].shape == (128, 10)
    assert set(np.unique(result.exits)) <= set(range(stages))
    assert (result.exits < stages - 1).mean() > 0.5
    one_by_one = [runner.run_one({"input": x[i:i + 1]}) for i in range(128)]
    np.testing.assert_array_equal(result.exits, [k for _, k in one_by_one])
    np.testing.assert_allclose(result.outputs[0], np.concatenate([o[0] for o, _ in one_by_one]),
                               rtol=1e-5, atol=1e-5)
    single = make_session(to_proto(single_file[0]))
    np.testing.assert_allclose(result.outputs[0], single.run(None, {"input": x})[0],
                               rtol=1e-4, atol=1e-4)
    reference = make_session(digits).run(None, {"input": x})[0]
    np.testing.assert_allclose(runner.run_stages({"input": x})[0], reference,
                               rtol=1e-5, atol=1e-4)
    report = evaluate_bundle(runner, digits, plan, from_npz(digits_eval))
    assert report.samples == 512 and report.agreement >= 0.99 and report.macs_ratio <= 0.5
    assert report.accuracy is not None and report.accuracy >= 0.97


def test_batched_runner_keeps_the_input_order(plan, digits, tmp_path: Path, eval_data) -> None:
    runner = EarlyExitModel(write_bundle(tmp_path / "bundle", digits, plan), threads=1)
    x = eval_data["input"][:40]
    order = np.random.default_rng(0).permutation(40)
    straight, shuffled = runner.run({"input": x}), runner.run({"input": x[order]})
    np.testing.assert_array_equal(shuffled.exits, straight.exits[order])
    np.testing.assert_allclose(shuffled.outputs[0], straight.outputs[0][order], rtol=1e-5,
                               atol=1e-5)
    assert len(set(straight.exits.tolist())) >= 2  # the batch really split


def test_pass_through_the_manager_with_named_exits(digits_model: Path, digits_calib: Path,
                                                   digits_eval: Path) -> None:
    model, report = optimize(digits_model, "early-exit(exits=relu4;relu2,target=0.98)",
                             calib=digits_calib, eval=digits_eval)
    record = report.records[0]
    assert record.status == "kept" and not record.exact
    assert [e["cut"] for e in record.stats["exits"]] == ["relu2", "relu4"]
    assert record.vs_original.agreement >= 0.97
    assert op_counts(model)["If"] == 1


def test_plan_only_leaves_the_model_alone(digits_model: Path, digits_calib: Path) -> None:
    model = load(digits_model)
    ctx = PassContext(calib=from_npz(digits_calib))
    _, result = apply_pass(get_pass("early-exit")(single_file=False, head="logistic"), model, ctx)
    assert not result.modified and len(result.stats["exits"]) >= 1


def test_misspelt_exit_is_a_user_error(digits_model: Path, digits_calib: Path) -> None:
    ctx = PassContext(calib=from_npz(digits_calib))
    with pytest.raises(CutError, match="'relu3' is not a valid cut point"):
        apply_pass(get_pass("early-exit")(exits=("relu3",)), load(digits_model), ctx)


def _single_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    graph = helper.make_graph(
        nodes, "single", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                        ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(rng.standard_normal((10, 3, 3, 3)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_refuses_single_layer_net(tmp_path: Path, capsys) -> None:
    proto = _single_conv()
    calib = from_arrays({"input": np.random.default_rng(0).standard_normal(
        (16, 3, 8, 8)).astype(np.float32)}, "random")
    out, result = apply_pass(get_pass("early-exit")(), proto, PassContext(calib=calib))
    assert not result.modified
    assert len(result.refusals) == 1 and "no valid cut point" in result.refusals[0].reason
    assert op_counts(out) == op_counts(proto)
    path = tmp_path / "single.onnx"
    onnx.save(proto, path)
    assert split_main([str(path), "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxopt split: error: model has no valid cut point")
    assert len(err.splitlines()) == 1 and not (tmp_path / "b").exists()


def test_refuses_a_model_with_two_outputs(digits_calib: Path) -> None:
    proto = STRUCTURES["conv_chain"]()
    proto.graph.output.append(helper.make_tensor_value_info("relu0", TensorProto.FLOAT,
                                                            ["N", 8, 16, 16]))
    calib = from_arrays({"input": np.zeros((8, 3, 16, 16), np.float32)}, "zeros")
    _, result = apply_pass(get_pass("early-exit")(), proto, PassContext(calib=calib))
    assert not result.modified and "one output" in result.refusals[0].reason


# -- onnxopt split --------------------------------------------------------------------------------


def test_split_cli_writes_and_evaluates_a_bundle(digits_model: Path, digits_calib: Path,
                                                 digits_eval: Path, tmp_path: Path,
                                                 capsys) -> None:
    out = tmp_path / "bundle"
    code = split_main([str(digits_model), "--calib", str(digits_calib), "--eval",
                       str(digits_eval), "--exits", "relu2;relu6", "-o", str(out), "-q"])
    assert code == 0
    text = capsys.readouterr().out
    assert "bundle run" in text and f"wrote {out}" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["cut"] for e in manifest["exits"]] == ["relu2", "relu6"]
    assert manifest["evaluation"]["samples"] == 512
    assert manifest["evaluation"]["agreement"] >= 0.98
    # Writing again replaces the bundle; a foreign non-empty folder is refused.
    assert split_main([str(digits_model), "-o", str(out), "-q"]) == 0
    assert read_manifest(out)["exits"] == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert split_main([str(digits_model), "-o", str(foreign)]) == 2
    assert (foreign / "keep.txt").exists()


def test_split_cli_plain_split_and_listing(tmp_path: Path, capsys) -> None:
    path = tmp_path / "se.onnx"
    proto = STRUCTURES["se_block"]()
    onnx.save(proto, path)
    assert split_main([str(path), "--list-cuts"]) == 0
    assert "relu0" in capsys.readouterr().out
    assert split_main([str(path), "-o", str(tmp_path / "b"), "--exits", "relu0"]) == 0
    runner = EarlyExitModel(tmp_path / "b")
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    expected = make_session(proto).run(None, {"input": x})[0]
    np.testing.assert_allclose(runner.run_stages({"input": x})[0], expected, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(runner.run({"input": x}).outputs[0], expected, rtol=1e-5,
                               atol=1e-5)
    assert split_main([str(path), "-o", str(tmp_path / "c"), "--exits", "nope"]) == 2


def test_split_cli_refuses_an_unwritable_bundle_path_before_any_work(
        digits_model: Path, digits_calib: Path, tmp_path: Path, capsys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxopt.passes.early_exit.planning as exits_module

    def no_planning(*args, **kwargs):
        raise AssertionError("planned exits for a bundle that cannot be written")

    monkeypatch.setattr(exits_module, "plan_exits", no_planning)
    missing = tmp_path / "no" / "such" / "folder.bundle"
    assert split_main([str(digits_model), "--calib", str(digits_calib), "-o",
                       str(missing)]) == 2
    assert "output folder does not exist" in capsys.readouterr().err
    model_file = tmp_path / "file.bundle"
    model_file.write_text("x")
    assert split_main([str(digits_model), "--calib", str(digits_calib), "-o",
                       str(model_file)]) == 2
    assert "not a folder" in capsys.readouterr().err and model_file.read_text() == "x"


def test_softmax_rows_sum_to_one() -> None:
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert p[0, 0] == pytest.approx(1.0)


def test_dry_run_plans_exits_and_leaves_the_model_alone(digits_model: Path,
                                                        digits_calib: Path) -> None:
    model = load(digits_model)
    ctx = PassContext(calib=from_npz(digits_calib), dry_run=True)
    work, result = apply_pass(get_pass("early-exit")(exits=("relu2",)), model, ctx)
    assert not result.modified and "If" not in op_counts(work)
    assert [e["cut"] for e in result.stats["exits"]] == ["relu2"]
    assert result.summary.startswith("1 exit at relu2")


def test_bundle_files_follow_the_umask(tmp_path: Path, capsys, umask_027) -> None:
    from onnxopt.passes.early_exit.bundle import update_manifest

    path = tmp_path / "se.onnx"
    onnx.save(STRUCTURES["se_block"](), path)
    bundle = tmp_path / "b"
    assert split_main([str(path), "-o", str(bundle), "--exits", "relu0", "-q"]) == 0
    update_manifest(bundle, evaluation=None)  # rewrites manifest.json atomically
    assert bundle.stat().st_mode & 0o777 == 0o750
    files = sorted(bundle.iterdir())
    assert {f.name for f in files} >= {"manifest.json", "stage0.onnx", "stage1.onnx"}
    assert all(f.stat().st_mode & 0o777 == 0o640 for f in files), [
        (f.name, oct(f.stat().st_mode)) for f in files]


# -- the promise and the samples it needs --------------------------------------------------------


def test_too_few_calibration_samples_keep_no_exit_and_say_how_many(
        digits_model: Path, digits_calib: Path, digits_eval: Path, tmp_path: Path,
        capsys) -> None:
    with np.load(digits_calib) as a, np.load(digits_eval) as b:
        x = np.concatenate([a["input"], b["input"]])
    # 120 samples: 90 to set thresholds, fewer than the 99 that 0.99 in expectation needs.
    small = from_arrays({"input": x[:120]}, "small")
    out, result = apply_pass(get_pass("early-exit")(), load(digits_model),
                             PassContext(calib=small))
    assert not result.modified and "If" not in op_counts(out)
    (refusal,) = result.refusals
    assert "90 threshold samples are too few" in refusal.reason
    assert "needs at least 99 (at least 131 calibration samples" in refusal.reason
    # 256 samples are enough in expectation, not with probability 0.9 (230 needed) ...
    pass_ = get_pass("early-exit")(confidence=0.9)
    _, result = apply_pass(pass_, load(digits_model), PassContext(calib=from_npz(digits_calib)))
    assert not result.modified
    assert "needs at least 230 (at least 306 calibration samples" in result.refusals[0].reason
    bundle = tmp_path / "b"
    assert split_main([str(digits_model), "--calib", str(digits_calib), "--confidence", "0.9",
                       "-o", str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs at least 230" in err and not bundle.exists()
    # ... and 768 unlabelled ones buy exits with probability 0.9.
    out, result = apply_pass(pass_, load(digits_model),
                             PassContext(calib=from_arrays({"input": x}, "unlabelled")))
    assert result.modified and len(result.stats["exits"]) >= 1
    assert result.stats["guarantee"]["kind"] == "with probability 0.9"
    assert result.stats["guarantee"]["threshold_samples"] == 384
    assert "with probability 0.9 (Learn-then-Test" in result.summary


# -- the lean forms ---------------------------------------------------------------------------


def _batch_one(model_path: Path) -> onnx.ModelProto:
    proto = onnx.load(model_path)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return proto


def test_batched_branches_carry_the_shapes_of_the_gathered_rows(single_file) -> None:
    model, _ = single_file
    proto = to_proto(model)
    for graph in _subgraphs(proto.graph):
        gathers = [n for n in graph.node if n.op_type == "GatherND"]
        if not gathers:
            continue
        shapes = {v.name: v.type.tensor_type.shape for v in graph.value_info}
        rows = shapes[gathers[0].output[0]]
        # [M, C, H, W]: the rank and the channels are known, so onnxruntime can fuse there.
        assert len(rows.dim) == 4 and all(d.dim_value > 0 for d in rows.dim[1:])
        assert "Slice" not in {n.op_type for n in graph.node}


def test_batch_of_one_needs_no_gather_and_answers_as_the_batched_form(
        plan, digits_model: Path, single_file, eval_data) -> None:
    from onnxopt.passes.early_exit.early_exit import build_if_form

    lean = load(_batch_one(digits_model))
    build_if_form(lean, plan)
    batched = load(digits_model)
    build_if_form(batched, plan)
    lean_proto, batched_proto = to_proto(lean), to_proto(batched)
    nested = Counter(n.op_type for g in _subgraphs(lean_proto.graph) for n in g.node)
    counts = op_counts(lean_proto)
    assert counts["If"] == 1 and nested["If"] == len(plan.heads) - 1
    for op in ("GatherND", "ScatterND", "NonZero", "ReduceMin", "Where", "Identity"):
        assert counts[op] == 0 and (op == "Identity" or nested[op] == 0)
    assert counts["Less"] + nested["Less"] == len(plan.heads)  # one decision op per exit
    assert counts["Conv"] + nested["Conv"] == 13
    x = eval_data["input"][:128]
    lean_session, batched_session = make_session(lean_proto), make_session(batched_proto)
    got = np.concatenate([lean_session.run(None, {"input": x[i:i + 1]})[0]
                          for i in range(len(x))])
    want = np.concatenate([batched_session.run(None, {"input": x[i:i + 1]})[0]
                           for i in range(len(x))])
    np.testing.assert_array_equal(got, want)
    reference = make_session(digits_model).run(None, {"input": x})[0]
    assert (np.abs(got - reference).max(axis=1) > 1e-3).mean() > 0.5  # exits were taken
    with pytest.raises(Exception, match="(?i)dim|shape"):
        lean_session.run(None, {"input": x[:2]})  # the lean form takes one sample only


def test_a_fixed_batch_of_two_keeps_the_batched_form(plan, digits_model: Path) -> None:
    from onnxopt.passes.early_exit.early_exit import build_if_form

    proto = onnx.load(digits_model)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # two samples, fixed
    model = load(proto)
    build_if_form(model, plan)
    nested = Counter(n.op_type for g in _subgraphs(to_proto(model).graph) for n in g.node)
    assert nested["GatherND"] == nested["ScatterND"] == len(plan.heads)


def test_the_batched_form_is_costed_at_its_worst_case(single_file, digits_model: Path) -> None:
    """The rows a branch gathers are counted as every row: the MACs of the staged model are
    the full model's plus its heads (an If is costed by its costliest branch)."""
    from onnxopt.cost import model_cost

    model, result = single_file
    original = model_cost(load(digits_model)).macs
    staged = model_cost(model)
    heads = sum(e["head_macs"] for e in result.stats["exits"])
    assert staged.macs is not None and not staged.macs_unknown
    assert original < staged.macs <= original + heads + 1000 * len(result.stats["exits"])
