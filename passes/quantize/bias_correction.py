"""Bias correction: remove the expected output shift each quantized layer adds by itself.

A linear op ``y = W * x + b`` runs quantized as ``y' = W' * x' + b'`` with ``x' = DQ(Q(x))``,
``W' = DQ(Q(W))``. Its expected shift per output channel ``c`` is

    d_c = mean(E[y']_c) - mean(W * E[x] + b)_c

where ``E`` is the mean over the calibration samples and ``mean`` over the positions of channel
``c``. Both ``E[y']`` and ``E[x]`` (the float input as the quantized network produces it) come
from one streaming run of the quantized model; ``W * E[x] + b`` is one float run of the op
alone, exact because the op (with its zero padding) is affine. The int32 bias becomes
``rint((b - d) / (s_x * s_w))``. Measuring ``x`` inside the quantized network isolates each
layer's own error, so a layer does not also correct the shift that upstream layers already
remove (empirical variant of Nagel et al. 2019).

The shifts are measured once (:func:`measure_shifts`) and applied to any later build of the
same model (:func:`apply_shifts`): the fallback measures them on its all-int8 model and
every probe after it, and the model handed back, reuses them, so what a probe scored is
what is built, at the cost of one measurement instead of one per probe.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from onnxopt.data import FeedSource
from onnxopt.ir import opset_version
from onnxopt.passes.quantize.rewrite import BiasSite
from onnxopt.passes.quantize.tensor_stats import collect_activation_stats
from onnxopt.session import make_session

logger = logging.getLogger(__name__)


def _run_alone(sites: list[BiasSite], xs: list[np.ndarray], opset: int) -> list[np.ndarray]:
    """``node(x)`` of each site in float with its original weight and bias, each node on
    its own, all in one session."""
    nodes, inputs, outputs, weights = [], [], [], []
    for k, (site, x) in enumerate(zip(sites, xs, strict=True)):
        node = onnx.NodeProto()
        node.CopyFrom(ir.serde.serialize_node(site.node))
        node.name = f"site{k}"
        del node.input[:]
        del node.output[:]
        node.input.extend([f"x{k}", f"w{k}", f"b{k}"])
        node.output.append(f"y{k}")
        nodes.append(node)
        inputs.append(helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT,
                                                    list(x.shape)))
        outputs.append(helper.make_tensor_value_info(f"y{k}", onnx.TensorProto.FLOAT, None))
        weights += [numpy_helper.from_array(site.weight.astype(np.float32), f"w{k}"),
                    numpy_helper.from_array(site.bias.astype(np.float32), f"b{k}")]
    graph = helper.make_graph(nodes, "alone", inputs, outputs, initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return make_session(model).run(None, {f"x{k}": x.astype(np.float32)
                                          for k, x in enumerate(xs)})


def _channel_mean(sample: np.ndarray) -> np.ndarray:
    """Mean of each channel (axis 0 of one sample) over its other axes."""
    return sample.reshape(sample.shape[0], -1).mean(axis=1)


def measure_shifts(model: ir.Model, sites: list[BiasSite], source: FeedSource, *,
                   batch_size: int, limit: int | None,
                   input_shapes: Mapping[str, tuple[int, ...]] | None,
                   show_progress: bool) -> dict[str, np.ndarray]:
    """Each site's expected output shift per channel in ``model`` (one streaming run).

    Returns:
        Node name (or output name) -> shift ``d`` per output channel.
    """
    usable = [s for s in sites if not (s.node.op_type == "Gemm"
                                       and s.node.attributes.get_int("transA", 0))]
    names = sorted({n for s in usable for n in (s.x_name, s.y_name)})
    if not names:
        return {}
    stats = collect_activation_stats(model, source, names, bins=0, mean_sample=True,
                                     batch_size=batch_size, limit=limit,
                                     input_shapes=input_shapes, show_progress=show_progress)
    measured = [s for s in usable if stats[s.x_name].mean_sample is not None
                and stats[s.y_name].mean_sample is not None]
    if not measured:
        return {}
    references = _run_alone(measured, [stats[s.x_name].mean_sample[None]  # type: ignore[index]
                                       for s in measured], opset_version(model))
    shifts: dict[str, np.ndarray] = {}
    for site, reference in zip(measured, references, strict=True):
        y_mean = stats[site.y_name].mean_sample
        assert y_mean is not None
        shift = _channel_mean(y_mean) - _channel_mean(reference[0].astype(np.float64))
        if shift.shape != site.bias.shape:
            logger.warning("bias correction skipped for %s: shift shape %s, bias %s",
                           site.node.name, shift.shape, site.bias.shape)
            continue
        shifts[_key(site)] = shift
    return shifts


def apply_shifts(sites: list[BiasSite], shifts: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Subtract each site's measured shift from its int32 bias, in place.

    Returns:
        Node name -> mean absolute correction in units of the bias scale.
    """
    corrected: dict[str, float] = {}
    for site in sites:
        shift = shifts.get(_key(site))
        if shift is None or shift.shape != site.bias.shape:
            continue
        scale = np.broadcast_to(site.scale, site.bias.shape).astype(np.float64)
        site.bias = (site.bias.astype(np.float64) - shift).astype(np.float32)
        q = np.clip(np.rint(site.bias / scale), -(2**31 - 1), 2**31 - 1).astype(np.int32)
        site.bias_value.const_value = ir.tensor(q, name=site.bias_value.name)
        corrected[_key(site)] = float(np.mean(np.abs(shift) / scale))
    logger.debug("bias correction adjusted %d biases", len(corrected))
    return corrected


def _key(site: BiasSite) -> str:
    return site.node.name or site.y_name
