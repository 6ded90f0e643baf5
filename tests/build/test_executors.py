"""The executor changes no result: --jobs 1, --jobs 2 and Ray write the same models and figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from onnxopt.cli import main

NAMES = ("digits", "chain", "res")
#: Report fields that are timing, not results (quantize's speed check times its model).
TIMING = {"seconds", "latency_vs_float"}
#: The clause of a summary line that states a timing.
TIMED_CLAUSE = "int8 runs "


def without_timing(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _summary(v) if k == "summary" else without_timing(v)
                for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def _summary(text: str | None) -> str | None:
    if not text:
        return text
    return "; ".join(p for p in text.split("; ") if not p.startswith(TIMED_CLAUSE))


def run(recipe: Path, capsys, *args: str) -> dict[str, Any]:
    """Build with ``args``; returns per entry its model's outputs, bytes and report."""
    code = main(["build", str(recipe), "--force", *args])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    folder = recipe.parent / "out"
    results = {}
    for name in NAMES:
        model = folder / f"{name}.opt.onnx"
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        spec = session.get_inputs()[0]
        feed = np.random.default_rng(3).standard_normal(
            [d if isinstance(d, int) else 4 for d in spec.shape]).astype(np.float32)
        results[name] = {
            "outputs": session.run(None, {spec.name: feed}),
            "bytes": model.read_bytes(),
            "report": without_timing(json.loads(
                (folder / f"{name}.opt.report.json").read_text())),
        }
    shutil.copytree(folder, recipe.parent / f"out{'-'.join(args) or '-default'}")
    return results


def assert_same(a: dict[str, Any], b: dict[str, Any], label: str) -> None:
    for name in NAMES:
        for x, y in zip(a[name]["outputs"], b[name]["outputs"], strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"{label}: {name}")
        assert a[name]["bytes"] == b[name]["bytes"], f"{label}: {name} model bytes differ"
        assert a[name]["report"] == b[name]["report"], f"{label}: {name} report differs"


def test_jobs_1_jobs_2_and_ray_write_identical_models_and_reports(recipe: Path,
                                                                   capsys) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install "
                                      "'onnxopt[ray]'; CI installs it)")
    one = run(recipe, capsys, "--jobs", "1")
    two = run(recipe, capsys, "--jobs", "2")
    assert_same(one, two, "--jobs 2")
    by_path = run(recipe, capsys, "--ray")
    assert_same(one, by_path, "--ray")
    # files through the object store, as on a cluster without shared storage
    stored = run(recipe, capsys, "--ray", "--ray-files", "store")
    assert_same(one, stored, "--ray --ray-files store")
    summary = (recipe.parent / "out" / "summary.md").read_text()
    assert "a local Ray, files by store" in summary


def test_files_packed_for_the_object_store_come_back_the_same(tmp_path: Path) -> None:
    from onnxopt.build.ray_executor import _materialize, pack

    folder = tmp_path / "npy"
    (folder / "sub").mkdir(parents=True)
    np.save(folder / "input.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    (folder / "sub" / "note.txt").write_text("x")
    kind, files = pack(folder)
    copy = _materialize((kind, files), tmp_path / "copy")
    assert kind == "dir" and sorted(files) == ["input.npy", "sub/note.txt"]
    np.testing.assert_array_equal(np.load(copy / "input.npy"), np.load(folder / "input.npy"))
    # a model travels with its external-data file
    import onnx
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                             [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                             [1, 64])], [weight])
    model_path = tmp_path / "m" / "model.onnx"
    model_path.parent.mkdir()
    onnx.save(helper.make_model(graph), model_path, save_as_external_data=True,
              location="model.data", size_threshold=0)
    kind, files = pack(model_path, model=True)
    assert sorted(files) == ["model.data", "model.onnx"]
    moved = _materialize((kind, files), tmp_path / "m2")
    x = np.ones((1, 64), np.float32)
    out = ort.InferenceSession(str(moved)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, np.full((1, 64), 64, np.float32))
