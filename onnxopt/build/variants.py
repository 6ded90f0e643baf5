"""Sweep specs: ``prune(macs=0.3|0.5),quantize|fold-bn`` expanded into plain pipelines.

``|`` separates alternatives: inside an option value (``macs=0.3|0.5``) or between whole
passes of one pipeline step (``quantize|fold-bn``). The variants are the cartesian product
of every step's alternatives, in the order they are written.
"""

from __future__ import annotations

import itertools

from onnxopt.errors import PipelineError, UserError

#: A sweep runs every variant; more than this is almost always a typo.
MAX_VARIANTS = 256


def expand_alternatives(spec: str) -> list[str]:
    """Every pipeline a sweep spec stands for, each checked by the pipeline parser.

    Raises:
        PipelineError: Unbalanced parentheses, an empty alternative, too many variants,
            or a variant the pipeline parser refuses.
    """
    from onnxopt.pipeline import parse_pipeline

    steps = [_step_alternatives(step, spec) for step in _split(spec, ",")]
    count = 1
    for alternatives in steps:
        count *= len(alternatives)
    if count > MAX_VARIANTS:
        raise PipelineError(f"sweep {spec!r} expands to {count} variants (at most "
                            f"{MAX_VARIANTS})")
    variants = []
    for combination in itertools.product(*steps):
        pipeline = ",".join(combination)
        try:
            parse_pipeline(pipeline)
        except UserError as exc:
            raise PipelineError(f"sweep variant {pipeline!r}: {exc}") from None
        if pipeline not in variants:
            variants.append(pipeline)
    return variants


def _step_alternatives(step: str, spec: str) -> list[str]:
    found: list[str] = []
    for alternative in _split(step, "|"):
        name, paren, rest = alternative.partition("(")
        if not paren:
            found.append(alternative)
            continue
        if not rest.endswith(")"):
            raise PipelineError(f"sweep {spec!r}: unbalanced parentheses in {alternative!r}")
        options = [_option_values(option, spec) for option in _split(rest[:-1], ",")]
        for values in itertools.product(*options):
            found.append(f"{name}({','.join(values)})")
    return found


def _option_values(option: str, spec: str) -> list[str]:
    key, eq, values = option.partition("=")
    if not eq:
        return [option]
    choices = [v.strip() for v in values.split("|")]
    if not all(choices):
        raise PipelineError(f"sweep {spec!r}: empty alternative in {option!r}")
    return [f"{key.strip()}={v}" for v in choices]


def _split(text: str, separator: str) -> list[str]:
    """Split at ``separator`` outside parentheses; pieces stripped, empty ones refused."""
    pieces, depth, current = [], 0, []
    for char in text:
        depth += (char == "(") - (char == ")")
        if depth < 0:
            raise PipelineError(f"unbalanced parentheses in {text!r}")
        if char == separator and depth == 0:
            pieces.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth:
        raise PipelineError(f"unbalanced parentheses in {text!r}")
    pieces.append("".join(current).strip())
    if not all(pieces):
        raise PipelineError(f"empty step or alternative in {text!r}")
    return pieces
