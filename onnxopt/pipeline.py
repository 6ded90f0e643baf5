"""Parse pipeline specs like ``cleanup,fold-bn,prune(ratio=0.3,criterion=l1)`` into passes."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

from onnxopt.errors import PipelineError
from onnxopt.options import describe_options as options_text
from onnxopt.pass_base import Pass, get_pass, registered_passes

_NAME = re.compile(r"[A-Za-z_][\w\-]*")


def parse_pipeline(spec: str) -> list[Pass]:
    """Turn a pipeline spec into pass instances.

    Grammar: ``item ("," item)*``; ``item = name ["(" key=value ("," key=value)* ")"]``.
    Values are converted to the option's declared type; lists are separated by ``;``.

    Raises:
        PipelineError: Syntax errors, unknown passes or options (with the closest name),
            and values that do not convert.
    """
    items = _split_items(spec)
    if not items:
        raise PipelineError("empty pipeline; give passes like -p cleanup,fold-bn")
    return [_build(name, args) for name, args in items]


def _split_items(spec: str) -> list[tuple[str, dict[str, str]]]:
    items: list[tuple[str, dict[str, str]]] = []
    pos, n = 0, len(spec)
    while pos < n:
        while pos < n and spec[pos] in " ,":
            pos += 1
        if pos >= n:
            break
        match = _NAME.match(spec, pos)
        if not match:
            raise PipelineError(f"pipeline syntax error at column {pos + 1}: "
                                f"expected a pass name in {spec!r}")
        name = match.group(0)
        pos = match.end()
        args: dict[str, str] = {}
        while pos < n and spec[pos] == " ":
            pos += 1
        if pos < n and spec[pos] == "(":
            close = spec.find(")", pos)
            if close < 0:
                raise PipelineError(f"pipeline syntax error: unclosed '(' after {name!r}")
            args = _parse_args(name, spec[pos + 1:close])
            pos = close + 1
        while pos < n and spec[pos] == " ":
            pos += 1
        if pos < n and spec[pos] != ",":
            raise PipelineError(f"pipeline syntax error at column {pos + 1}: expected ',' "
                                f"after {name!r}, got {spec[pos]!r}")
        items.append((name, args))
    return items


def _parse_args(name: str, text: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise PipelineError(f"pipeline syntax error in {name}(...): expected key=value, "
                                f"got {part!r}")
        if key in args:
            raise PipelineError(f"option {key!r} given twice for pass {name!r}")
        args[key] = value
    return args


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _build(name: str, args: dict[str, str]) -> Pass:
    passes = registered_passes()
    if name not in passes:
        alias = name.replace("_", "-")
        if alias not in passes:
            raise PipelineError(f"unknown pass {name!r}{_suggest(name, passes)} "
                                f"(see onnxopt --list-passes)")
        name = alias
    cls = get_pass(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    kwargs: dict[str, Any] = {}
    for key, raw in args.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise PipelineError(f"pass {name!r} has no option {key!r}{_suggest(key, fields)} "
                                f"(options: {known})")
        kwargs[key] = convert_value(raw, hints[key], f"{name}({key}=...)")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"bad options for pass {name!r}: {exc}") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert_value(raw: str, hint: Any, where: str) -> Any:
    """Convert a spec string to the option's type (bool, int, float, str, lists, unions)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null") and len(members) < len(typing.get_args(hint)):
            return None
        errors = []
        for member in members:
            try:
                return convert_value(raw, member, where)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[0] if errors else f"{where}: cannot convert {raw!r}")
    if origin is typing.Literal:
        allowed = [str(a) for a in typing.get_args(hint)]
        if raw not in allowed:
            raise PipelineError(f"{where}: {raw!r} is not one of {', '.join(allowed)}"
                                f"{_suggest(raw, allowed)}")
        return raw
    if origin in (tuple, list):
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else str
        values = [convert_value(v.strip(), inner, where) for v in raw.split(";") if v.strip()]
        return tuple(values) if origin is tuple else values
    if hint is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise PipelineError(f"{where}: expected true or false, got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise PipelineError(f"{where}: expected a number, got {raw!r}") from None
    if hint is str or hint is Any:
        return raw
    raise PipelineError(f"{where}: unsupported option type {hint!r}")


def describe_options(cls: type[Pass]) -> str:
    """A pass's defaults in pipeline syntax and what each option takes (``--list-passes``)."""
    return options_text(cls.Options, cls.name)
