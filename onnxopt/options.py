"""Pass options: declared ranges, validation, and their text in pipeline syntax.

A pass's ``Options`` dataclass states what values each field takes where it declares the
field: ``Literal[...]`` types list the choices, and :func:`option` adds a numeric range::

    @dataclass(frozen=True)
    class QuantizeOptions:
        target: float | None = option(None, within="[0, 1]")

:func:`validate_options` checks every field against its declaration; :class:`~onnxopt.Pass`
calls it on construction, so the pipeline parser (``-p "quantize(target=2)"``) and the Python
API refuse the same values with the same message.
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

#: Key of the :class:`OptionSpec` in a dataclass field's metadata.
METADATA_KEY = "onnxopt.option"

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Interval:
    """A numeric range such as ``[0, 1)``; ``inf`` and ``-inf`` are allowed as ends."""

    low: float
    high: float
    low_closed: bool = True
    high_closed: bool = True

    @classmethod
    def parse(cls, text: str) -> Interval:
        """``"[0, 1)"`` -> Interval(0, 1, closed at 0, open at 1).

        Raises:
            ValueError: The text is not an interval.
        """
        match = _INTERVAL.match(text)
        if not match:
            raise ValueError(f"not an interval: {text!r} (write it like '[0, 1)')")
        left, low, high, right = match.groups()
        interval = cls(float(low), float(high), left == "[", right == "]")
        if interval.low > interval.high:
            raise ValueError(f"empty interval: {text!r}")
        return interval

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        low_ok = value >= self.low if self.low_closed else value > self.low
        high_ok = value <= self.high if self.high_closed else value < self.high
        return low_ok and high_ok  # NaN fails both

    def __str__(self) -> str:
        if math.isinf(self.high) and self.low_closed:
            return f">= {_number(self.low)}"
        if math.isinf(self.high):
            return f"> {_number(self.low)}"
        return (f"{'[' if self.low_closed else '('}{_number(self.low)}, "
                f"{_number(self.high)}{']' if self.high_closed else ')'}")


@dataclass(frozen=True)
class OptionSpec:
    """What :func:`option` declares about one field.

    Attributes:
        within: The values a number may take (None: any).
        effective: The value that applies when the field is left at a ``None`` default
            (``prune``'s ``ratio`` is 0.3 unless ``macs`` or ``params`` is given); shown by
            ``--list-passes`` instead of "unset".
    """

    within: Interval | None = None
    effective: Any = None


def option(default: Any = dataclasses.MISSING, *, within: str | None = None,
           effective: Any = None) -> Any:
    """A dataclass field of a pass's ``Options`` with its valid range.

    Args:
        default: The field's default value (immutable, as every default should be).
        within: Interval of valid numbers, e.g. ``"[0, 1]"``, ``"(0, 1]"``, ``"[1, inf)"``.
            ``None`` stays allowed when the field's type allows it.
        effective: The value a ``None`` default stands for, when there is one.

    Returns:
        A ``dataclasses.field`` carrying an :class:`OptionSpec` in its metadata.
    """
    spec = OptionSpec(None if within is None else Interval.parse(within), effective)
    return dataclasses.field(default=default, metadata={METADATA_KEY: spec})


def option_spec(f: dataclasses.Field) -> OptionSpec:
    """The :class:`OptionSpec` of a field (an empty one for plain fields)."""
    return f.metadata.get(METADATA_KEY, OptionSpec())


def choices(hint: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` type (also inside ``X | None``); empty for other types."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return typing.get_args(hint)
    if _is_union(hint):
        return tuple(c for a in typing.get_args(hint) for c in choices(a))
    return ()


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def validate_options(options: Any) -> None:
    """Check every field of an options dataclass against its declared range and choices.

    Raises:
        ValueError: A value outside its range or choices, naming the field and what it takes.
    """
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value is None:
            continue
        allowed = choices(hints.get(f.name))
        if allowed and value not in allowed:
            raise ValueError(f"{f.name} must be one of {'|'.join(map(str, allowed))}, "
                             f"got {option_text(value)}")
        within = option_spec(f).within
        items = value if isinstance(value, (tuple, list)) else (value,)  # a list: each item
        if within is not None and any(v not in within for v in items):
            bound = str(within)
            bound = bound if bound.startswith(">") else f"in {bound}"
            raise ValueError(f"{f.name} must be {bound}, got {option_text(value)}")


def option_text(value: Any) -> str:
    """A value as the pipeline parser reads it: ``true``, ``none``, ``a;b``, ``0.3``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, (tuple, list)):
        return ";".join(option_text(v) for v in value)
    return str(value)


def _number(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:g}" if float(value).is_integer() else repr(float(value))


def _kind(hint: Any, f: dataclasses.Field) -> str:
    """What a field takes, for ``--list-passes``: ``true|false``, ``number in [0, 1)``..."""
    allowed = choices(hint)
    if allowed:
        return "|".join(map(str, allowed))
    members = [a for a in typing.get_args(hint) if a is not type(None)] \
        if _is_union(hint) else [hint]
    base = members[0]
    if typing.get_origin(base) in (tuple, list):
        return "names separated by ';'"
    if base is bool:
        return "true|false"
    within = option_spec(f).within
    noun = {int: "integer", float: "number"}.get(base, "text")
    several = any(typing.get_origin(m) in (tuple, list) for m in members[1:])
    more = ", or several separated by ';'" if several else ""
    if within is None:
        return noun + more
    bound = str(within)
    return (f"{noun} {bound}" if bound.startswith(">") else f"{noun} in {bound}") + more


def describe_options(cls: type, name: str, width: int = 100, indent: int = 4) -> str:
    """The defaults of a pass in pipeline syntax, then what every option takes.

    Example::

        prune(ratio=0.3, criterion=auto, ..., probes=3)
        unset: macs, params, ... (see the pass's documentation for what unset means)
        ratio: number [0, 1); macs: number (0, 1]; criterion: auto|l1|...; ...
    """
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    if not fields:
        return ""
    shown, unset = [], []
    for f in fields:
        default = field_default(f)
        if default is None:
            default = option_spec(f).effective
        if default is None or default == () or default is dataclasses.MISSING:
            unset.append(f.name)
        else:
            shown.append(f"{f.name}={option_text(default)}")
    pad = " " * indent
    wrap = textwrap.TextWrapper(width=width, initial_indent=pad, subsequent_indent=pad + "  ",
                                break_on_hyphens=False)
    lines = [wrap.fill(f"{name}({', '.join(shown)})")]
    if unset:
        lines.append(wrap.fill(f"unset by default: {', '.join(unset)}"))
    # Each "name: kind" stays on one line (no-break spaces while wrapping).
    kinds = "; ".join(f"{f.name}: {_kind(hints[f.name], f)}".replace(" ", "\xa0")
                      for f in fields)
    lines.append(wrap.fill(f"values: {kinds}").replace("\xa0", " "))
    return "\n".join(lines)


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (calling its factory), or ``MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING
