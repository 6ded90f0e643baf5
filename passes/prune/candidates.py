"""Which channel groups ``prune`` may shrink, and why the others may not."""

from __future__ import annotations

import fnmatch

from onnxopt.channels import ChannelAnalysis, ChannelGroup
from onnxopt.channels.linear import SEEDS
from onnxopt.channels.tie import Role
from onnxopt.pass_base import PassResult


def excluded_by(group: ChannelGroup, patterns: tuple[str, ...]) -> str | None:
    """The first pattern matching a producer, pass-through node or tensor of the group."""
    names = [t.node.name or "" for t in group.ties if t.tie.role is not Role.CONSUMER]
    names += [m.value.name or "" for m in group.members]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names if n):
            return pattern
    return None


def candidates(analysis: ChannelAnalysis, exclude: tuple[str, ...],
               result: PassResult) -> list[ChannelGroup]:
    """The groups a prune may shrink; every other group with a producer gets a refusal."""
    found = []
    for group in analysis.groups:
        if not group.ties_with_role(Role.PRODUCER):
            # Channels that come from graph inputs or constants, or from a weighted op whose
            # weight is not a constant (its tie froze): say so for the latter.
            if any(t.tie.frozen and t.node.op_type in SEEDS for t in group.ties):
                result.refuse(group.label(), "frozen: " + "; ".join(group.frozen))
            continue
        if not group.prunable:
            result.refuse(group.label(), "frozen: " + "; ".join(group.frozen))
            continue
        pattern = excluded_by(group, exclude)
        if pattern is not None:
            result.refuse(group.label(), f"excluded by {pattern!r}")
        elif group.size > 1 and all(m.channels is not None for m in group.members):
            found.append(group)
    return found


def why_no_groups(result: PassResult) -> str:
    """Why no channel group can be pruned, from the refusals collected while planning."""
    if not result.refusals:
        return ("no channel group starts at a Conv, ConvTranspose, Gemm or MatMul with a "
                "constant weight")
    reasons = list(dict.fromkeys(r.reason for r in result.refusals))
    more = f" (+{len(reasons) - 1} other reasons)" if len(reasons) > 1 else ""
    return f"no prunable group: {len(result.refusals)} refused, e.g. {reasons[0]}{more}"
