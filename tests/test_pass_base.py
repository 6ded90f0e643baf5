"""The pass registry: names, redefinition from ``__main__``, clashes, and reprs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

import onnxopt.pass_base as pb
from onnxopt.pass_base import Pass, PassResult, get_pass, register_pass


@pytest.fixture(autouse=True)
def _own_registry(monkeypatch):
    pb._load_catalog()
    monkeypatch.setattr(pb, "_REGISTRY", dict(pb._REGISTRY))


def _pass_class(name: str, module: str, marker: int) -> type[Pass]:
    """A pass class as ``class X(Pass)`` in ``module`` would define it."""
    def run(self, model, ctx):
        return PassResult(modified=False)

    return type("NotebookPass", (Pass,), {"name": name, "description": "test",
                                          "__module__": module, "marker": marker, "run": run})


def test_redefinition_in_main_replaces_with_a_warning(caplog):
    first = register_pass(_pass_class("nb-pass", "__main__", 1))
    with caplog.at_level(logging.WARNING, logger="onnxopt"):
        second = register_pass(_pass_class("nb-pass", "__main__", 2))
    assert get_pass("nb-pass") is second and second is not first
    assert "'nb-pass' is defined again in __main__" in caplog.text


def test_clash_between_modules_is_an_error():
    register_pass(_pass_class("lib-pass", "some_package.passes", 1))
    with pytest.raises(ValueError, match="already registered by some_package.passes"):
        register_pass(_pass_class("lib-pass", "__main__", 2))
    with pytest.raises(ValueError, match="already registered"):
        register_pass(_pass_class("lib-pass", "other_package", 3))


def test_a_main_pass_cannot_take_a_builtin_name():
    with pytest.raises(ValueError, match="'prune' is already registered by onnxopt.passes"):
        register_pass(_pass_class("prune", "__main__", 1))
    assert get_pass("prune").__module__.startswith("onnxopt.passes")


@dataclass(frozen=True)
class _Opts:
    flag: bool = False
    names: tuple[str, ...] = ()
    limit: float | None = None


def test_repr_is_pipeline_syntax():
    cls = _pass_class("repr-pass", "__main__", 0)
    cls.Options = _Opts
    assert repr(cls(flag=True, names=("a", "b"))) == "repr-pass(flag=true,names=a;b)"
    assert repr(cls()) == "repr-pass"
