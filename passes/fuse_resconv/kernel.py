"""Conv kernel geometry: read it from a node, merge parallel kernels, place an identity.

A conv reads input position ``o * stride - pad_begin + j * dilation`` for tap ``j``. Two
parallel convs over the same input whose outputs are added are one conv when their strides,
groups, channels and dilations agree and their taps lie on the same grid: a kernel of size
``k`` inside one of size ``K`` (``K - k`` even) sits at offset ``(K - k) / 2`` and needs
``pad_begin = P - dilation * (K - k) / 2`` (likewise at the end), so a 1x1 with pad 0 merges
into a 3x3 with pad 1 and a 1x3 with pads (0, 1) into a 3x3 with pads (1, 1).
The identity ``y = x`` is the kernel with 1 at the centre of channel ``c``'s own input,
``W[c, c mod (C / groups), centre] = 1``, which needs stride 1, ``C_in == C_out``, odd kernel
sizes and ``pad = dilation * (k - 1) / 2`` on each side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxopt.ir import attr
from onnxopt.layouts import weight_layout


class KernelMismatch(ValueError):
    """Kernels or geometries that cannot be combined; the message says why."""


@dataclass(frozen=True)
class Geometry:
    """Where a conv kernel reads its input: everything but the weight values.

    Attributes:
        kernel: Spatial kernel size per axis.
        strides: Stride per axis.
        dilations: Dilation per axis (normalized to 1 where the kernel size is 1).
        begin: Padding at the start of each axis.
        end: Padding at the end of each axis.
        group: Group count.
        cin: Input channels.
        cout: Output channels.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    group: int
    cin: int
    cout: int

    @property
    def signature(self) -> tuple:
        """What fixes the output shape for every input: channels, strides and net padding."""
        net = tuple(b + e - d * (k - 1) for b, e, d, k in
                    zip(self.begin, self.end, self.dilations, self.kernel, strict=True))
        return self.cin, self.cout, self.strides, net

    @classmethod
    def pointwise(cls, channels: int, rank: int) -> Geometry:
        """A depthwise 1x1 conv (a per-channel affine map) over ``rank`` spatial axes."""
        ones, zeros = (1,) * rank, (0,) * rank
        return cls(ones, ones, ones, zeros, zeros, channels, channels, channels)

    def attributes(self) -> list[ir.Attr]:
        """The Conv attributes that realise this geometry (explicit pads)."""
        return [
            ir.AttrInt64s("kernel_shape", list(self.kernel)),
            ir.AttrInt64s("strides", list(self.strides)),
            ir.AttrInt64s("dilations", list(self.dilations)),
            ir.AttrInt64s("pads", list(self.begin + self.end)),
            ir.AttrInt64("group", self.group),
        ]


def conv_geometry(node: ir.Node, weight_shape: tuple[int, ...]) -> Geometry:
    """The geometry of Conv ``node`` whose weight has ``weight_shape``.

    Raises:
        KernelMismatch: ``kernel_shape`` disagrees with the weight, or ``auto_pad=SAME_*``
            with a stride above 1 (its padding depends on the input size).
    """
    spatial = tuple(int(k) for k in weight_shape[2:])
    n = len(spatial)
    declared = attr(node, "kernel_shape")
    if declared is not None and tuple(declared) != spatial:
        raise KernelMismatch(f"kernel_shape {tuple(declared)} disagrees with the weight")
    strides = tuple(attr(node, "strides", None) or (1,) * n)
    dils = tuple(attr(node, "dilations", None) or (1,) * n)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):
            raise KernelMismatch(f"auto_pad {auto_pad} with stride {strides} depends on the "
                                 "input size")
        total = [d * (k - 1) for d, k in zip(dils, spatial, strict=True)]
        begin = tuple(t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total)
        end = tuple(t - b for t, b in zip(total, begin, strict=True))
    elif auto_pad == "VALID":
        begin = end = (0,) * n
    else:
        pads = tuple(attr(node, "pads", None) or (0,) * (2 * n))
        begin, end = pads[:n], pads[n:]
    layout = weight_layout(node, len(weight_shape))
    dils = tuple(d if k > 1 else 1 for d, k in zip(dils, spatial, strict=True))
    return Geometry(spatial, strides, dils, begin, end, layout.group,
                    layout.in_channels(weight_shape), layout.out_channels(weight_shape))


def embed_kernel(weight: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``weight`` zero-padded around its centre to spatial ``size`` (``size - k`` even)."""
    pad = [(0, 0), (0, 0)] + [((s - k) // 2,) * 2 for s, k in zip(size, weight.shape[2:],
                                                                    strict=True)]
    return np.pad(weight, pad)


def merge_geometry(a: Geometry, b: Geometry) -> Geometry:
    """The geometry of one conv equal to the sum of parallel convs ``a`` and ``b``.

    Raises:
        KernelMismatch: The strides, channels, groups or dilations differ, a kernel cannot
            be centred in the other, or the paddings put the taps on different grids.
    """
    if a.strides != b.strides:
        raise KernelMismatch(f"branches use different strides {a.strides} and {b.strides}")
    if (a.group, a.cin, a.cout) != (b.group, b.cin, b.cout):
        raise KernelMismatch("branches differ in channels or groups "
                             f"({a.cin}->{a.cout}/{a.group} vs {b.cin}->{b.cout}/{b.group})")
    size, dils, begin, end = [], [], [], []
    for axis, (ka, kb) in enumerate(zip(a.kernel, b.kernel, strict=True)):
        k = max(ka, kb)
        if (k - ka) % 2 or (k - kb) % 2:
            raise KernelMismatch(f"kernels {a.kernel} and {b.kernel} cannot share a centre")
        used = {g.dilations[axis] for g, kk in ((a, ka), (b, kb)) if kk > 1}
        if len(used) > 1:
            raise KernelMismatch(f"branches use different dilations {a.dilations}, "
                                 f"{b.dilations}")
        d = used.pop() if used else 1
        pads = {(g.begin[axis] + d * (k - kk) // 2, g.end[axis] + d * (k - kk) // 2)
                for g, kk in ((a, ka), (b, kb))}
        if len(pads) > 1:
            raise KernelMismatch(f"branch paddings {a.begin + a.end} and {b.begin + b.end} "
                                 "put the taps on different grids")
        ((pb, pe),) = pads
        size.append(k)
        dils.append(d)
        begin.append(pb)
        end.append(pe)
    return Geometry(tuple(size), a.strides, tuple(dils), tuple(begin), tuple(end), a.group,
                    a.cin, a.cout)


def identity_blocker(geom: Geometry) -> str | None:
    """Why the identity cannot be written as a kernel of ``geom``, or None if it can."""
    if any(s != 1 for s in geom.strides):
        return f"stride {geom.strides}: an identity shortcut needs stride 1"
    if geom.cin != geom.cout:
        return (f"channel change {geom.cin} -> {geom.cout}: an identity shortcut needs "
                "equal channels")
    if any(k % 2 == 0 for k in geom.kernel):
        return f"even kernel {geom.kernel} has no centre tap for the identity"
    need = tuple(d * (k - 1) // 2 for d, k in zip(geom.dilations, geom.kernel, strict=True))
    if geom.begin != need or geom.end != need:
        return (f"pads {geom.begin + geom.end} do not keep the size with the input centred "
                f"(kernel {geom.kernel}, dilation {geom.dilations} needs {need} on each side)")
    return None


def add_identity(weight: np.ndarray, geom: Geometry, scale: np.ndarray) -> np.ndarray:
    """``weight`` plus ``scale[c]`` times the identity kernel of ``geom``.

    Args:
        weight: Kernel ``[C, C / groups, *kernel]`` (not modified).
        geom: Its geometry; :func:`identity_blocker` must have returned None.
        scale: Per-output-channel scale of the identity, shape ``[C]`` or scalar.
    """
    out = weight.copy()
    scale = np.broadcast_to(np.asarray(scale, out.dtype), (geom.cout,))
    per_group = geom.cin // geom.group
    channels = np.arange(geom.cout)
    centre = tuple(k // 2 for k in geom.kernel)
    out[(channels, channels % per_group, *centre)] += scale
    return out
