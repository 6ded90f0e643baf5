"""Exact passes are judged against onnxruntime's own noise; a wrong rewrite is still caught."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import Pass, PassContext, PassResult, optimize
from onnxopt.compare import compare_outputs, runtime_noise
from onnxopt.ir import add_initializer, const_array
from onnxopt.pass_base import Tolerance
from onnxopt.pipeline import parse_pipeline


def test_error_within_the_noise_multiple_passes_and_beyond_it_fails():
    ref = np.linspace(-1.0, 1.0, 50, dtype=np.float32).reshape(5, 10)
    act = ref + np.float32(4e-4)
    tight = Tolerance(rtol=1e-5, atol=1e-6)
    assert not compare_outputs([ref], [act], ["y"], tight)
    within = compare_outputs([ref], [act], ["y"], tight, noise=[1e-4], noise_multiple=8.0)
    assert within and within.noise_floor == pytest.approx(1e-4)
    assert "8x onnxruntime's own noise" in within.summary()
    assert not compare_outputs([ref], [act], ["y"], tight, noise=[1e-4], noise_multiple=2.0)
    assert not compare_outputs([ref], [ref + np.float32(1e-2)], ["y"], tight, noise=[1e-4],
                               noise_multiple=8.0)


def test_runtime_noise_is_the_max_abs_difference_of_float_outputs():
    a = np.array([[1.0, 2.0, np.inf]], np.float32)
    b = np.array([[1.0, 2.5, np.inf]], np.float32)
    ints = np.array([1, 2, 3])
    assert runtime_noise([a, ints], [b, ints + 1]) == [pytest.approx(0.5), 0.0]


@dataclass(frozen=True)
class _BiasOptions:
    relative: float = 1e-3
    which: int = 3


class _BiasOffByAFraction(Pass):
    """Test-only: claims to be exact but moves the largest bias of one Conv by ``relative``."""

    name = "test-bias-off"
    description = "a wrong exact rewrite"
    Options = _BiasOptions
    exact = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        convs = [n for n in model.graph if n.op_type == "Conv" and len(n.inputs) > 2]
        node = convs[self.options.which]
        bias = const_array(node.inputs[2]).copy()
        bias[int(np.argmax(np.abs(bias)))] *= 1 + self.options.relative
        node.replace_input_with(2, add_initializer(model.graph, "bias_off", bias))
        return PassResult(modified=True)


def test_exact_passes_on_the_trained_model_report_the_noise_floor(tmp_path, digits_model,
                                                                  digits_eval):
    report_path = tmp_path / "r.json"
    _, report = optimize(str(digits_model), "cleanup,fold-bn,prune-zero,dead-layers",
                         eval=str(digits_eval))
    assert report.noise_floor is not None and len(report.noise_floor) == 1
    assert 0.0 < report.noise_floor[0] < 1e-3  # BN fusion in onnxruntime rounds differently
    fold = report.records[1]
    assert fold.status.value == "kept"
    assert fold.vs_previous.noise_multiple == 8.0
    assert "8x onnxruntime's own noise" in report.format_table()
    report_path.write_text(report.to_json())
    data = json.loads(report_path.read_text())
    assert data["passes"][1]["vs_previous"]["noise_floor"] == pytest.approx(report.noise_floor[0])


@pytest.mark.parametrize("which", [0, 3, 6])
def test_a_bias_off_by_a_tenth_of_a_percent_is_still_rolled_back(digits_model, digits_eval,
                                                                 which):
    passes = [*parse_pipeline("cleanup,fold-bn"), _BiasOffByAFraction(which=which)]
    _, report = optimize(str(digits_model), passes, eval=str(digits_eval))
    wrong = report.records[-1]
    assert wrong.status.value == "rolled back"
    assert wrong.vs_previous.max_abs_error > 50 * report.noise_floor[0]
    assert "onnxruntime's own noise" in wrong.message
