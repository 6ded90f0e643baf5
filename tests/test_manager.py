"""PassManager: rollback of a lying exact pass, lossy metrics, gates, crashes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import Pass, PassContext, PassManager, PassResult, load, optimize
from onnxopt.data import input_specs, random_source
from onnxopt.ir import add_initializer, const_array, to_proto
from onnxopt.report import Status
from testmodels.dynamic import dynamic_hw_macs, dynamic_hw_net
from testmodels.structures import conv_chain


def _first_conv_weight(model: ir.Model) -> ir.Value:
    node = next(n for n in model.graph if n.op_type == "Conv")
    return node.inputs[1]


@dataclass(frozen=True)
class PerturbOptions:
    scale: float = 1.05


class PerturbWeight(Pass):
    """Test-only: scales the first Conv weight but claims to be exact."""

    name = "test-perturb"
    description = "test pass that changes a weight"
    Options = PerturbOptions
    exact = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        weight = _first_conv_weight(model)
        node = next(n for n in model.graph if n.op_type == "Conv")
        new = add_initializer(model.graph, "perturbed", const_array(weight) * self.options.scale)
        node.replace_input_with(1, new)
        return PassResult(modified=True)


class LossyPerturb(PerturbWeight):
    name = "test-lossy-perturb"
    exact = False


class Crash(Pass):
    name = "test-crash"
    description = "test pass that raises"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        model.graph.remove(next(iter(model.graph)), safe=False)
        raise RuntimeError("boom")


class NoOp(Pass):
    name = "test-noop"
    description = "changes nothing"

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return PassResult(modified=False)


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_lying_exact_pass_is_rolled_back_and_saved_model_equals_input(tmp_path):
    original = conv_chain()
    out = tmp_path / "out.onnx"
    model, report = optimize(original, [PerturbWeight()], output=out)
    record = report.records[0]
    assert record.status == Status.ROLLED_BACK
    assert "exact pass changed the outputs" in record.message
    assert record.vs_previous is not None and not record.vs_previous
    assert record.vs_previous.needed_rtol > 1e-4
    saved = onnx.load(out)
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in original.graph.node]
    before, after = _initializers(original), _initializers(saved)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_small_perturbation_inside_tolerance_is_kept():
    _, report = optimize(conv_chain(), [PerturbWeight(scale=1 + 1e-7)])
    assert report.records[0].status == Status.KEPT
    assert report.records[0].vs_previous.passed


def test_lossy_pass_reports_metrics_against_previous_and_original():
    _, report = optimize(conv_chain(), [LossyPerturb(scale=1.2)], eval="random:40")
    record = report.records[0]
    assert record.status == Status.KEPT
    assert not record.exact
    for cmp in (record.vs_previous, record.vs_original):
        assert cmp.max_abs_error > 0
        assert 0.5 < cmp.cosine < 1.0
        assert np.isfinite(cmp.sqnr_db) and cmp.sqnr_db > 0
        assert 0.0 <= cmp.agreement <= 1.0


def test_lossy_pass_with_labels_reports_accuracy():
    model = load(conv_chain())
    specs = input_specs(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, *specs[0].dims[1:])).astype(np.float32)
    labels = rng.integers(0, 10, 24)
    _, report = optimize(model, [LossyPerturb(scale=1.3)], eval={"input": x, "labels": labels})
    assert report.original_accuracy is not None
    assert report.records[0].vs_original.accuracy is not None


def test_gate_missed_rolls_back_and_names_the_pass():
    _, report = optimize(conv_chain(), [LossyPerturb(scale=-1.0)], eval="random:32",
                         min_agreement=0.99)
    record = report.records[0]
    assert record.status == Status.GATE_FAILED
    assert "below --min-agreement 0.99" in record.message
    assert record in report.failures


def test_crashing_pass_keeps_the_model():
    original = conv_chain()
    model, report = optimize(original, [Crash()])
    assert report.records[0].status == Status.CRASHED
    assert "boom" in report.records[0].message
    assert len(to_proto(model).graph.node) == len(original.graph.node)


def test_unmodified_pass_is_not_validated():
    _, report = optimize(conv_chain(), [NoOp()])
    assert report.records[0].status == Status.UNCHANGED
    assert report.records[0].vs_previous is None


def test_no_validate_skips_onnxruntime():
    _, report = optimize(conv_chain(), [PerturbWeight()], validate=False)
    assert report.records[0].status == Status.KEPT
    assert report.validated_samples == 0


def test_instrumentation_hooks_are_called():
    calls = []

    class Hook:
        def before_pass(self, p, m):
            calls.append(("before", p.name))

        def after_pass(self, p, m, r):
            calls.append(("after", r.status))

        def pass_failed(self, p, m, r):
            calls.append(("failed", r.status))

    manager = PassManager([NoOp(), PerturbWeight()], instruments=[Hook()])
    manager.run(load(conv_chain()))
    assert calls == [("before", "test-noop"), ("after", Status.UNCHANGED),
                     ("before", "test-perturb"), ("failed", Status.ROLLED_BACK)]


def test_pass_needing_data_without_calib_is_a_user_error():
    from onnxopt.errors import UserError

    class NeedsData(NoOp):
        needs_data = True

    with pytest.raises(UserError, match="needs calibration data"):
        PassManager([NeedsData()]).run(load(conv_chain()))


def test_random_source_batches_are_bounded():
    model = load(conv_chain())
    specs = input_specs(model)
    batches = list(random_source(specs, 70, seed=1).batches(specs, batch_size=32))
    assert [b[0]["input"].shape[0] for b in batches] == [32, 32, 6]


def test_report_macs_are_at_the_data_shapes_or_unknown() -> None:
    proto = dynamic_hw_net()
    data = {"x": np.random.default_rng(0).standard_normal((3, 3, 48, 64)).astype(np.float32)}
    _, report = optimize(proto, "cleanup", eval=data)
    assert report.original.macs == report.final.macs == dynamic_hw_macs(48, 64)
    _, report = optimize(proto, "cleanup", validate=False)
    assert report.original.macs is None and report.final.macs is None
    table = report.format_table()
    assert "MACs ?: unknown, input x [1, 3, ?, ?] has unknown dims; give --input-shape" in table
    assert '"macs": null' in report.to_json()
