"""The int8 model timed against the float one on this CPU: int8 is not always the faster.

Small models whose activations onnxruntime has no integer kernel for (a HardSigmoid between
every pair of convolutions) spend more on conversions than the integer convolutions save: the
PP-OCR angle classifier runs 2.1x its float model's latency in int8 at batch 1 (one thread),
and ``quantize_static`` is slower still. The pass would hand that model back as "kept",
so it times both, side by side (:func:`onnxopt.timing.side_by_side`: interleaved pairs, an
A/A pair for the noise), on one calibration sample at batch 1 with one thread, and says so
when the int8 model is slower; ``max_latency`` turns that into a refusal.

The number of rounds follows the float model's run time, so the timing takes about
:data:`BUDGET_SECONDS` on a large model and well under a second on a small one; building the
four sessions adds to it (about 15 s on a 548 MB model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import onnx_ir as ir

from onnxopt.errors import DataError
from onnxopt.inputs import input_specs
from onnxopt.ir import to_proto
from onnxopt.pass_base import PassContext
from onnxopt.session import fits_one_proto, make_session
from onnxopt.timing import side_by_side

#: Rough wall-time target of one check.
BUDGET_SECONDS = 4.0
#: A ratio is called slower (or over ``max_latency``) only beyond this margin or the
#: measured A/A noise, whichever is larger.
MIN_MARGIN = 0.05


@dataclass(frozen=True)
class Speed:
    """The int8 model's latency against the float model's.

    Attributes:
        ratio: Median paired ratio int8 / float.
        spread: Half the interquartile range of those ratios.
        noise: How far a ratio moves by noise alone (A/A offset plus spread, at least
            :data:`MIN_MARGIN`).
        float_ms: The float model's median run time.
        rounds: Interleaved rounds timed.
    """

    ratio: float
    spread: float
    noise: float
    float_ms: float
    rounds: int

    def over(self, limit: float) -> bool:
        """Whether the int8 model is slower than ``limit`` times the float one beyond noise."""
        return self.ratio > limit * (1.0 + self.noise)

    def describe(self) -> str:
        """``int8 runs 1.51x the float model's latency (float 2.1 ms; batch 1, 1 thread)``."""
        return (f"int8 runs {self.ratio:.2f}x the float model's latency on this CPU (float "
                f"{self.float_ms:.3g} ms; batch 1, 1 thread, {self.rounds} interleaved pairs, "
                f"noise {self.noise:.2f})")

    def to_dict(self) -> dict[str, float]:
        return {"ratio": round(self.ratio, 3), "spread": round(self.spread, 3),
                "noise": round(self.noise, 3), "float_ms": round(self.float_ms, 4),
                "batch": 1, "threads": 1, "rounds": self.rounds}


def time_against_float(float_model: ir.Model, int8_model: ir.Model,
                       ctx: PassContext) -> Speed | None:
    """Time ``int8_model`` against ``float_model`` on the first calibration sample.

    Returns:
        The comparison, or None when no sample can be fed at batch 1 or the model's
        weights are too large for one serialized copy (over 1.8 GB).
    """
    assert ctx.calib is not None
    specs = input_specs(float_model, ctx.input_shapes)
    try:
        feed, _ = next(iter(ctx.calib.batches(specs, batch_size=1, limit=1)))
    except (StopIteration, DataError):
        return None
    if not fits_one_proto(float_model):  # sessions feed its weights: not timed here
        return None
    # serialized once each: a session of a large model spends most of its set-up there
    original = to_proto(float_model).SerializeToString()
    quantized = to_proto(int8_model).SerializeToString()
    session = make_session(original, threads=1)
    start = time.perf_counter()
    session.run(None, feed)
    session.run(None, feed)
    per_run = (time.perf_counter() - start) / 2
    # four samples per round (float, A/A, float, int8), at least one run each
    rounds = int(min(15, max(5, BUDGET_SECONDS / max(4 * max(per_run, 0.002), 1e-9))))
    timed = side_by_side(original, [quantized], feed, threads=1, rounds=rounds,
                         sample_seconds=0.002, min_runs=1 if per_run > 0.01 else 3)
    noise = max(MIN_MARGIN, timed.noise)
    return Speed(timed.ratios[0], timed.spreads[0], noise, timed.baseline_ms, rounds)
