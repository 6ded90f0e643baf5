"""Where the PP-OCRv4 recognizer's int8 error comes from: each part of 8-bit quantization alone.

Usage, from the repository root (inputs from ``benchmarks/corpus/ocr_task.py``)::

    python benchmarks/rec_int8_ablation.py MODELS DATA WORK [--int8 MODEL.onnx ...]

The float model is the recognizer at opset 13 after ``cleanup,fold-bn`` (what ``quantize``
starts from). Each row simulates one part of 8-bit quantization in float (``x -> DQ(Q(x))``
written into the graph, onnxruntime running the rest) and gives the share of the 200
evaluation crops whose CTC-decoded text stays the fp32 model's:

* weights: every Conv weight per output channel, symmetric int8, scale max|w| / 127 (what
  ``quantize`` and ``quantize_static`` do); then the same with each Conv's bias corrected for
  the mean output shift its rounded weights cause, measured layer after layer on the
  calibration crops (each correction seen by the layers after it);
* Conv inputs / Conv outputs: every Conv's input (or output) tensor uint8, one scale per
  tensor from its calibration min and max; an integer Conv kernel needs both; and the inputs
  once more with each crop's own min and max (DynamicQuantizeLinear, batch 1: the best one
  scale per tensor can do without clipping);
* all three together, plain;
* one Conv at a time (weights only): the five that lose the most texts alone.

With ``--int8``: for each int8 model given, how its texts differ from fp32's, and how many of
those differences are leading or trailing spaces only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE / "corpus"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import numpy as np  # noqa: E402
import ocr_task  # noqa: E402
import onnx  # noqa: E402
from ocr_quantize import MODELS, run_all, upgrade  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.ir import to_proto  # noqa: E402
from onnxopt.session import make_session  # noqa: E402


def _run(proto: onnx.ModelProto, x: np.ndarray, names: list[str] | None = None,
         batch: int = 16) -> list[np.ndarray]:
    """``names`` (default: the first output) of ``proto`` on ``x``, in batches."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    have = {o.name for o in model.graph.output}
    for name in names or []:
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = make_session(model)
    wanted = names or [session.get_outputs()[0].name]
    parts = [session.run(wanted, {"x": x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(wanted))]


def _initializers(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def _set(proto: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    _initializers(proto)[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))


def _int8_weight(w: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric int8 rounding of ``w``, back in float."""
    scale = np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).reshape(-1, *[1] * (w.ndim - 1))
    return np.clip(np.round(w / scale), -127, 127) * scale


def _qdq(proto: onnx.ModelProto, tensor: str, low: float | None, high: float | None) -> None:
    """Every reader of ``tensor`` reads it through a uint8 QuantizeLinear/DequantizeLinear
    with the range ``[low, high]``, or through DynamicQuantizeLinear (the range of each run)
    when they are None."""
    s, z, q, dq = (f"{tensor}__{k}" for k in ("s", "z", "q", "dq"))
    if low is None or high is None:
        quantize = helper.make_node("DynamicQuantizeLinear", [tensor], [q, s, z])
    else:
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / 255.0 or 1.0
        zero = int(np.clip(round(-low / scale), 0, 255))
        proto.graph.initializer.extend([
            numpy_helper.from_array(np.array(scale, np.float32), s),
            numpy_helper.from_array(np.array(zero, np.uint8), z)])
        quantize = helper.make_node("QuantizeLinear", [tensor, s, z], [q])
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            if name == tensor:
                node.input[k] = dq
    pair = [quantize, helper.make_node("DequantizeLinear", [q, s, z], [dq])]
    nodes = list(proto.graph.node)
    at = next((i + 1 for i, n in enumerate(nodes) if tensor in n.output), 0)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[:at] + pair + nodes[at:])


class Ablation:
    """The float recognizer, its calibration ranges and the texts to keep."""

    def __init__(self, fp32: Path, data: Path) -> None:
        model, _ = onnxopt.optimize(str(fp32), "cleanup,fold-bn", validate=False)
        self.base = to_proto(model)
        self.chars = ocr_task.characters(fp32)
        self.calib = np.load(data / "rec_calib.npz")["x"]
        self.eval = np.load(data / "rec_eval.npz")["x"]
        self.convs = [n for n in self.base.graph.node if n.op_type == "Conv"]
        self.texts = self.decode(_run(self.base, self.eval)[0])
        names = sorted({t for n in self.convs for t in (n.input[0], n.output[0])})
        values = _run(self.base, self.calib, names)
        self.ranges = {n: (float(v.min()), float(v.max())) for n, v in zip(names, values,
                                                                          strict=True)}

    def decode(self, probs: np.ndarray) -> list[str]:
        return ocr_task.ctc_decode(probs, self.chars)

    def kept(self, proto: onnx.ModelProto, batch: int = 16) -> float:
        """Share of evaluation crops whose text is fp32's."""
        texts = self.decode(_run(proto, self.eval, batch=batch)[0])
        return float(np.mean([a == b for a, b in zip(texts, self.texts, strict=True)]))

    def copy(self) -> onnx.ModelProto:
        proto = onnx.ModelProto()
        proto.CopyFrom(self.base)
        return proto

    def variant(self, *, weights: bool = False, inputs: bool = False, outputs: bool = False,
                only: str | None = None, dynamic: bool = False) -> onnx.ModelProto:
        """The float model with the parts asked for simulated (``dynamic``: activation ranges
        of each run instead of the calibrated ones)."""
        proto = self.copy()
        weights_of = _initializers(proto)
        done: set[str] = set()
        for node in self.convs:
            if only is not None and node.name != only:
                continue
            if weights:
                _set(proto, node.input[1], _int8_weight(
                    numpy_helper.to_array(weights_of[node.input[1]]).astype(np.float64)))
            for wanted, tensor in ((inputs, node.input[0]), (outputs, node.output[0])):
                if wanted and tensor not in done:
                    done.add(tensor)
                    _qdq(proto, tensor, *((None, None) if dynamic else self.ranges[tensor]))
        return proto

    def bias_corrected(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        """Each Conv's bias minus its mean output shift against fp32, Conv after Conv."""
        outputs = [n.output[0] for n in self.convs]
        reference = dict(zip(outputs, (v.mean(axis=(0, 2, 3)) for v in _run(
            self.base, self.calib, outputs)), strict=True))
        for node in self.convs:
            found = _run(proto, self.calib, [node.output[0]])[0].mean(axis=(0, 2, 3))
            bias = numpy_helper.to_array(_initializers(proto)[node.input[2]]).astype(np.float64)
            _set(proto, node.input[2], bias + reference[node.output[0]] - found)
        return proto


def text_differences(ablation: Ablation, path: Path) -> str:
    texts = ablation.decode(run_all(path, ablation.eval))
    changed = [(a, b) for a, b in zip(ablation.texts, texts, strict=True) if a != b]
    outer = sum(a.strip() == b.strip() for a, b in changed)
    return (f"| {path.name} | {1 - len(changed) / len(texts):.3f} | {len(changed)} | "
            f"{outer} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--int8", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = next(iter(sorted(args.models.glob(MODELS["rec"]))))
    fp32 = args.work / "rec_fp32.onnx"
    upgrade(src, fp32)
    ab = Ablation(fp32, args.data)
    rows = [("Conv weights, int8 per channel", ab.variant(weights=True)),
            ("Conv weights, int8 per channel, bias-corrected layer by layer",
             ab.bias_corrected(ab.variant(weights=True))),
            ("Conv inputs, uint8 per tensor (min/max)", ab.variant(inputs=True)),
            ("Conv outputs, uint8 per tensor (min/max)", ab.variant(outputs=True)),
            ("all three, plain", ab.variant(weights=True, inputs=True, outputs=True))]
    print(f"{len(ab.convs)} Convs, {len(ab.calib)} calibration / {len(ab.eval)} evaluation "
          "crops\n\n| simulated in float | texts kept |\n|---|---|")
    for label, proto in rows:
        print(f"| {label} | {ab.kept(proto):.3f} |", flush=True)
    # the best one range per tensor can do: each crop's own min and max (batch 1)
    print(f"| Conv inputs, uint8 per tensor, each crop's own min/max | "
          f"{ab.kept(ab.variant(inputs=True, dynamic=True), batch=1):.3f} |", flush=True)
    alone = sorted((ab.kept(ab.variant(weights=True, only=n.name)), n.name) for n in ab.convs)
    print("\nOne Conv's weights alone, the five worst: " + ", ".join(
        f"{name} {value:.3f}" for value, name in alone[:5]))
    worst = alone[0][1]
    fixed = ab.bias_corrected(ab.variant(weights=True, only=worst))
    print(f"{worst} alone, bias-corrected: {ab.kept(fixed):.3f}")
    if args.int8:
        print("\n| int8 model | texts kept | changed | of them outer spaces only |\n"
              "|---|---|---|---|")
        for path in args.int8:
            print(text_differences(ab, path), flush=True)


if __name__ == "__main__":
    main()
