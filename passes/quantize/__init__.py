"""The ``quantize`` family: int8 QDQ quantization from calibration data, placed for onnxruntime.

The pass is :mod:`.quantize`, whose docstring lists its steps and the module of each
(equalize, placement, calibration and ranges, rewrite and scheme, bias_correction,
fallback); :mod:`.cpu` reads the CPU's int8 capabilities.
"""

from __future__ import annotations

from onnxopt.passes.quantize.quantize import QuantizeOptions, QuantizePass

__all__ = ["QuantizeOptions", "QuantizePass"]
