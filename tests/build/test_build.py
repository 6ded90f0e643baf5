"""onnxopt build: every entry built, the unchanged skipped, gates and user errors per entry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnxruntime as ort
import pytest

from onnxopt.cli import main
from tests.build.recipes import make_recipe, write_random

NAMES = ("digits", "chain", "res")


def run_build(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["build", *args])
    out, err = capsys.readouterr()
    return code, out, err


def statuses(out: str) -> dict[str, str]:
    """Entry name -> status, from the progress lines ``[i/n] name  status ...``."""
    found = {}
    for line in out.splitlines():
        if line.startswith("["):
            _, name, status = line.split(None, 3)[:3]
            found[name] = status
    return found


def report(recipe: Path, name: str) -> dict:
    return json.loads((recipe.parent / "out" / f"{name}.opt.report.json").read_text())


def test_build_writes_every_model_report_and_summary(recipe: Path, capsys) -> None:
    code, out, _ = run_build(capsys, str(recipe))
    assert code == 0, out
    assert statuses(out) == dict.fromkeys(NAMES, "built")
    folder = recipe.parent / "out"
    for name in NAMES:
        data = report(recipe, name)
        assert data["build"]["key"] and data["output_path"] == str(folder / f"{name}.opt.onnx")
        # the written model runs and gives what the report says of it
        session = ort.InferenceSession(str(folder / f"{name}.opt.onnx"))
        assert session.get_inputs()[0].name == "input"
    assert [p["status"] for p in report(recipe, "chain")["passes"]] == ["kept", "kept"]
    res = report(recipe, "res")
    assert res["final"]["macs"] < 0.8 * res["original"]["macs"]  # prune really pruned
    summary = (folder / "summary.md").read_text()
    assert all(f"| {name} | built |" in summary for name in NAMES)
    assert (folder / "summary.html").read_text().startswith("<!DOCTYPE html>")


def test_second_run_skips_all_and_a_data_change_rebuilds_only_its_entry(recipe: Path,
                                                                          capsys) -> None:
    assert run_build(capsys, str(recipe))[0] == 0
    folder = recipe.parent / "out"
    stamps = {n: (folder / f"{n}.opt.onnx").stat().st_mtime_ns for n in NAMES}
    code, out, _ = run_build(capsys, str(recipe))
    assert code == 0 and statuses(out) == dict.fromkeys(NAMES, "cached")
    assert {n: (folder / f"{n}.opt.onnx").stat().st_mtime_ns for n in NAMES} == stamps
    # a new modification time with the same bytes changes no content hash
    os.utime(recipe.parent / "data" / "chain.npz")
    assert statuses(run_build(capsys, str(recipe))[1]) == dict.fromkeys(NAMES, "cached")
    # new bytes in one data file: only the entry reading it is built again
    write_random(recipe.parent / "data" / "chain.npz", seed=7)
    code, out, _ = run_build(capsys, str(recipe))
    assert code == 0
    assert statuses(out) == {"digits": "cached", "chain": "built", "res": "cached"}
    # a changed output is not trusted, and --force rebuilds everything
    (folder / "res.opt.onnx").write_bytes(b"tampered")
    assert statuses(run_build(capsys, str(recipe))[1])["res"] == "built"
    assert statuses(run_build(capsys, str(recipe), "--force")[1]) == \
        dict.fromkeys(NAMES, "built")


def test_option_change_rebuilds_only_that_entry(recipe: Path, capsys) -> None:
    assert run_build(capsys, str(recipe))[0] == 0
    text = recipe.read_text().replace('pipeline = "cleanup,fold-bn"\n',
                                      'pipeline = "fold-bn"\n', 1)
    recipe.write_text(text)
    assert statuses(run_build(capsys, str(recipe))[1]) == {
        "digits": "built", "chain": "cached", "res": "cached"}


def test_missed_gate_exits_1_and_the_others_are_written(tmp_path: Path, capsys) -> None:
    recipe = make_recipe(tmp_path / "p", chain_agreement=0.999,
                         chain_quantize="quantize(fallback=false)")
    code, out, err = run_build(capsys, str(recipe))
    assert code == 1, out + err
    assert statuses(out) == {"digits": "built", "chain": "gate", "res": "built"}
    assert "gate missed" in out and "quantize" in out
    folder = recipe.parent / "out"
    for name in NAMES:  # the chain's model is the one before the pass that missed the gate
        assert (folder / f"{name}.opt.onnx").is_file()
    chain = report(recipe, "chain")
    assert chain["build"]["key"] is None
    assert [p["status"] for p in chain["passes"]] == ["kept", "gate failed"]
    assert "chain" in (folder / "summary.md").read_text().split("## Problems", 1)[1]
    # a failed entry is never cached: it runs again, the others are skipped
    code, out, _ = run_build(capsys, str(recipe))
    assert code == 1
    assert statuses(out) == {"digits": "cached", "chain": "gate", "res": "cached"}


def test_entry_user_error_exits_2_after_building_the_others(recipe: Path, capsys) -> None:
    # digits' 32x32 single-channel data given to the 16x16 RGB chain model
    recipe.write_text(recipe.read_text().replace('calib = "data/chain.npz"',
                                                 'calib = "data/digits_eval.npz"'))
    code, out, _ = run_build(capsys, str(recipe))
    assert code == 2
    assert statuses(out) == {"digits": "built", "chain": "error:", "res": "built"}
    assert not (recipe.parent / "out" / "chain.opt.onnx").exists()


@pytest.mark.parametrize(("change", "named"), [
    (('name = "chain"', 'name = "chain"\nspeed = 3'), "model 'chain': unknown key 'speed'"),
    (("gates = { min_agreement = 0.5 }", 'gates = { min_agreement = "high" }'),
     "model 'chain': key 'gates.min_agreement': expected a number"),
    (("gates = { min_agreement = 0.5 }", "gates = { min_agreemnt = 0.5 }"),
     "model 'chain': key 'gates.min_agreemnt': unknown gate"),
    (('pipeline = "fold-bn,quantize"', 'pipeline = "fold-bn,quantise"'),
     "model 'chain': key 'pipeline'"),
    (('path = "models/res.onnx"', 'path = "models/missing.onnx"'),
     "model 'res': key 'path': no model file"),
    (('calib = "data/res.npz"', 'calib = "data/nothing.npz"'), "model 'res': key 'calib'"),
    (('input_shape = ["input:1x3x16x16"]', 'input_shape = ["input:1xbx16"]'),
     "model 'res': key 'input_shape'"),
    (('name = "res"', 'name = "digits"'), "model 'digits': key 'name'"),
    (('name = "res"\npath = "models/res.onnx"', 'name = "res"'),
     "model 'res': missing key 'path'"),
    (("[gates]", "[gates"), "not valid TOML"),
    (('out_dir = "out"', 'out_dir = "out"\nworkers = 2'), "unknown key 'workers' at the top"),
])
def test_malformed_recipe_exits_2_naming_entry_and_key(recipe: Path, capsys, change,
                                                       named) -> None:
    old, new = change
    assert old in recipe.read_text()
    recipe.write_text(recipe.read_text().replace(old, new, 1))
    code, out, err = run_build(capsys, str(recipe))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and named in err, err
    assert not (recipe.parent / "out").exists()  # nothing was built


def test_recipe_folder_and_missing_recipe(recipe: Path, capsys, monkeypatch) -> None:
    code, out, _ = run_build(capsys, str(recipe.parent), "--jobs", "1")
    assert code == 0 and len(statuses(out)) == 3
    monkeypatch.chdir(recipe.parent / "models")
    code, _, err = run_build(capsys)
    assert code == 2 and "no recipe at onnxopt.toml" in err


def test_missing_ray_is_one_line_naming_the_extra(recipe: Path, capsys, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code, _, err = run_build(capsys, str(recipe), "--ray")
    assert code == 2 and err.strip().count("\n") == 0
    assert "pip install 'onnxopt[ray]'" in err

