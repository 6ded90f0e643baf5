"""prune-zero: remove channels that are provably zero across their whole channel group.

A consumer (Conv, Gemm, MatMul) computes ``sum_c W[:, c] * x_c``; every other op of a group
treats channels independently. So group channel ``c`` can be removed exactly from every
member (producer filters, BN parameters, residual operands, depthwise convs, concat slots,
flattened blocks, consumer weights) when every consumer reads it as

- exactly 0 (a zero filter and bias, or a BN with ``gamma = beta = 0`` whatever the conv
  produced, carried through Relu, residual Adds of zero channels, pooling, ...), or
- a spatially constant ``k`` and the consumer folds it exactly into its bias
  (``b += k * sum(W[:, c])``): an unpadded Conv or a Gemm.

Channels no consumer reads are dead and go too. Each tensor keeps at least one channel
(a branch that is zero throughout is ``dead-layers``' business). Frozen groups are left
alone and, when they hold such channels, reported with the reasons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.channels import ChannelGroup, Member, analyse_channels
from onnxopt.channels.surgery import remove_channels
from onnxopt.channels.tie import IN0, Role
from onnxopt.channels.values import ChannelConstants, channel_constants
from onnxopt.cost import macs_saved, model_cost
from onnxopt.pass_base import Pass, PassContext, PassResult, register_pass
from onnxopt.report import plural

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneZeroOptions:
    """Options of prune-zero.

    Attributes:
        fold_constants: Also remove nonzero constant channels where folding them into the
            consumer's bias is exact (unpadded Conv, Gemm).
    """

    fold_constants: bool = True


@register_pass
class PruneZeroPass(Pass):
    """Remove provably zero (and exactly foldable constant) channels across channel groups."""

    name = "prune-zero"
    description = "remove channels that are provably zero across their whole channel group"
    Options = PruneZeroOptions
    exact = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        analysis = analyse_channels(model)
        consts = channel_constants(analysis)
        start = model_cost(model, ctx.input_shapes)
        groups, removed, zero, folded = [], 0, 0, 0
        for group in analysis.groups:
            if not group.prunable:
                kept = _zero_positions(group, consts)
                if kept:
                    result.refuse(group.label(), f"{kept} zero channels kept: "
                                  + "; ".join(group.frozen))
                continue
            plan = constant_channels(group, consts, self.options.fold_constants)
            if not plan.channels:
                continue
            before = model_cost(model, ctx.input_shapes)
            removal = remove_channels(model, group, plan.channels, plan.fill)
            after = model_cost(model, ctx.input_shapes)
            groups.append({
                "group": group.index,
                "tensor": group.members[0].label(),
                "removed": plan.channels,
                "zero": len(plan.zero),
                "folded": len(plan.folded),
                "channels_left": group.size,
                "params_saved": before.params - after.params,
                "macs_saved": macs_saved(before, after),
            })
            removed += removal.channels
            zero += len(plan.zero)
            folded += len(plan.folded)
        end = model_cost(model, ctx.input_shapes)
        result.modified = bool(groups)
        result.stats = {
            "channels_removed": removed,
            "zero_channels": zero,
            "folded_channels": folded,
            "groups_pruned": len(groups),
            "groups_frozen": sum(not g.prunable for g in analysis.groups),
            "params_before": start.params,
            "params_after": end.params,
            "params_saved": start.params - end.params,
            "macs_before": start.macs,
            "macs_after": end.macs,
            "macs_saved": macs_saved(start, end),
            "groups": groups,
        }
        logger.info("prune-zero: %s removed in %s, MACs %s -> %s", plural(removed, "channel"),
                    plural(len(groups), "group"), start.macs, end.macs)
        return result


@dataclass
class ConstantChannels:
    """The channels of one group that can be removed exactly.

    Attributes:
        zero: Group channels every consumer reads as exactly 0 (or that nobody reads).
        folded: Group channels some consumer reads as a nonzero constant it can fold.
        fill: Constant value per position of each consumer-read member, for folding.
    """

    zero: list[int] = field(default_factory=list)
    folded: list[int] = field(default_factory=list)
    fill: dict[Member, np.ndarray] = field(default_factory=dict)

    @property
    def channels(self) -> list[int]:
        """All removable channels, sorted."""
        return sorted(self.zero + self.folded)


def _per_channel(group: ChannelGroup, member: Member, flags: np.ndarray) -> np.ndarray:
    """True for group channels whose every position in ``member`` is flagged."""
    result = np.ones(group.size, dtype=bool)
    np.logical_and.at(result, member.channels, flags)
    return result


def constant_channels(group: ChannelGroup, consts: ChannelConstants,
                      fold: bool = True) -> ConstantChannels:
    """Which channels of ``group`` every consumer reads as 0 or as a foldable constant.

    Args:
        group: The group (frozen groups are evaluated too, for the report).
        consts: Channel constants of the model.
        fold: Also accept nonzero constants read by foldable consumers.
    """
    plan = ConstantChannels()
    consumers = group.ties_with_role(Role.CONSUMER)
    if not consumers or any(m.channels is None for m in group.members):
        return plan
    removable = np.ones(group.size, dtype=bool)
    zero = np.ones(group.size, dtype=bool)
    for tie in consumers:
        member = tie.member_at(IN0)
        if member is None or member.is_weight:
            continue
        values = consts.member(member)
        is_zero = _per_channel(group, member, values == 0)
        known = _per_channel(group, member, ~np.isnan(values))
        zero &= is_zero
        removable &= is_zero | (known & (fold and tie.tie.foldable))
        if fold and tie.tie.foldable:
            plan.fill[member] = np.nan_to_num(values)
    _keep_one_per_tensor(group, removable)
    plan.zero = np.flatnonzero(removable & zero).tolist()
    plan.folded = np.flatnonzero(removable & ~zero).tolist()
    return plan


def _keep_one_per_tensor(group: ChannelGroup, removable: np.ndarray) -> None:
    changed = True
    while changed:
        changed = False
        for member in group.members:
            if removable[member.channels].all() and len(member.channels):
                removable[member.channels[0]] = False
                changed = True


def _zero_positions(group: ChannelGroup, consts: ChannelConstants) -> int:
    """Most exactly-zero positions in any tensor of a (frozen) group, for the report."""
    return max((int(np.sum(consts.member(m) == 0)) for m in group.members), default=0)
