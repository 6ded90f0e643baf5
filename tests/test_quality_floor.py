"""No wrecked model with exit 0: the quality floor, crashes, data a pass needs, held-out data."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import Pass, PassContext, PassResult, optimize
from onnxopt.cli import main
from onnxopt.ir import add_initializer, const_array
from onnxopt.options import option
from onnxopt.pass_base import register_pass
from onnxopt.report import Status
from testmodels.graph_builder import GraphBuilder


@dataclass(frozen=True)
class _ScaleOptions:
    scale: float = option(-1.0, within="[-10, 10]")


@register_pass
class _FlipFirstConv(Pass):
    """Test-only lossy pass: scales the first Conv weight (-1 destroys the outputs)."""

    name = "test-floor-flip"
    description = "test pass that scales the first conv weight"
    Options = _ScaleOptions
    exact = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        node = next(n for n in model.graph if n.op_type == "Conv")
        new = add_initializer(model.graph, "flipped",
                              const_array(node.inputs[1]) * self.options.scale)
        node.replace_input_with(1, new)
        return PassResult(modified=True)


@dataclass(frozen=True)
class _PromiseOptions:
    scale: float = option(1.0, within="[-10, 10]")
    promise: float = option(0.99, within="[0, 1]")


@register_pass
class _PromisingFlip(_FlipFirstConv):
    """Test-only lossy pass that scales the first Conv weight and promises an agreement."""

    name = "test-floor-promise"
    description = "test pass that scales the first conv weight and promises an agreement"
    Options = _PromiseOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        result = super().run(model, ctx)
        result.promised_agreement = self.options.promise
        result.promise_caveat = "the test's caveat"
        return result


@register_pass
class _CrashingPass(Pass):
    name = "test-floor-crash"
    description = "test pass that raises"
    exact = False

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise RuntimeError("boom in the pass")


class _CountCalibration(Pass):
    """Test-only lossy pass that records how many calibration samples it was given."""

    name = "test-count-calib"
    description = "records the calibration size"
    exact = False
    needs_data = True
    seen: list[int] = []  # noqa: RUF012 - test probe

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        assert ctx.calib is not None
        total = 0
        for feeds, _ in ctx.calib.chunks():
            total += next(iter(feeds.values())).shape[0]
        type(self).seen.append(total)
        return PassResult(modified=False)


def _map_model() -> onnx.ModelProto:
    """Two Conv-BN-Relu layers whose output is the feature map itself (no classifier)."""
    g = GraphBuilder(0, 16, "N")
    x = g.conv_bn_relu(g.input, 8, 3)
    x = g.conv_bn_relu(x, 8, 3)
    return g.build(x, "map_model")


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the quality floor ---------------------------------------------------------------------------

def test_map_output_destroyed_is_rolled_back_with_exit_1(tmp_path, capsys):
    path = tmp_path / "map.onnx"
    onnx.save(_map_model(), path)
    out = tmp_path / "out.onnx"
    code, text, err = _run(capsys, [str(path), "-p", "test-floor-flip", "-o", str(out)])
    assert code == 1, text + err
    assert "gate failed" in text
    assert "SQNR" in text and "below --min-sqnr 10" in text and "default quality floor" in text
    # the model written is the original one, not the destroyed one
    written = onnx.load(out)
    original = onnx.load(path)
    assert [i.name for i in written.graph.initializer] == \
        [i.name for i in original.graph.initializer]


def test_map_floor_can_be_lowered_or_removed(tmp_path, capsys):
    path = tmp_path / "map.onnx"
    onnx.save(_map_model(), path)
    for extra in (["--min-sqnr", "-100"], ["--no-quality-floor"]):
        code, text, err = _run(capsys, [str(path), "-p", "test-floor-flip",
                                        "-o", str(tmp_path / "o.onnx"), *extra])
        assert code == 0, text + err
        assert "kept" in text


def test_a_mild_change_clears_the_floor(tmp_path, capsys):
    path = tmp_path / "map.onnx"
    onnx.save(_map_model(), path)
    code, text, err = _run(capsys, [str(path), "-p", "test-floor-flip(scale=0.999)",
                                    "-o", str(tmp_path / "o.onnx")])
    assert code == 0, text + err
    assert "quality floor top-1 agreement >= 0.9 for classifier outputs (default)" in text


def test_data_free_prune_that_wrecks_the_classifier_is_rolled_back(tmp_path, capsys,
                                                                    digits_model, digits_eval):
    out = tmp_path / "out.onnx"
    report = tmp_path / "r.json"
    code, text, err = _run(capsys, [str(digits_model), "-p", "prune(ratio=0.5,data_free=true)",
                                    "--eval", str(digits_eval), "-o", str(out),
                                    "--report", str(report)])
    assert code == 1, text + err
    record = json.loads(report.read_text())["passes"][0]
    assert record["status"] == "gate failed"
    assert "top-1 agreement" in record["message"] and "below --min-agreement 0.9" in \
        record["message"]
    assert record["vs_original"]["agreement"] < 0.9
    assert len(onnx.load(out).graph.node) == len(onnx.load(digits_model).graph.node)


def test_prune_and_quantize_on_the_bundled_model_clear_the_default_floor(
        tmp_path, capsys, digits_model, digits_calib):
    code, text, err = _run(capsys, [str(digits_model), "-p", "prune(ratio=0.3),quantize",
                                    "--calib", str(digits_calib), "-o", str(tmp_path / "o.onnx")])
    assert code == 0, text + err
    assert text.count(" kept ") == 2, text
    assert "held out of" in text and "never seen by the passes" in text


# -- crashes -------------------------------------------------------------------------------------

def test_a_crashed_pass_exits_1_without_strict_and_hides_the_traceback(tmp_path, capsys):
    path = tmp_path / "map.onnx"
    onnx.save(_map_model(), path)
    code, text, err = _run(capsys, [str(path), "-p", "test-floor-crash",
                                    "-o", str(tmp_path / "o.onnx")])
    assert code == 1
    assert "crashed" in text
    assert "Traceback" not in err and "boom in the pass" in err
    code, _, err = _run(capsys, [str(path), "-p", "test-floor-crash", "-v",
                                 "-o", str(tmp_path / "o.onnx")])
    assert code == 1 and "Traceback" in err


# -- data a pass needs ---------------------------------------------------------------------------

def test_prune_without_calibration_data_refuses_in_one_line(tmp_path, capsys, digits_model,
                                                             digits_eval):
    out = tmp_path / "out.onnx"
    code, text, err = _run(capsys, [str(digits_model), "-p", "prune", "--eval", str(digits_eval),
                                    "-o", str(out)])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--calib" in lines[0] and "data_free=true" in lines[0]
    assert not out.exists()


def test_accuracy_gate_without_labels_is_a_user_error_before_any_work(tmp_path, capsys,
                                                                      digits_model, digits_eval):
    data = np.load(digits_eval)
    nolabels = tmp_path / "nolabels.npz"
    np.savez(nolabels, input=data["input"][:64])
    out = tmp_path / "out.onnx"
    code, text, err = _run(capsys, [str(digits_model), "-p", "fold-bn,prune(ratio=0.5)",
                                    "--calib", str(nolabels), "--eval", str(nolabels),
                                    "--max-accuracy-drop", "0.01", "-o", str(out)])
    assert code == 2
    assert "labels" in err and "--max-accuracy-drop" in err
    assert text == "" and not out.exists()


# -- honest validation ---------------------------------------------------------------------------

def test_without_eval_validation_samples_are_held_out_from_calibration(digits_model,
                                                                       digits_calib):
    _CountCalibration.seen.clear()
    _, report = optimize(str(digits_model), [_CountCalibration()], calib=str(digits_calib))
    assert _CountCalibration.seen == [192]
    assert report.validated_samples == 64
    assert "64 samples held out of" in report.validation_note
    assert "other 192 samples" in report.validation_note


def test_with_eval_the_passes_get_all_calibration_samples(digits_model, digits_calib,
                                                          digits_eval):
    _CountCalibration.seen.clear()
    _, report = optimize(str(digits_model), [_CountCalibration()], calib=str(digits_calib),
                         eval=str(digits_eval))
    assert _CountCalibration.seen == [256]
    assert report.validated_samples == 512
    assert "calibrated on" in report.validation_note
    assert "digits_eval" in report.validation_note


def test_random_default_validation_warns_for_lossy_passes(tmp_path, capsys, caplog):
    path = tmp_path / "map.onnx"
    onnx.save(_map_model(), path)
    code, _, err = _run(capsys, [str(path), "-p", "test-floor-flip(scale=0.999)",
                                 "-o", str(tmp_path / "o.onnx")])
    assert code == 0
    assert "not representative" in err


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_gate_values_out_of_range_are_user_errors(tmp_path, capsys, value):
    path = tmp_path / "map.onnx"
    onnx.save(_map_model(), path)
    code, _, err = _run(capsys, [str(path), "--min-agreement", value])
    assert code == 2 and "--min-agreement" in err


def test_report_json_names_the_floor(tmp_path, capsys):
    path = tmp_path / "map.onnx"
    onnx.save(_map_model(), path)
    report = tmp_path / "r.json"
    _run(capsys, [str(path), "-p", "test-floor-flip", "--min-sqnr", "20",
                  "-o", str(tmp_path / "o.onnx"), "--report", str(report)])
    data = json.loads(report.read_text())
    assert data["quality_floor"].startswith("top-1 agreement >= 0.9")
    assert "SQNR >= 20 dB for other float outputs" in data["quality_floor"]
    assert Status(data["passes"][0]["status"]) is Status.GATE_FAILED


def test_a_sequence_of_class_distributions_is_judged_by_its_argmax_paths():
    from onnxopt.compare import QualityFloor, class_sequence_like, compare_outputs

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((20, 12, 30)).astype(np.float32) * 4
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    assert class_sequence_like(probs) and not class_sequence_like(logits)
    changed = probs.copy()
    changed[:5, 3] = changed[:5, 3, ::-1]  # 5 of 20 samples read a different path
    cmp = compare_outputs([probs], [changed], ["probs"])
    assert cmp.agreement == pytest.approx(0.75)
    assert "top-1 agreement 0.7500 is below --min-agreement 0.9" in QualityFloor().violation(cmp)
    assert compare_outputs([probs], [probs * 1.0001], ["probs"]).agreement == 1.0


def test_agreement_measured_below_a_pass_promise_is_noted(tmp_path, capsys, digits_model,
                                                          digits_eval):
    """The report says so when validation measures less agreement than the pass promised,
    and is silent when the measurement meets the promise."""
    out = str(tmp_path / "o.onnx")
    # x1.5 on the first conv weight changes some answers of the classifier, not most
    code, text, err = _run(capsys, [str(digits_model), "-p", "test-floor-promise(scale=1.5)",
                                    "--eval", str(digits_eval), "-o", out])
    assert code == 0, text + err
    agreement = float(text.split("test-floor-promise(scale=1.5)")[1].split()[7])
    assert 0.9 <= agreement < 0.99
    assert (f"measured agreement {agreement:.3f} on the 512 validation samples is below the "
            f"promised 0.99: the test's caveat") in text
    code, text, err = _run(capsys, [str(digits_model), "-p",
                                    "test-floor-promise(scale=1.5,promise=0.9)",
                                    "--eval", str(digits_eval), "-o", out])
    assert code == 0, text + err
    assert "is below the promised" not in text
