"""CLI: the quickstart run, exit codes, one-line user errors, and no partial outputs."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt.cli import main


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxopt: error: ")
    return lines[0]


def test_quickstart_on_trained_model(tmp_path, capsys, digits_model, digits_eval):
    out = tmp_path / "digits.opt.onnx"
    report = tmp_path / "report.json"
    code = main([str(digits_model), "-p", "cleanup,fold-bn", "--eval", str(digits_eval),
                 "-o", str(out), "--report", str(report), "--strict"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "fold-bn" in text and "total" in text
    optimized = onnx.load(out)
    assert not any(n.op_type == "BatchNormalization" for n in optimized.graph.node)
    data = json.loads(report.read_text())
    accuracies = [p["vs_original"]["accuracy"] for p in data["passes"] if p["vs_original"]]
    assert accuracies and all(a == data["original_accuracy"] for a in accuracies)
    assert data["original_accuracy"] > 0.9


def test_default_output_path_next_to_model(conv_chain_path, capsys):
    assert main([str(conv_chain_path), "-p", "cleanup", "-q"]) == 0
    assert conv_chain_path.with_name("conv_chain.opt.onnx").exists()


def test_missing_file(tmp_path, capsys):
    code = main([str(tmp_path / "nope.onnx"), "-p", "cleanup"])
    assert "not found" in _one_line_error(capsys, code)


def test_truncated_model(tmp_path, capsys, conv_chain_path):
    data = conv_chain_path.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    code = main([str(bad), "-p", "cleanup", "-o", str(tmp_path / "o.onnx")])
    assert "ONNX" in _one_line_error(capsys, code)
    assert not (tmp_path / "o.onnx").exists()


def test_non_onnx_file(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    code = main([str(bad), "-p", "cleanup"])
    assert "ONNX" in _one_line_error(capsys, code)


def test_wrong_calibration_input_name(tmp_path, capsys, conv_chain_path):
    data = tmp_path / "calib.npz"
    np.savez(data, image=np.zeros((4, 3, 16, 16), np.float32))
    code = main([str(conv_chain_path), "-p", "cleanup", "--calib", str(data)])
    line = _one_line_error(capsys, code)
    assert "'input'" in line and "[N, 3, 16, 16]" in line and "image" in line


def test_wrong_calibration_shape(tmp_path, capsys, conv_chain_path):
    data = tmp_path / "calib.npz"
    np.savez(data, input=np.zeros((4, 3, 8, 8), np.float32))
    code = main([str(conv_chain_path), "-p", "cleanup", "--calib", str(data)])
    line = _one_line_error(capsys, code)
    assert "'input'" in line and "[4, 3, 8, 8]" in line and "[N, 3, 16, 16]" in line


def test_unknown_pass_suggests_closest(conv_chain_path, capsys):
    code = main([str(conv_chain_path), "-p", "cleanup,fold-nb"])
    assert "did you mean 'fold-bn'" in _one_line_error(capsys, code)


def test_unknown_option_suggests_closest(conv_chain_path, capsys):
    code = main([str(conv_chain_path), "-p", "cleanup(foo=1)"])
    assert "has no option 'foo'" in _one_line_error(capsys, code)


def test_bad_flag_is_one_line(capsys):
    code = main(["--no-such-flag"])
    _one_line_error(capsys, code)


def test_output_into_missing_folder(tmp_path, capsys, conv_chain_path):
    code = main([str(conv_chain_path), "-p", "cleanup", "-o", str(tmp_path / "no" / "x.onnx")])
    assert "does not exist" in _one_line_error(capsys, code)


def test_output_is_directory(tmp_path, capsys, conv_chain_path):
    code = main([str(conv_chain_path), "-p", "cleanup", "-o", str(tmp_path)])
    assert "directory" in _one_line_error(capsys, code)


def test_unwritable_output_leaves_no_partial_file(tmp_path, capsys, conv_chain_path,
                                                  monkeypatch):
    import onnx_ir

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_save = onnx_ir.save

    def failing_save(model, path, **kwargs):
        real_save(model, path, **kwargs)  # a partial file exists on disk at this point
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", failing_save)
    code = main([str(conv_chain_path), "-p", "cleanup", "-o", str(out_dir / "x.onnx")])
    assert "No space left" in _one_line_error(capsys, code)
    assert list(out_dir.iterdir()) == []


def test_unwritable_system_folder_leaves_nothing(capsys, conv_chain_path):
    code = main([str(conv_chain_path), "-p", "cleanup", "-o", "/proc/onnxopt-test.onnx"])
    _one_line_error(capsys, code)
    assert not Path("/proc/onnxopt-test.onnx").exists()


def test_input_is_never_overwritten_by_default(conv_chain_path, capsys):
    before = conv_chain_path.read_bytes()
    assert main([str(conv_chain_path), "-p", "cleanup,fold-bn", "-q"]) == 0
    assert conv_chain_path.read_bytes() == before


def test_strict_exit_code_on_rollback(conv_chain_path, capsys, monkeypatch):
    import onnxopt.pass_base as pb
    from tests.test_manager import PerturbWeight

    monkeypatch.setitem(pb._REGISTRY, PerturbWeight.name, PerturbWeight)
    assert main([str(conv_chain_path), "-p", "test-perturb", "-q"]) == 0
    assert main([str(conv_chain_path), "-p", "test-perturb", "--strict", "-q"]) == 1
    assert "rolled back" in capsys.readouterr().err


def test_gate_exit_code_names_pass(conv_chain_path, capsys, monkeypatch):
    import onnxopt.pass_base as pb
    from tests.test_manager import LossyPerturb

    monkeypatch.setitem(pb._REGISTRY, LossyPerturb.name, LossyPerturb)
    code = main([str(conv_chain_path), "-p", "test-lossy-perturb(scale=-1)",
                 "--calib", "random:32", "--min-agreement", "0.99", "-q"])
    assert code == 1
    assert "test-lossy-perturb" in capsys.readouterr().err


def test_list_passes(capsys):
    assert main(["--list-passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup" in out and "fold-bn" in out and "exact" in out


def test_python_dash_m(conv_chain_path, tmp_path):
    out = tmp_path / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxopt", str(conv_chain_path), "-p",
                           "fold-bn", "-o", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    assert "fold-bn" in proc.stdout


@pytest.mark.parametrize("spec", ["cleanup(", "prune(ratio)", "(x)", "a b"])
def test_pipeline_syntax_errors(conv_chain_path, capsys, spec):
    code = main([str(conv_chain_path), "-p", spec])
    _one_line_error(capsys, code)


def test_model_failing_checker(tmp_path, capsys):
    from testmodels.structures import conv_chain

    proto = conv_chain()
    proto.graph.node[1].input[0] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    onnx.save(proto, path)
    code = main([str(path), "-p", "cleanup", "-o", str(tmp_path / "o.onnx")])
    line = _one_line_error(capsys, code)
    assert "onnx.checker" in line and "--no-check" in line
    assert not (tmp_path / "o.onnx").exists()


def test_nan_weights_refused_unless_no_check(tmp_path, capsys):
    from testmodels.structures import conv_chain

    proto = conv_chain()
    weight = onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy()
    weight.flat[0] = np.nan
    proto.graph.initializer[0].CopyFrom(
        onnx.numpy_helper.from_array(weight, proto.graph.initializer[0].name))
    path = tmp_path / "nan.onnx"
    onnx.save(proto, path)
    code = main([str(path), "-p", "cleanup", "-o", str(tmp_path / "o.onnx")])
    assert "NaN or Inf" in _one_line_error(capsys, code)
    assert main([str(path), "-p", "cleanup", "--no-check", "-q",
                 "-o", str(tmp_path / "o.onnx")]) == 0


def test_empty_calibration_data(tmp_path, capsys, conv_chain_path):
    data = tmp_path / "empty.npz"
    np.savez(data, input=np.zeros((0, 3, 16, 16), np.float32))
    code = main([str(conv_chain_path), "-p", "cleanup", "--calib", str(data)])
    assert "no samples" in _one_line_error(capsys, code)


def test_calibration_sample_count_below_what_a_pass_needs(tmp_path, capsys, digits_model):
    data = np.load(digits_model.parent / "digits_calib.npz")
    small = tmp_path / "small.npz"
    np.savez(small, input=data["input"][:5], labels=data["labels"][:5])
    out = tmp_path / "o.onnx"
    code = main([str(digits_model), "-p", "early-exit", "--calib", str(small), "-o", str(out)])
    line = _one_line_error(capsys, code)
    assert "needs at least 32 calibration samples" in line and "has 5" in line
    assert not out.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, digits_model,
                                                    digits_calib):
    out, report = tmp_path / "never.onnx", tmp_path / "report.json"
    code = main([str(digits_model), "-p", "fold-bn,prune(macs=0.5,round_to=8)", "--calib",
                 str(digits_calib), "--dry-run", "-o", str(out), "--report", str(report)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "prune(macs=0.5,round_to=8) plan:" in text and "MACs saved" in text
    assert "plan only: macs=0.5" in text and "dry run: nothing written" in text
    assert not out.exists()
    passes = json.loads(report.read_text())["passes"]
    assert [p["status"] for p in passes] == ["kept", "unchanged"]  # fold-bn still runs
    assert passes[1]["summary"].startswith("plan only:") and "MACs saved" in passes[1]["plan"]


def test_dry_run_without_a_planning_pass_is_a_user_error(capsys, conv_chain_path):
    code = main([str(conv_chain_path), "-p", "cleanup,fold-bn", "--dry-run"])
    line = _one_line_error(capsys, code)
    assert "no pass in the pipeline has a plan-only mode (early-exit, prune have one)" in line
