"""The ``quantize`` family: int8 QDQ quantization from calibration data, placed for onnxruntime.

The pass is :mod:`.quantize`; its steps, each in its own module:

1. optional cross-layer equalization of the float weights (:mod:`.equalize`);
2. placement: which nodes and tensors get QuantizeLinear/DequantizeLinear (:mod:`.placement`);
3. calibration: streaming statistics of those tensors and a range per parameter group
   (:mod:`.calibration`, :mod:`onnxopt.activations`);
4. rewrite: Q/DQ nodes, int8 weights, int32 biases (:mod:`.rewrite`, :mod:`.scheme`);
5. optional bias correction of each layer's expected output shift (:mod:`.bias_correction`);
6. optional accuracy-aware fallback to float for the most sensitive nodes, and the per-node
   SQNR report (:mod:`.fallback`).

The arithmetic of each step is stated at the top of its module.
"""

from __future__ import annotations

from onnxopt.passes.quantize.quantize import QuantizeOptions, QuantizePass

__all__ = ["QuantizeOptions", "QuantizePass"]
