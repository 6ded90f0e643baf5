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
from onnxopt.passes.early_exit.cuts import CutError, choose_cuts, find_cut_points
from onnxopt.passes.early_exit.exits import collect_features, plan_exits, simulate
from onnxopt.passes.early_exit.heads import choose_threshold, fit_head, softmax
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


def test_threshold_is_the_lowest_meeting_the_target() -> None:
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    agrees = np.array([1, 1, 1, 0, 1, 1], dtype=bool)
    assert choose_threshold(conf, agrees, 1.0) == 0.9
    assert choose_threshold(conf, agrees, 0.8) == 0.6  # 5 of 6 agree
    assert choose_threshold(conf, np.zeros(6, dtype=bool), 0.5) is None
    ties = np.array([0.9, 0.9, 0.5])
    # 0.9 takes both tied samples, one of which disagrees.
    assert choose_threshold(ties, np.array([1, 0, 1], dtype=bool), 1.0) is None
    assert choose_threshold(np.array([]), np.array([], dtype=bool), 0.9) is None


# -- the trained classifier --------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(digits_model: Path) -> object:
    return infer_shapes(load(digits_model))


@pytest.fixture(scope="module")
def plan(digits, digits_calib: Path):
    return plan_exits(digits, from_npz(digits_calib), choose_cuts(find_cut_points(digits)))


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
    assert plan.cuts == ["relu2", "relu4", "relu8"]
    assert plan.output == "logits" and plan.classes == 10 and not plan.dropped
    thresholds = [h.threshold for h in plan.heads]
    assert all(0.1 <= t <= 1.0 for t in thresholds)
    assert plan.calib_report.agreement >= 0.99
    for row in plan.calib_report.rows:
        assert row.agreement is None or row.agreement >= 0.99
    report = simulate(plan, collect_features(digits, from_npz(digits_eval), plan.cuts))
    assert report.samples == 512
    assert report.agreement >= 0.99
    assert report.macs_ratio <= 0.6
    assert sum(r.fraction for r in report.rows) == pytest.approx(1.0)
    assert report.rows[0].fraction > 0.1  # the first exit answers a real share
    macs = plan.exit_macs()
    assert macs == sorted(macs) and macs[-1] > plan.total_macs  # heads are counted


def test_single_file_structure_and_numerics(single_file, digits_model: Path, eval_data) -> None:
    model, result = single_file
    assert result.modified and not result.refusals
    proto = to_proto(model)
    assert [o.name for o in proto.graph.output] == ["logits"]
    counts = op_counts(proto)
    assert counts["If"] == 1 and counts["Conv"] == 3  # only stage 0 runs unconditionally
    nested = Counter(n.op_type for g in _subgraphs(proto.graph) for n in g.node)
    assert nested["If"] == 2 and nested["Conv"] == 10 and nested["Where"] == 3
    assert counts["Gemm"] + nested["Gemm"] == 4  # three heads and the original classifier
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
    assert result.stats["calibration"]["macs_ratio"] <= 0.6


def test_single_file_at_opset_18_uses_axes_inputs(digits_model: Path, digits_calib: Path,
                                                   eval_data) -> None:
    proto = onnx.load(digits_model)
    proto.opset_import[0].version = 18  # the model's ops did not change between 17 and 18
    ctx = PassContext(calib=from_npz(digits_calib))
    out, result = apply_pass(get_pass("early-exit")(exits=("relu4",)), proto, ctx)
    reduce_max = next(n for n in to_proto(out).graph.node if n.op_type == "ReduceMax")
    assert len(reduce_max.input) == 2
    assert "axes" not in {a.name for a in reduce_max.attribute}
    x = eval_data["input"][:64]
    reference = make_session(proto).run(None, {"input": x})[0]
    got = make_session(to_proto(out)).run(None, {"input": x})[0]
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.95


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
    assert [s["file"] for s in manifest["stages"]] == [f"stage{k}.onnx" for k in range(4)]
    assert [e["cut"] for e in manifest["exits"]] == plan.cuts
    assert manifest["inputs"] == ["input"] and manifest["outputs"] == ["logits"]
    for file in [*(s["file"] for s in manifest["stages"]), *(e["head"] for e in manifest["exits"])]:
        onnx.checker.check_model(onnx.load(path / file), full_check=True)
    runner = EarlyExitModel(path, threads=1)
    x = eval_data["input"][:128]
    result = runner.run({"input": x})
    assert result.outputs[0].shape == (128, 10)
    assert set(np.unique(result.exits)) <= {0, 1, 2, 3} and (result.exits < 3).mean() > 0.5
    single = make_session(to_proto(single_file[0]))
    expected = np.concatenate([single.run(None, {"input": x[i:i + 1]})[0] for i in range(128)])
    np.testing.assert_allclose(result.outputs[0], expected, rtol=1e-4, atol=1e-4)
    reference = make_session(digits).run(None, {"input": x})[0]
    np.testing.assert_allclose(runner.run_stages({"input": x})[0], reference,
                               rtol=1e-5, atol=1e-4)
    report = evaluate_bundle(runner, digits, plan, from_npz(digits_eval))
    assert report.samples == 512 and report.agreement >= 0.99 and report.macs_ratio <= 0.6
    assert report.accuracy is not None and report.accuracy >= 0.97


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
    import onnxopt.passes.early_exit.exits as exits_module

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
