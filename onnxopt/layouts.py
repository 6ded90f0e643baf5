"""Where a weighted op keeps its output and input channels in its weight: the one table.

=============  =============================  ===================  ====================
op             weight (input 1)               output channel o     input channel c
=============  =============================  ===================  ====================
Conv           W [Cout, Cin/g, k...]          W[o]                 W[:, c mod Cin/g]
ConvTranspose  W [Cin, Cout/g, k...]          W[:, o mod Cout/g]   W[c]
Gemm           B [K, N], or [N, K] if transB  B[:, o], or B[o]     B[c], or B[:, c]
MatMul         B [..., K, N]                  B[..., o]            B[..., c, :]
=============  =============================  ===================  ====================

With ``g`` groups the channels split in order: group ``j`` makes the outputs
``j*Cout/g ... (j+1)*Cout/g - 1`` from the inputs ``j*Cin/g ... (j+1)*Cin/g - 1``. One of the
two channel axes then holds all channels of its side and the other only one group's share
(``mod`` above): for Conv the input axis, for ConvTranspose the output axis. Conv weight
row ``o`` reads the inputs of group ``o // (Cout/g)``; ConvTranspose row ``c`` writes the
outputs of group ``c // (Cin/g)``.

Gemm also has ``Y = alpha * A' B' + beta * C``: its per-output bias is ``beta * C`` when ``C``
is the same for every row (:func:`gemm_bias`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.ir import attr, is_standard

#: Input index of the weight of every op in the table.
WEIGHT_INPUT = 1


@dataclass(frozen=True)
class WeightLayout:
    """Where the channels of one node's weight are.

    Attributes:
        out_axis: The weight axis indexed by output channel.
        in_axis: The weight axis indexed by input channel.
        group: Channel groups (1 for Gemm and MatMul).
        out_per_group: ``out_axis`` holds one group's outputs (ConvTranspose), else all
            outputs while ``in_axis`` holds one group's inputs (Conv).
        batched: The weight has batch axes in front (MatMul with a weight of rank > 2).
    """

    out_axis: int
    in_axis: int
    group: int = 1
    out_per_group: bool = False
    batched: bool = False

    def out_channels(self, shape: Sequence[int]) -> int:
        """Number of output channels of a weight of this shape."""
        n = int(shape[self.out_axis])
        return n * self.group if self.out_per_group else n

    def in_channels(self, shape: Sequence[int]) -> int:
        """Number of input channels of a weight of this shape."""
        n = int(shape[self.in_axis])
        return n if self.out_per_group else n * self.group

    def _holds_all(self, outputs: bool) -> bool:
        """Whether the output (or input) axis holds every channel of its side."""
        return self.group == 1 or outputs != self.out_per_group

    def _split(self, w: np.ndarray) -> tuple[np.ndarray, int, int]:
        """``w`` with the full channel axis split into ``[group, per group]`` (a view).

        Returns the view, the group axis, and the axis of the per-group channel (the one
        that stays in ``w`` on the other side), both in the view's numbering.
        """
        full = self.in_axis if self.out_per_group else self.out_axis
        shape = w.shape[:full] + (self.group, w.shape[full] // self.group) + w.shape[full + 1:]
        view = w.reshape(shape)
        share = self.out_axis if self.out_per_group else self.in_axis
        return view, full, share + (share > full)

    def _scale(self, w: np.ndarray, s: np.ndarray, outputs: bool, in_place: bool) -> np.ndarray:
        if self._holds_all(outputs):
            target = w
            shape = [1] * w.ndim
            shape[self.out_axis if outputs else self.in_axis] = -1
        else:
            target, group_axis, share_axis = self._split(w)
            shape = [1] * target.ndim
            shape[group_axis], shape[share_axis] = self.group, -1
        factor = s.reshape(shape)
        if in_place:
            if not np.shares_memory(target, w):
                raise ValueError("in-place scaling needs a contiguous weight")
            target *= factor
            return w
        return (target * factor).reshape(w.shape)

    def _rows(self, w: np.ndarray, outputs: bool) -> np.ndarray:
        if self._holds_all(outputs):
            return np.moveaxis(w, self.out_axis if outputs else self.in_axis, 0)
        view, group_axis, share_axis = self._split(w)
        count = self.out_channels(w.shape) if outputs else self.in_channels(w.shape)
        return np.moveaxis(view, (group_axis, share_axis), (0, 1)).reshape((count, -1))

    def scale_outputs(self, w: np.ndarray, s: np.ndarray, *, in_place: bool = False,
                      ) -> np.ndarray:
        """``w`` with every weight that makes output channel ``o`` multiplied by ``s[o]``.

        With ``in_place`` the product is written into ``w`` (which must be writable).
        """
        return self._scale(w, s, True, in_place)

    def scale_inputs(self, w: np.ndarray, s: np.ndarray, *, in_place: bool = False,
                     ) -> np.ndarray:
        """``w`` with every weight that reads input channel ``c`` multiplied by ``s[c]``."""
        return self._scale(w, s, False, in_place)

    def by_output(self, w: np.ndarray) -> np.ndarray:
        """``w`` as ``[Cout, ...]``: row ``o`` holds every weight that makes output ``o``."""
        return self._rows(w, True)

    def by_input(self, w: np.ndarray) -> np.ndarray:
        """``w`` as ``[Cin, ...]``: row ``c`` holds every weight that reads input ``c``."""
        return self._rows(w, False)

    def from_output(self, rows: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`by_output` (row ``o`` back to output channel ``o``).

        Only for layouts whose output axis holds every output (all but grouped
        ConvTranspose), where :meth:`by_output` only moved that axis to the front.
        """
        if not self._holds_all(True):
            raise ValueError("a grouped ConvTranspose weight has no single output axis")
        return np.moveaxis(rows, 0, self.out_axis)

    def out_abs_max(self, w: np.ndarray) -> np.ndarray:
        """``max |w|`` per output channel."""
        return _row_max(self.by_output(np.abs(w)))

    def in_abs_max(self, w: np.ndarray) -> np.ndarray:
        """``max |w|`` per input channel."""
        return _row_max(self.by_input(np.abs(w)))

    def per_channel_axis(self) -> int | None:
        """The axis for one scale per output channel (DequantizeLinear's ``axis``).

        None when no single axis holds every output channel of one linear map: grouped
        ConvTranspose, and batched MatMul weights.
        """
        return self.out_axis if self._holds_all(True) and not self.batched else None


def _row_max(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(rows.shape[0], -1).max(axis=1)


def _group(node: ir.Node) -> int:
    return int(attr(node, "group", 1))


def _matmul(node: ir.Node, ndim: int) -> WeightLayout | None:
    return WeightLayout(ndim - 1, ndim - 2, batched=ndim > 2) if ndim >= 2 else None


#: Op type -> the layout of a node's weight of rank ``ndim`` (None: not a channel layout).
LAYOUTS: dict[str, Callable[[ir.Node, int], WeightLayout | None]] = {
    "Conv": lambda node, ndim: WeightLayout(0, 1, _group(node)),
    "ConvTranspose": lambda node, ndim: WeightLayout(1, 0, _group(node), out_per_group=True),
    "Gemm": lambda node, ndim: (WeightLayout(0, 1) if attr(node, "transB", 0)
                                else WeightLayout(1, 0)),
    "MatMul": _matmul,
}


def weight_layout(node: ir.Node, ndim: int) -> WeightLayout | None:
    """The channel layout of ``node``'s weight (of rank ``ndim``), or None if it has none."""
    rule = LAYOUTS.get(node.op_type) if is_standard(node) else None
    return rule(node, ndim) if rule is not None else None


def gemm_bias(node: ir.Node, c: np.ndarray | None, n: int) -> np.ndarray | str:
    """Gemm's effective bias ``beta * C`` as ``[n]``, or why ``C`` is not per output feature.

    ``C`` may be a scalar, ``[n]``, ``[1, n]`` or ``[1, 1]``; one that varies along the rows
    (``[M, n]``, ``[M, 1]``) is no per-channel bias. A missing ``C`` is zero.
    """
    if c is None:
        return np.zeros(n)
    if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or c.size not in (1, n):
        return f"Gemm bias shape {list(c.shape)} is not per output feature"
    return float(attr(node, "beta", 1.0)) * np.broadcast_to(c.reshape(-1), (n,))
