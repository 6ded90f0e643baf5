"""Index mappings of ops that move channels between axes: Concat, Split, Slice, reshapes, Transpose.

Each rule returns the :class:`~onnxopt.channels.tie.NodeTie` of one node for the axis it
is asked about (see that module for the slot-index convention):

- Concat on the axis: input ``k`` occupies slots ``offset_k + arange(C_k)`` of the output.
- Split on the axis: the inverse; Slice (step 1): output ``j`` is input ``start + j``.
- Reshape, Flatten, Squeeze, Unsqueeze: the input and output dims are cut into segments of
  equal product. If the asked axis leads its segment and the other side of the segment has one
  non-trivial dim, position ``p`` of that dim belongs to channel ``p // B`` where ``B`` is the
  product of the dims that follow the channel axis in the segment (Flatten into features). The
  reverse (one dim split into several) ties the channel to the leading dim of the split. Any
  other regrouping mixes channels with other axes and freezes, with a dedicated reason for
  the channel shuffle ``Reshape -> Transpose -> Reshape``.
- Transpose: the axis permutation, identity positions.
- Any other axis of these ops is tied by identity when it is untouched.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.channels.tie import (
    IN0,
    OUT0,
    Dim,
    NodeTie,
    Port,
    Role,
    TieEntry,
    dims_of,
    frozen,
    identity,
    norm_axis,
    opset_of,
    positions,
    rank_of,
    size_of,
)
from onnxopt.ir import attr, const_array, consumers

DYNAMIC = "channel count is dynamic"


def concat_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Concat: offsets on the concat axis, identity elsewhere."""
    rank = rank_of(node.outputs[0])
    if rank is None:
        return frozen(node, port, axis, DYNAMIC)
    cat = norm_axis(int(attr(node, "axis", 0)), rank)
    ports = [Port(False, i) for i in range(len(node.inputs))] + [OUT0]
    if axis != cat:
        return identity(node, [(p, axis) for p in ports])
    entries, offset = [], 0
    for i, value in enumerate(node.inputs):
        n = size_of(value, cat)
        if n is None:
            return frozen(node, port, axis, DYNAMIC)
        entries.append(TieEntry(Port(False, i), cat, offset + np.arange(n)))
        offset += n
    entries.append(TieEntry(OUT0, cat, np.arange(offset)))
    return NodeTie(node, Role.THROUGH, tuple(entries))


def split_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Split: each output is a contiguous range of the input on the split axis."""
    rank = rank_of(node.inputs[0])
    if rank is None:
        return frozen(node, port, axis, DYNAMIC)
    cut = norm_axis(int(attr(node, "axis", 0)), rank)
    ports = [IN0] + [Port(True, i) for i in range(len(node.outputs))]
    if axis != cut:
        return identity(node, [(p, axis) for p in ports])
    sizes = [size_of(v, cut) for v in node.outputs]
    total = size_of(node.inputs[0], cut)
    if total is None or None in sizes or sum(sizes) != total:
        return frozen(node, port, axis, DYNAMIC)
    entries, offset = [TieEntry(IN0, cut, np.arange(total))], 0
    for i, n in enumerate(sizes):
        entries.append(TieEntry(Port(True, i), cut, offset + np.arange(n)))
        offset += n
    return NodeTie(node, Role.THROUGH, tuple(entries))


def slice_bounds(node: ir.Node) -> dict[int, tuple[int, int, int]] | None:
    """``axis -> (start, end, step)`` of a Slice with constant bounds, clamped; None if dynamic."""
    rank = rank_of(node.inputs[0])
    if rank is None:
        return None
    if opset_of(node) < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        axes, steps = attr(node, "axes"), None
    else:
        arrays = []
        for i in range(1, 5):
            value = node.inputs[i] if i < len(node.inputs) else None
            array = None if value is None else const_array(value)
            if value is not None and array is None:
                return None
            arrays.append(array)
        starts, ends, axes, steps = arrays
    if starts is None or ends is None:
        return None
    starts, ends = np.asarray(starts).tolist(), np.asarray(ends).tolist()
    axes = list(range(len(starts))) if axes is None else np.asarray(axes).tolist()
    steps = [1] * len(starts) if steps is None else np.asarray(steps).tolist()
    bounds = {}
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        a = norm_axis(int(a), rank)
        n = size_of(node.inputs[0], a)
        if n is None:
            return None
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        bounds[a] = (min(max(s, 0), n), min(max(e, 0), n), int(st))
    return bounds


def slice_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Slice: with step 1, output position ``j`` is input position ``start + j``."""
    bounds = slice_bounds(node)
    if bounds is None:
        return frozen(node, port, axis, "Slice bounds are computed at run time")
    if axis not in bounds:
        return identity(node, [(IN0, axis), (OUT0, axis)])
    start, end, step = bounds[axis]
    if step != 1:
        return frozen(node, port, axis, f"Slice with step {step} on the channel axis")
    n = size_of(node.inputs[0], axis)
    entries = (TieEntry(IN0, axis, positions(n)),
               TieEntry(OUT0, axis, start + np.arange(max(end - start, 0))))
    return NodeTie(node, Role.THROUGH, entries)


def transpose_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Transpose: output axis ``i`` is input axis ``perm[i]``."""
    rank = rank_of(node.inputs[0])
    if rank is None:
        return frozen(node, port, axis, DYNAMIC)
    perm = list(attr(node, "perm", None) or reversed(range(rank)))
    in_axis = perm[axis] if port.output else axis
    return identity(node, [(IN0, in_axis), (OUT0, perm.index(in_axis))])


# -- reshapes ----------------------------------------------------------------------------------


def _product(dims: Sequence[Dim]) -> Dim:
    if all(isinstance(d, int) for d in dims):
        return math.prod(dims)  # type: ignore[arg-type]
    return dims[0] if len(dims) == 1 else None


def reshape_dims(in_dims: Sequence[Dim], shape: Sequence[int], allowzero: bool = False,
                 ) -> list[Dim]:
    """Output dims of ``Reshape(x, shape)``, resolving ``0`` (copy) and ``-1`` (infer).

    Symbolic input dims survive a ``0`` copy; ``-1`` is resolved when the symbolic dims on
    both sides cancel. Unresolvable dims are None.
    """
    out: list[Dim] = []
    for i, s in enumerate(shape):
        if s == 0 and not allowzero:
            out.append(in_dims[i] if i < len(in_dims) else None)
        else:
            out.append(int(s))
    if -1 in out:
        at = out.index(-1)
        rest = out[:at] + out[at + 1:]
        sym_in = Counter(d for d in in_dims if not isinstance(d, int))
        sym_out = Counter(d for d in rest if not isinstance(d, int))
        known_in = math.prod(d for d in in_dims if isinstance(d, int))
        known_out = math.prod(d for d in rest if isinstance(d, int))
        ok = None not in sym_in and sym_in == sym_out and known_out and known_in % known_out == 0
        out[at] = known_in // known_out if ok else None
    return out


def _segments(a: Sequence[Dim], b: Sequence[Dim]) -> list[tuple[list[int], list[int]]] | None:
    """Cut two dim lists into aligned segments of equal product; size-1 dims join a neighbour."""
    if None in a or None in b or 0 in a or 0 in b:
        return None
    big_a = [i for i, d in enumerate(a) if d != 1]
    big_b = [j for j, d in enumerate(b) if d != 1]
    segs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(big_a) and j < len(big_b):
        da, db = a[big_a[i]], b[big_b[j]]
        if not isinstance(da, int) or not isinstance(db, int):
            if da != db:
                return None
            segs.append(([big_a[i]], [big_b[j]]))
            i, j = i + 1, j + 1
            continue
        seg_a, seg_b = [big_a[i]], [big_b[j]]
        pa, pb = da, db
        i, j = i + 1, j + 1
        while pa != pb:
            side, k, dims, seg = (big_a, i, a, seg_a) if pa < pb else (big_b, j, b, seg_b)
            if k >= len(side) or not isinstance(dims[side[k]], int):
                return None
            seg.append(side[k])
            if pa < pb:
                pa, i = pa * dims[side[k]], i + 1  # type: ignore[operator]
            else:
                pb, j = pb * dims[side[k]], j + 1  # type: ignore[operator]
        segs.append((seg_a, seg_b))
    if i < len(big_a) or j < len(big_b):
        return None
    if not segs:
        return [(list(range(len(a))), list(range(len(b))))]
    for side, dims in ((0, a), (1, b)):
        for k, d in enumerate(dims):
            if d == 1:
                seg = next((s for s in reversed(segs) if s[side][0] < k), segs[0])
                seg[side].append(k)
                seg[side].sort()
    return segs


def is_channel_shuffle(node: ir.Node) -> bool:
    """Whether ``node`` (a Reshape) is one end of a ``Reshape -> Transpose -> Reshape`` chain."""
    for t in consumers(node.outputs[0]):
        if t.op_type == "Transpose" and any(
                r.op_type == "Reshape" for r in consumers(t.outputs[0])):
            return True
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    if producer is not None and producer.op_type == "Transpose":
        before = producer.inputs[0].producer()
        return before is not None and before.op_type == "Reshape"
    return False


def regroup_tie(node: ir.Node, port: Port, axis: int, in_dims: Sequence[Dim] | None,
                out_dims: Sequence[Dim] | None) -> NodeTie:
    """The tie of a reshape-like node from its input and output dims (see module docstring)."""
    segs = None if in_dims is None or out_dims is None else _segments(in_dims, out_dims)
    if segs is None:
        return frozen(node, port, axis, f"{node.op_type} output shape is unknown ({DYNAMIC})")
    side, other = (1, 0) if port.output else (0, 1)
    dims = (in_dims, out_dims)
    seg = next(s for s in segs if axis in s[side])
    mine = [k for k in seg[side] if dims[side][k] != 1]
    theirs = [k for k in seg[other] if dims[other][k] != 1]
    n = dims[side][axis]
    if not isinstance(n, int):
        return frozen(node, port, axis, DYNAMIC)
    before = [k for k in seg[side] if k < axis and dims[side][k] != 1]
    if not before and len(theirs) <= 1:
        block = math.prod(dims[side][k] for k in seg[side] if k > axis)  # type: ignore[misc]
        target = theirs[0] if theirs else seg[other][0]
        m = dims[other][target]
        pairs = ((port, axis, np.arange(n)), (None, target, np.arange(m) // block))
    elif mine == [axis] and len(theirs) > 1:
        target = theirs[0]
        block = math.prod(dims[other][k] for k in seg[other] if k > target)  # type: ignore[misc]
        pairs = ((port, axis, np.arange(n) // block),
                 (None, target, np.arange(dims[other][target])))
    else:
        reason = ("channel shuffle (Reshape->Transpose->Reshape) mixes channels"
                  if node.op_type == "Reshape" and is_channel_shuffle(node)
                  else f"{node.op_type} merges the channel axis with other axes")
        return frozen(node, port, axis, reason)
    other_port = IN0 if port.output else OUT0
    entries = tuple(TieEntry(p or other_port, a, idx) for p, a, idx in pairs)
    return NodeTie(node, Role.THROUGH, entries)


def reshape_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Reshape with a constant target shape."""
    shape = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None:
        return frozen(node, port, axis,
                      f"Reshape to a shape computed at run time ({DYNAMIC})")
    in_dims = dims_of(node.inputs[0])
    out_dims = None
    if in_dims is not None:
        out_dims = reshape_dims(in_dims, shape.tolist(), bool(attr(node, "allowzero", 0)))
        if None in out_dims:
            inferred = dims_of(node.outputs[0])
            out_dims = inferred if inferred is not None and None not in inferred else out_dims
    return regroup_tie(node, port, axis, in_dims, out_dims)


def flatten_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Flatten to ``[prod(d[:k]), prod(d[k:])]``."""
    in_dims = dims_of(node.inputs[0])
    out_dims = None
    if in_dims is not None:
        k = norm_axis(int(attr(node, "axis", 1)), len(in_dims))
        out_dims = [_product(in_dims[:k]) if k else 1, _product(in_dims[k:])]
    return regroup_tie(node, port, axis, in_dims, out_dims)


def squeeze_tie(node: ir.Node, port: Port, axis: int) -> NodeTie:
    """Squeeze and Unsqueeze: only size-1 dims move, so their inferred shapes suffice."""
    return regroup_tie(node, port, axis, dims_of(node.inputs[0]), dims_of(node.outputs[0]))


MAPPING_RULES = {
    "Concat": concat_tie,
    "Split": split_tie,
    "Slice": slice_tie,
    "Transpose": transpose_tie,
    "Reshape": reshape_tie,
    "Flatten": flatten_tie,
    "Squeeze": squeeze_tie,
    "Unsqueeze": squeeze_tie,
}
"""Op type -> tie rule for the index-mapping ops."""
