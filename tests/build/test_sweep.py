"""onnxopt sweep: variants of a pipeline, the Pareto table, the plot and --pick."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxopt.build.latency import Latency
from onnxopt.build.sweep import SweepResult, SweepRow, mark_pareto, pick
from onnxopt.build.variants import expand_alternatives
from onnxopt.cli import main
from onnxopt.errors import PipelineError, UserError

ROOT = Path(__file__).resolve().parents[2]
#: Four variants of the bundled classifier, each cheap: two quantizations, a prune, cleanup.
SPEC = ("fold-bn,quantize(per_channel=true|false)|prune(ratio=0.5,allocation=uniform,"
        "sensitivity=false,round_to=8)|cleanup")


def test_alternatives_expand_in_order_and_are_checked() -> None:
    assert expand_alternatives("prune(macs=0.3|0.5|0.7),quantize") == [
        "prune(macs=0.3),quantize", "prune(macs=0.5),quantize", "prune(macs=0.7),quantize"]
    assert expand_alternatives("fold-bn,quantize|prune(macs=0.5,criterion=l1|l2)") == [
        "fold-bn,quantize", "fold-bn,prune(macs=0.5,criterion=l1)",
        "fold-bn,prune(macs=0.5,criterion=l2)"]
    assert expand_alternatives("cleanup") == ["cleanup"]
    for bad, why in (("prune(macs=0.3|)", "empty alternative"),
                     ("prune(macs=0.3", "unbalanced"), ("fold-bn,,quantize", "empty step"),
                     ("prune(macs=2|0.5)", r"variant 'prune\(macs=2\)'")):
        with pytest.raises(PipelineError, match=why):
            expand_alternatives(bad)


def row(label: str, accuracy: float, latency: float) -> SweepRow:
    return SweepRow(label, label, "built", accuracy=accuracy, agreement=1.0,
                    latency={1: Latency(latency, latency, latency, 1.0)}, output=label)


def test_pareto_front_and_pick_by_hand() -> None:
    rows = [row("original", 0.99, 1.0), row("a", 0.99, 0.6), row("b", 0.985, 0.5),
            row("c", 0.98, 0.55), row("d", 0.95, 0.3)]
    result = SweepResult("m.onnx", rows, [1], labelled=True, executor="here")
    mark_pareto(result)
    # c is beaten by b (better and faster); the original by a (as good, faster)
    assert [r.label for r in rows if r.pareto] == ["a", "b", "d"]
    # a fraction as for --max-accuracy-drop, or points with a % sign
    assert pick(result, "max-accuracy-drop=0.005")[0].label == "b"
    assert pick(result, "max-accuracy-drop=0.5%")[0].label == "b"
    assert pick(result, "max-accuracy-drop=0.004")[0].label == "a"
    assert pick(result, "max-accuracy-drop=0")[0].label == "a"
    assert pick(result, "max-accuracy-drop=5%")[0].label == "d"
    with pytest.raises(UserError, match="fraction between 0 and 1"):
        pick(result, "max-accuracy-drop=5")
    for r in rows[1:]:
        r.agreement = 0.97
    chosen, why = pick(result, "min-agreement=0.98")
    assert chosen is None and "no variant" in why
    with pytest.raises(UserError, match="fraction between 0 and 1"):
        pick(result, "min-agreement=1.01")
    with pytest.raises(UserError, match="NAME=VALUE"):
        pick(result, "fastest")
    result.labelled = False
    with pytest.raises(UserError, match="labelled"):
        pick(result, "max-accuracy-drop=0.005")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("digits")
    for name in ("calib", "eval"):
        data = np.load(ROOT / "testmodels" / f"digits_{name}.npz")
        np.savez(folder / f"{name}.npz", input=data["input"][:64], labels=data["labels"][:64])
    return folder / "calib.npz", folder / "eval.npz"


def test_sweep_of_the_bundled_classifier(tmp_path: Path, small_data, capsys) -> None:
    calib, eval_data = small_data
    out, picked = tmp_path / "sweep", tmp_path / "picked.onnx"
    code = main(["sweep", str(ROOT / "testmodels" / "digits_resnet.onnx"), "-p", SPEC,
                 "--calib", str(calib), "--eval", str(eval_data), "--batch-sizes", "8,1",
                 "--rounds", "3", "--out", str(out), "--pick", "max-accuracy-drop=0.5%",
                 "-o", str(picked)])
    text, err = capsys.readouterr()
    assert code == 0, text + err
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    end = next(i for i, line in enumerate(lines) if line.startswith("latency: "))
    table = lines[start + 2:end]
    assert len(table) == 2 + 4  # the original, its A/A row, four variants
    assert "latency b8" in text and "latency b1" in text and "pareto" in text
    report = json.loads((out / "sweep.json").read_text())
    rows = report["rows"]
    assert [r["pipeline"] for r in rows[1:]] == expand_alternatives(SPEC)
    assert any(r["pareto"] for r in rows)
    assert all(r["status"] == "built" for r in rows[1:])
    pruned = rows[3]
    assert pruned["macs"] < 0.7 * rows[0]["macs"]  # the prune variant is one
    assert (out / "sweep.png").stat().st_size > 10_000
    page = (out / "sweep.html").read_text()
    assert page.count("<svg") == 2 and "<script" not in page
    # --pick wrote the variant it named, and that variant meets the constraint
    line = next(s for s in text.splitlines() if "is the fastest meeting" in s)
    label = line.split()[0]
    assert picked.read_bytes() == (out / "variants" / f"{label}.onnx").read_bytes()
    chosen = next(r for r in rows if r["label"] == label)
    assert 100 * (rows[0]["accuracy"] - chosen["accuracy"]) <= 0.5
    assert chosen["latency"]["8"]["ratio"] == min(
        r["latency"]["8"]["ratio"] for r in rows[1:]
        if 100 * (rows[0]["accuracy"] - r["accuracy"]) <= 0.5)
    session = ort.InferenceSession(str(picked), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((2, 1, 32, 32), np.float32)})[0].shape == (2, 10)
    # a second sweep reuses the built variants; without matplotlib it says so in one line
    (out / "sweep.png").unlink()
    sys.modules["matplotlib"] = None  # type: ignore[assignment]
    try:
        code = main(["sweep", str(ROOT / "testmodels" / "digits_resnet.onnx"), "-p", SPEC,
                     "--calib", str(calib), "--eval", str(eval_data), "--batch-sizes", "8",
                     "--rounds", "3", "--out", str(out)])
    finally:
        del sys.modules["matplotlib"]
    text, err = capsys.readouterr()
    assert code == 0, text + err
    assert [line.split()[2] for line in text.splitlines() if line.startswith("[")] == \
        ["cached"] * 4
    notes = [line for line in text.splitlines() if "matplotlib is not installed" in line]
    assert len(notes) == 1 and not (out / "sweep.png").exists()
    # a --pick that is not a fraction is refused before any work
    code = main(["sweep", str(ROOT / "testmodels" / "digits_resnet.onnx"), "-p", SPEC,
                 "--calib", str(calib), "--eval", str(eval_data), "--out", str(out),
                 "--pick", "max-accuracy-drop=-0.01", "-o", str(tmp_path / "none.onnx")])
    text, err = capsys.readouterr()
    assert code == 2 and "fraction between 0 and 1" in err, text + err
    assert not any(line.startswith("[") for line in text.splitlines())
    assert (out / "sweep.md").is_file() and not (tmp_path / "none.onnx").exists()


def test_sweep_user_errors(tmp_path: Path, capsys) -> None:
    model = str(ROOT / "testmodels" / "digits_resnet.onnx")
    for args, message in (([model, "-p", "quantize(method=x|minmax)"], "method"),
                          ([model, "-p", "cleanup", "--pick", "speed=2"], "NAME=VALUE"),
                          ([model, "-p", "cleanup", "--batch-sizes", "a"], "--batch-sizes"),
                          ([str(tmp_path / "none.onnx"), "-p", "cleanup"], "no model")):
        code = main(["sweep", *args, "--out", str(tmp_path / "s")])
        _, err = capsys.readouterr()
        assert code == 2 and message in err and err.count("\n") == 1, err
