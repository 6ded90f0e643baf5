"""Pass options: declared ranges refused in one place, and defaults shown in pipeline syntax."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from onnxopt.errors import PipelineError
from onnxopt.options import Interval, describe_options, option_spec, option_text
from onnxopt.pass_base import get_pass, registered_passes
from onnxopt.pipeline import parse_pipeline


@pytest.mark.parametrize(("text", "inside", "outside"), [
    ("[0, 1]", [0, 0.5, 1], [-0.1, 1.01, float("nan")]),
    ("[0, 1)", [0, 0.99], [1, -1e-9]),
    ("(0, 1]", [1e-9, 1], [0, 2]),
    ("[1, inf)", [1, 10**9], [0, 0.5]),
])
def test_interval_membership(text, inside, outside):
    interval = Interval.parse(text)
    assert all(v in interval for v in inside)
    assert not any(v in interval for v in outside)
    assert True not in interval and "0.5" not in interval  # not numbers


def test_interval_syntax_errors():
    for bad in ("0..1", "[1, 0]", "[a, b]"):
        with pytest.raises(ValueError):
            Interval.parse(bad)


# Values outside what each built-in pass declares, and the message that names the range.
@pytest.mark.parametrize(("spec", "message"), [
    ("quantize(target=2)", "target must be in [0, 1], got 2"),
    ("quantize(target=-0.5)", "target must be in [0, 1]"),
    ("quantize(percentile=0)", "percentile must be in (0, 100]"),
    ("quantize(bins=1)", "bins must be >= 2"),
    ("quantize(calib_samples=0)", "calib_samples must be >= 1"),
    ("quantize(max_float_nodes=-1)", "max_float_nodes must be >= 0"),
    ("prune(ratio=1)", "ratio must be in [0, 1), got 1"),
    ("prune(ratio=nan)", "ratio must be in [0, 1), got nan"),
    ("prune(macs=0)", "macs must be in (0, 1]"),
    ("prune(params=1.5)", "params must be in (0, 1]"),
    ("prune(round_to=0)", "round_to must be >= 1"),
    ("prune(min_channels=0)", "min_channels must be >= 1"),
    ("prune(ridge=-1)", "ridge must be >= 0"),
    ("prune(probes=0)", "probes must be >= 1"),
    ("prune(ratio=0.2,macs=0.5)", "give one budget"),
    ("early-exit(target=0)", "target must be in (0, 1]"),
    ("early-exit(folds=0)", "folds must be >= 1"),
    ("early-exit(l2=-1)", "l2 must be >= 0"),
    ("cleanup(max_fold_elements=-1)", "max_fold_elements must be >= 0"),
])
def test_pipeline_refuses_values_outside_the_declared_range(spec, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        parse_pipeline(spec)


def test_values_at_the_edges_are_accepted():
    for spec in ("quantize(target=0)", "quantize(target=1)", "prune(ratio=0)", "prune(macs=1)",
                 "early-exit(target=1)", "fuse-resconv(threshold=-1)", "quantize(target=none)"):
        parse_pipeline(spec)


def test_python_api_is_validated_the_same_way():
    quantize = get_pass("quantize")
    with pytest.raises(ValueError, match=re.escape("target must be in [0, 1], got 2")):
        quantize(target=2)
    with pytest.raises(ValueError, match="method must be one of minmax"):
        quantize(method="kl")  # a Literal is checked from Python too
    with pytest.raises(ValueError, match="target must be in"):
        quantize(quantize.Options(target=1.5))
    assert quantize(target=0.99).options.target == 0.99


def test_every_bounded_numeric_option_of_the_catalog_declares_its_range():
    """Counts, sizes and fractions state a range; free numbers are listed here on purpose."""
    free = {("fuse-resconv", "threshold")}  # negative disables layer pruning
    numbers = {int, float, int | None, float | None}
    for name, cls in registered_passes().items():
        hints = typing.get_type_hints(cls.Options)
        for f in dataclasses.fields(cls.Options):
            if hints[f.name] in numbers and (name, f.name) not in free:
                assert option_spec(f).within is not None, f"{name}({f.name}=...) has no range"


def test_option_text_is_pipeline_syntax():
    assert option_text(True) == "true" and option_text(False) == "false"
    assert option_text(None) == "none" and option_text(("a", "b")) == "a;b"
    assert option_text(0.3) == "0.3" and option_text(1e-5) == "1e-05" and option_text(16) == "16"


def test_listed_defaults_parse_back_to_the_defaults():
    """Every pass's defaults line is a pipeline spec that builds the pass as it runs by default."""
    for name, cls in registered_passes().items():
        text = describe_options(cls.Options, name, width=10_000)
        if not text:
            continue
        spec = text.splitlines()[0].strip()
        assert spec.startswith(f"{name}(")
        assert not re.search(r"None|True|False|'", spec), spec
        (built,) = parse_pipeline(spec)
        default = cls()
        for f in dataclasses.fields(cls.Options):
            value = getattr(built.options, f.name)
            expected = getattr(default.options, f.name)
            if expected is None and option_spec(f).effective is not None:
                expected = option_spec(f).effective  # prune's ratio 0.3
            assert value == expected, (name, f.name, value, expected)


def test_prune_lists_the_ratio_that_applies():
    text = describe_options(get_pass("prune").Options, "prune", width=10_000)
    assert "prune(ratio=0.3, criterion=auto," in text
    assert "unset by default: macs, params," in text
    assert "ratio: number in [0, 1)" in text and "exclude: names separated by ';'" in text
