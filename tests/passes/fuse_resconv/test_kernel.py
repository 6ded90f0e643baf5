"""Tests of the conv kernel geometry helpers: merging parallel kernels and the identity."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.passes.fuse_resconv.kernel import (
    Geometry,
    KernelMismatch,
    add_identity,
    conv_geometry,
    embed_kernel,
    identity_blocker,
    merge_geometry,
)


def _geom(kernel=(3, 3), pads=(1, 1, 1, 1), strides=(1, 1), dilations=(1, 1), group=1,
          cin=4, cout=4) -> Geometry:
    return Geometry(kernel, strides, dilations, tuple(pads[:2]), tuple(pads[2:]), group, cin,
                    cout)


def _conv_node(**attrs: object) -> ir.Node:
    return ir.Node("", "Conv", [ir.Value(name="x"), ir.Value(name="w")],
                   [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()])


def test_asymmetric_and_pointwise_kernels_merge_into_the_centred_3x3() -> None:
    full = _geom()
    row = _geom(kernel=(1, 3), pads=(0, 1, 0, 1))
    point = _geom(kernel=(1, 1), pads=(0, 0, 0, 0))
    assert merge_geometry(full, row) == full
    assert merge_geometry(point, row) == _geom(kernel=(1, 3), pads=(0, 1, 0, 1))
    assert merge_geometry(merge_geometry(point, row), full) == full


@pytest.mark.parametrize("other, message", [
    (_geom(kernel=(1, 1), pads=(1, 1, 1, 1)), "different grids"),
    (_geom(strides=(2, 2)), "different strides"),
    (_geom(group=2), "channels or groups"),
    (_geom(dilations=(2, 2), pads=(2, 2, 2, 2)), "different dilations"),
    (_geom(kernel=(2, 2), pads=(0, 0, 1, 1)), "cannot share a centre"),
])
def test_misaligned_kernels_do_not_merge(other: Geometry, message: str) -> None:
    with pytest.raises(KernelMismatch, match=message):
        merge_geometry(_geom(), other)


def test_embed_pads_around_the_centre() -> None:
    w = np.arange(3.0).reshape(1, 1, 1, 3)
    out = embed_kernel(w, (3, 3))
    assert out.shape == (1, 1, 3, 3) and np.array_equal(out[0, 0, 1], [0.0, 1.0, 2.0])
    assert not out[0, 0, 0].any() and not out[0, 0, 2].any()


@pytest.mark.parametrize("group", [1, 2, 4])
def test_identity_sits_at_each_channels_own_input(group: int) -> None:
    geom = _geom(group=group)
    weight = add_identity(np.zeros((4, 4 // group, 3, 3)), geom, np.array([1.0, 2.0, 3.0, 4.0]))
    for c in range(4):
        assert weight[c, c % (4 // group), 1, 1] == c + 1
    assert weight.sum() == 10.0


def test_identity_conditions() -> None:
    assert identity_blocker(_geom()) is None
    assert identity_blocker(_geom(dilations=(2, 2), pads=(2, 2, 2, 2))) is None
    assert "stride" in identity_blocker(_geom(strides=(2, 2)))
    assert "channel change" in identity_blocker(_geom(cout=8))
    assert "even kernel" in identity_blocker(_geom(kernel=(2, 2), pads=(0, 0, 1, 1)))
    assert "pads" in identity_blocker(_geom(pads=(0, 0, 2, 2)))


def test_geometry_from_auto_pad_and_attributes() -> None:
    node = _conv_node(auto_pad="SAME_UPPER", dilations=[2, 1])
    geom = conv_geometry(node, (4, 4, 3, 1))
    assert (geom.begin, geom.end, geom.dilations) == ((2, 0), (2, 0), (2, 1))
    with pytest.raises(KernelMismatch, match="depends on the input size"):
        conv_geometry(_conv_node(auto_pad="SAME_LOWER", strides=[2, 2]), (4, 4, 3, 3))
    with pytest.raises(KernelMismatch, match="disagrees"):
        conv_geometry(_conv_node(kernel_shape=[5, 5]), (4, 4, 3, 3))
