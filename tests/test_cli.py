"""CLI: the quickstart run, exit codes, one-line user errors, and no partial outputs."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
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


def test_strict_states_a_rollback_once(conv_chain_path, capsys, monkeypatch):
    """The reason for a rollback is on stderr once: in the warning, or in the --strict line
    when -q silenced the warning."""
    import onnxopt.pass_base as pb
    from tests.test_manager import PerturbWeight

    monkeypatch.setitem(pb._REGISTRY, PerturbWeight.name, PerturbWeight)
    for quiet in (["-q"], []):
        assert main([str(conv_chain_path), "-p", "test-perturb", "--strict", *quiet]) == 1
        err = capsys.readouterr().err
        assert err.count("exact pass changed the outputs") == 1, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("onnxopt: --strict: exit 1: pass test-perturb rolled back")
        assert last.endswith("(reason above)") is not bool(quiet)


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
    assert f"weight '{proto.graph.initializer[0].name}' contains NaN" in _one_line_error(
        capsys, code)
    assert main([str(path), "-p", "cleanup", "--no-check", "-q",
                 "-o", str(tmp_path / "o.onnx")]) == 0


def test_inf_in_a_conv_weight_is_refused(tmp_path, capsys):
    from testmodels.structures import conv_chain

    proto = conv_chain()
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    init = next(i for i in proto.graph.initializer if i.name == conv.input[1])
    weight = onnx.numpy_helper.to_array(init).copy()
    weight.flat[3] = -np.inf
    init.CopyFrom(onnx.numpy_helper.from_array(weight, init.name))
    path = tmp_path / "inf.onnx"
    onnx.save(proto, path)
    code = main([str(path), "-p", "cleanup", "-o", str(tmp_path / "o.onnx")])
    assert f"weight '{init.name}' contains Inf" in _one_line_error(capsys, code)
    assert not (tmp_path / "o.onnx").exists()


def test_minus_inf_mask_constant_is_a_legitimate_weight(tmp_path):
    """A -inf constant that is not a layer's weight (here the floor of a running Max, as
    JAX/TensorFlow exports write them) passes the input check, and the model is optimized
    with its outputs unchanged."""
    from onnx import TensorProto, helper

    floor = np.full((1, 4), -np.inf, np.float32)
    floor[0, 1] = 0.5
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Max", ["h", "floor"], ["y"])],
        "mask", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(
            np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "w"),
         onnx.numpy_helper.from_array(floor, "floor")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path, out = tmp_path / "mask.onnx", tmp_path / "o.onnx"
    onnx.save(proto, path)
    assert main([str(path), "-p", "cleanup", "-q", "-o", str(out)]) == 0
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(before.run(None, {"x": x})[0], after.run(None, {"x": x})[0])


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
    code = main([str(digits_model), "-p", "fold-bn,prune(macs=0.5,round_to=8),cleanup",
                 "--calib", str(digits_calib), "--dry-run", "-o", str(out), "--report",
                 str(report)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "prune(macs=0.5,round_to=8) plan:" in text and "MACs saved" in text
    assert "plan only: macs=0.5" in text and "dry run: no model written" in text
    assert not out.exists()
    passes = json.loads(report.read_text())["passes"]
    # The exact pass before the plan runs: prune plans on the model a real run would prune.
    assert [p["status"] for p in passes] == ["kept", "unchanged", "not run"]
    assert passes[1]["summary"].startswith("plan only:") and "MACs saved" in passes[1]["plan"]
    assert passes[2]["message"] == "not run (no plan mode)"  # nothing after the plan runs


def test_dry_run_runs_no_lossy_pass_on_an_unplanned_model(tmp_path, capsys, digits_model,
                                                         digits_calib, monkeypatch):
    from onnxopt.pass_base import get_pass

    def never(self, model, ctx):
        raise AssertionError("quantize ran in a dry run")

    monkeypatch.setattr(get_pass("quantize"), "run", never)
    report = tmp_path / "r.json"
    code = main([str(digits_model), "-p", "cleanup,quantize,prune(criterion=l1,reconstruct=false)",
                 "--calib", str(digits_calib), "--dry-run", "--report", str(report), "-q"])
    assert code == 0
    passes = json.loads(report.read_text())["passes"]
    assert [p["status"] for p in passes] == ["unchanged", "not run", "unchanged"]
    assert "plan" in passes[2]["summary"]


def test_dry_run_without_a_planning_pass_is_a_user_error(capsys, conv_chain_path):
    code = main([str(conv_chain_path), "-p", "cleanup,fold-bn", "--dry-run"])
    line = _one_line_error(capsys, code)
    assert "no pass in the pipeline has a plan-only mode (early-exit, prune have one)" in line


# -- everything the run writes is checked first --------------------------------------------------


def test_report_path_is_checked_before_any_work(tmp_path, capsys, conv_chain_path, monkeypatch):
    import onnxopt.api

    def no_work(*args, **kwargs):
        raise AssertionError("optimized a model whose report cannot be written")

    monkeypatch.setattr(onnxopt.api, "PassManager", no_work)
    out = tmp_path / "o.onnx"
    for report, message in ((tmp_path / "no" / "r.json", "output folder does not exist"),
                            (tmp_path, "output path is a directory"),
                            (out, "--report and the output are the same file")):
        code = main([str(conv_chain_path), "-p", "cleanup", "-o", str(out),
                     "--report", str(report)])
        assert message in _one_line_error(capsys, code)
        assert not out.exists()


# -- a table that says what it compares ----------------------------------------------------------


def _lossy_digits(monkeypatch):
    import onnxopt.pass_base as pb
    from tests.test_manager import LossyPerturb

    monkeypatch.setitem(pb._REGISTRY, LossyPerturb.name, LossyPerturb)


def test_missed_gate_is_stated_once_in_the_units_typed(tmp_path, capsys, digits_model,
                                                       digits_eval, monkeypatch):
    _lossy_digits(monkeypatch)
    argv = [str(digits_model), "-p", "test-lossy-perturb(scale=-1)", "--eval", str(digits_eval),
            "--max-accuracy-drop", "0.01", "--min-agreement", "0", "-o", str(tmp_path / "o.onnx")]
    assert main(argv) == 1
    captured = capsys.readouterr()
    both = captured.out + captured.err
    found = re.findall(r"accuracy dropped (0\.\d{4}) \((\d+\.\d\d) points\), more than "
                       r"--max-accuracy-drop 0\.01\b", both)
    assert len(found) == 1, both  # once: in the table's notes
    fraction, points = map(float, found[0])
    assert fraction > 0.01 and points == pytest.approx(100 * fraction, abs=0.006)
    assert "gate failed" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        "onnxopt: exit 1: gate missed by test-lossy-perturb(scale=-1) (see the table)")
    # -q leaves the table out, so the message is on stderr, once.
    assert main([*argv, "-q"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {tmp_path / 'o.onnx'}"
    assert captured.err.count("accuracy dropped") == 1 and "more than --max-accuracy-drop 0.01" \
        in captured.err


def test_table_says_what_it_compares_and_original_size_matches_info(tmp_path, capsys,
                                                                    digits_model, digits_eval):
    assert main(["info", str(digits_model)]) == 0
    size_line = next(line for line in capsys.readouterr().out.splitlines()
                     if line.startswith("size"))
    shown = re.search(r"\((\S+)\)", size_line).group(1)  # e.g. 674.6kB
    report = tmp_path / "r.json"
    assert main([str(digits_model), "-p", "cleanup,fold-bn", "--eval", str(digits_eval),
                 "-o", str(tmp_path / "o.onnx"), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert shown in rows["(original)"] and shown in rows["cleanup"]  # unchanged: same size
    assert "max err and agree compare each pass with the stage before it, the total with " \
           "the original" in out
    data = json.loads(report.read_text())
    assert data["original"]["bytes"] == digits_model.stat().st_size
    assert data["passes"][-1]["after"]["bytes"] == (tmp_path / "o.onnx").stat().st_size
    # The file's size describes the model only until it is rewritten.
    from onnxopt import load, optimize

    result, first = optimize(load(digits_model), "fold-bn", validate=False)
    assert first.original.bytes == digits_model.stat().st_size
    _, second = optimize(result, "cleanup", validate=False)
    assert second.original.bytes == first.records[-1].after.bytes


def test_one_sample_is_singular(tmp_path, capsys, conv_chain_path):
    assert main([str(conv_chain_path), "-p", "cleanup,fold-bn", "--max-samples", "1",
                 "-o", str(tmp_path / "o.onnx")]) == 0
    out = capsys.readouterr().out
    assert "validated on 1 sample from random:16" in out


# -- command-line polish -------------------------------------------------------------------------


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"onnxopt {version('onnxopt')}"


def test_help_returns_zero(capsys):
    assert main(["--help"]) == 0
    assert "--max-accuracy-drop" in capsys.readouterr().out
    assert main(["split", "--help"]) == 0
    assert "--fit-to" in capsys.readouterr().out


def _all_parsers():
    from onnxopt.cli import _info_parser, _main_parser
    from onnxopt.passes.early_exit.cli import _parser as split_parser

    return [_main_parser(), _info_parser(), split_parser()]


def test_every_option_of_every_parser_has_help():
    import argparse

    checked = 0
    for parser in _all_parsers():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{parser.prog} {name} has no help"
            checked += 1
    assert checked >= 40  # every parser was seen


def test_broken_pipe_is_quiet_in_process(capsys, monkeypatch):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise OSError("no descriptor")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["--list-passes"]) == 141
    assert capsys.readouterr().err == ""


def test_broken_pipe_is_quiet_for_the_command(tmp_path):
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before onnxopt writes a line, as after `| head`
    try:
        proc = subprocess.run([sys.executable, "-m", "onnxopt", "--list-passes"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert proc.stderr == ""
