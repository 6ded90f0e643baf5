"""The benchmark harness runs end to end (--quick, one tiny model) and writes its three outputs."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import onnxopt

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_table_json_and_png(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # Few rounds and two pipelines keep this a smoke test; no timing is asserted.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--models", "digits",
         "--pipelines", "cleanup,fold-bn", "--rounds", "5", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "digits: latency batch 32" in proc.stderr  # one progress line per step

    results = json.loads((out / "latest.json").read_text())
    machine = results["machine"]
    assert machine["cpu"] and isinstance(machine["vnni"], bool)
    assert machine["onnxruntime"]
    (model,) = results["models"]
    assert model["name"] == "digits" and model["labelled"]
    rows = {r["label"]: r for r in model["rows"]}
    original = rows["original"]
    assert original["params"] > 0 and original["macs"] > 0 and original["file_bytes"] > 0
    assert original["accuracy"] > 0.9 and original["agreement"] == 1.0
    ours = [r for r in model["rows"] if r["kind"] == "onnxopt"]
    assert {r["label"] for r in ours} == {"cleanup", "fold-bn"}
    peers = [r for r in model["rows"] if r["kind"] == "peer"]
    assert any(r["label"].startswith("ort QDQ") for r in peers)
    for row in ours + peers:
        if row["status"].startswith("skipped"):  # an optional peer that is not installed
            continue
        assert not row["status"].startswith("error"), row
        assert min(row["macs_ratio"], row["params_ratio"], row["file_bytes_ratio"]) > 0
        assert 0.0 <= row["agreement"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
        assert row["optimizer"]["wall_s"] > 0 and row["optimizer"]["peak_rss_mb"] is not None
        for batch in ("1", "32"):
            stats = row["latency"][batch]
            assert stats["rounds"] == 5 and stats["ratio"] > 0
            assert stats["ratio_q1"] <= stats["ratio"] <= stats["ratio_q3"]
    # fold-bn removes every BatchNormalization of the digits model: fewer params.
    assert rows["fold-bn"]["params_ratio"] < 1.0
    skipped = {s["label"] for s in results["skipped_pipelines"]}
    missing = {"prune-zero", "quantize", "early-exit"} - set(onnxopt.registered_passes())
    assert missing <= skipped | {"prune -50% + quantize"}

    table = (out / "latest.md").read_text()
    assert "int8 VNNI:" in table and "onnxruntime" in table and "CPU:" in table
    assert "## Headline: digits" in table and "latency b32" in table
    assert "| original |" in table and "| fold-bn |" in table

    png = (out / "accuracy_vs_macs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 200 and height > 200
