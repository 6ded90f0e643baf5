"""convert-opset: old opsets upgraded by onnx's version converter, exactly; refusals name the op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.errors import PipelineError
from onnxopt.ir import to_proto
from onnxopt.pipeline import parse_pipeline
from onnxopt.session import run_model
from testmodels.old_opsets import conv_relu_gemm, conv_then_scan8, legacy_ops, with_ml_scaler
from tests.helpers import assert_same_outputs, op_counts, random_feeds


def _convert(proto: onnx.ModelProto, target: int = 13):
    """convert-opset through the manager (validated); returns the model and its record."""
    model, report = onnxopt.optimize(proto, f"convert-opset(target={target})")
    return model, report.records[0]


def _opset(model) -> int:
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("opset", [7, 9, 11, 12])
def test_conv_relu_gemm_upgrades_with_identical_outputs(opset: int) -> None:
    proto = conv_relu_gemm(opset)
    model, record = _convert(proto)
    assert record.status == "kept" and record.exact
    assert record.vs_previous.max_abs_error == 0.0
    assert _opset(model) == 13 and model.ir_version >= 7
    assert op_counts(model) == op_counts(proto)
    assert record.stats["opset_before"] == opset and record.stats["opset_after"] == 13
    assert record.summary == f"opset {opset} -> 13 (onnx version converter)"
    assert_same_outputs(proto, model, random_feeds(proto, batch=3), rtol=0, atol=0)


def test_ops_whose_form_changed_are_rewritten_exactly() -> None:
    proto = legacy_ops()
    model, record = _convert(proto)
    assert record.status == "kept" and record.vs_previous.max_abs_error == 0.0
    ops = op_counts(model)
    assert ops["Upsample"] == 0 and ops["Resize"] == 1
    assert record.stats["ops_removed"] == {"Upsample": 1}
    assert record.stats["ops_added"]["Resize"] == 1
    for node in to_proto(model).graph.node:  # attributes that became inputs in newer opsets
        if node.op_type in ("Slice", "Pad"):
            assert not node.attribute and len(node.input) > 1
    assert_same_outputs(proto, model, random_feeds(proto), rtol=0, atol=0)


def test_other_domains_keep_their_opset_and_nodes() -> None:
    proto = with_ml_scaler(9)
    model, record = _convert(proto)
    assert record.status == "kept"
    assert model.opset_imports == {"": 13, "ai.onnx.ml": 1}
    scaler = next(n for n in model.graph if n.op_type == "Scaler")
    assert scaler.domain == "ai.onnx.ml" and list(scaler.attributes["scale"].value) == [2.0]
    assert_same_outputs(proto, model, random_feeds(proto), rtol=0, atol=0)


def test_refuses_in_one_line_naming_the_op_that_blocks_it() -> None:
    proto = conv_then_scan8()
    model, record = _convert(proto)
    assert record.status == "unchanged"
    assert len(record.refusals) == 1
    reason = record.refusals[0].reason
    assert "\n" not in reason and len(reason) < 240
    assert reason.startswith("cannot convert opset 8 to 13: Scan has no conversion")
    assert _opset(model) == 8 and op_counts(model) == op_counts(proto)
    assert_same_outputs(proto, model, random_feeds(proto), rtol=0, atol=0)


def test_a_model_at_or_above_the_target_is_left_alone() -> None:
    proto = conv_relu_gemm(12)
    model, record = _convert(proto, target=11)
    assert record.status == "unchanged" and not record.refusals
    assert record.summary == "the model already has opset 12 (target 11)"
    assert _opset(model) == 12
    assert_same_outputs(proto, model, random_feeds(proto), rtol=0, atol=0)


@pytest.mark.parametrize("target", ["6", "99", "x"])
def test_a_target_that_is_no_opset_is_a_user_error(target: str) -> None:
    with pytest.raises(PipelineError, match="convert-opset"):
        parse_pipeline(f"convert-opset(target={target})")


def test_cli_upgrades_and_reports(tmp_path, capsys) -> None:
    from onnxopt.cli import main

    src = tmp_path / "old.onnx"
    onnx.save(conv_relu_gemm(9), src)
    out = tmp_path / "new.onnx"
    assert main([str(src), "-p", "convert-opset(target=13)", "-o", str(out)]) == 0
    assert "opset 9 -> 13 (onnx version converter)" in capsys.readouterr().out
    converted = onnx.load(out)
    assert _opset(converted) == 13
    feeds = random_feeds(converted)
    assert np.array_equal(*(run_model(m, feeds)[0] for m in (onnx.load(src), converted)))
