"""Pipeline spec parsing: options, types, lists, and errors with suggestions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

import onnxopt.pass_base as pb
from onnxopt.errors import PipelineError
from onnxopt.pass_base import Pass
from onnxopt.pipeline import describe_options, parse_pipeline


@dataclass(frozen=True)
class _Opts:
    ratio: float = 0.3
    rounds: int = 1
    enabled: bool = True
    criterion: Literal["l1", "l2"] = "l1"
    exclude: tuple[str, ...] = ()
    target: float | None = None


class _Demo(Pass):
    name = "demo-pass"
    description = "parser test"
    Options = _Opts


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(pb._REGISTRY, _Demo.name, _Demo)


def test_options_are_typed():
    (p,) = parse_pipeline("demo-pass(ratio=0.5, rounds=3, enabled=false, criterion=l2, "
                          "exclude=a;b, target=none)")
    assert p.options == _Opts(0.5, 3, False, "l2", ("a", "b"), None)
    # The pass's name in reports is pipeline syntax too: it can be pasted back into -p.
    assert repr(p) == "demo-pass(ratio=0.5,rounds=3,enabled=false,criterion=l2,exclude=a;b)"
    assert repr(parse_pipeline(repr(p))[0]) == repr(p)


def test_several_passes_and_underscore_alias():
    passes = parse_pipeline("cleanup, fold_bn ,demo-pass")
    assert [p.name for p in passes] == ["cleanup", "fold-bn", "demo-pass"]


@pytest.mark.parametrize("spec, message", [
    ("demo-pas", "did you mean 'demo-pass'"),
    ("demo-pass(ratoi=1)", "did you mean 'ratio'"),
    ("demo-pass(ratio=abc)", "expected a number"),
    ("demo-pass(enabled=maybe)", "expected true or false"),
    ("demo-pass(criterion=l3)", "not one of l1, l2"),
    ("demo-pass(ratio=1,ratio=2)", "given twice"),
    ("demo-pass(ratio=1", "unclosed"),
    ("demo-pass(ratio)", "expected key=value"),
    ("", "empty pipeline"),
    ("demo-pass)x", "syntax error"),
])
def test_errors(spec, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(spec)


def test_describe_options():
    text = describe_options(_Demo)
    assert "demo-pass(ratio=0.3, rounds=1, enabled=true, criterion=l1)" in text
    assert "unset by default: exclude, target" in text and "criterion: l1|l2" in text
