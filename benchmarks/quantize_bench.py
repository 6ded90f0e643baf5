"""Side by side: our ``quantize`` pass against fp32 and onnxruntime's ``quantize_static``.

Usage, from the repository root::

    python benchmarks/quantize_bench.py [--rounds 15] [--skip-memory]

Four parts, all measured in this one run:

1. Accuracy on the bundled digits classifier (``fold-bn,quantize`` vs ``quantize_static``
   QDQ, MinMax, per-channel, on the same calibration file), with model size and quantize wall
   time of both tools.
2. Speed on the residual classifier scaled to compute-bound size (``residual_blocks``,
   width 64, 64x64 inputs; channels 64 and 128): fp32, ours and the peer's int8 model at
   batch 1 and 32, 2 intra-op threads, warmed up and interleaved in adjacent pairs
   (``latency.measure``); only ratios are printed as results.
3. Equalization: the MobileNetV2-style digits model (``testmodels.mobilenet``) quantized
   per channel, and per tensor with and without equalization and bias correction.
4. Calibration memory: peak RSS growth (``VmHWM`` over the RSS before) of the calibration step
   for 64 and 1024 samples, each in a fresh process, with the samples generated lazily so the
   data itself is not counted (Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # testmodels/ is not installed; it lives beside the package
    sys.path.insert(0, str(ROOT))

import latency  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import peers  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.data import FeedSource  # noqa: E402
from testmodels import DIGITS_CALIB, DIGITS_EVAL, DIGITS_MODEL, residual_blocks  # noqa: E402

PEER = "ort QDQ per-channel U8S8"
SCALED = {"width": 64, "size": 64}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _accuracy(path: str, data: dict[str, np.ndarray]) -> float:
    session = latency.bench_session(path)
    logits = np.concatenate([session.run(None, {"input": data["input"][i:i + 64]})[0]
                             for i in range(0, len(data["input"]), 64)])
    return float(np.mean(logits.argmax(1) == data["labels"]))


def _ours(model: str | onnx.ModelProto, calib: object, out: str, spec: str) -> float:
    start = time.perf_counter()
    quantized, report = onnxopt.optimize(model, spec, calib=calib, validate=False)
    seconds = time.perf_counter() - start
    onnxopt.save(quantized, out)
    failed = [r.name for r in report.failures]
    if failed:
        raise RuntimeError(f"passes failed: {failed}")
    return seconds


def _peer(model_path: str, calib_path: str, out: str) -> float:
    peers.get_peer(PEER).import_modules()
    start = time.perf_counter()
    peers.run_peer(PEER, model_path, out, calib_path)
    return time.perf_counter() - start


def accuracy_part(tmp: str) -> list[dict[str, object]]:
    """Digits: accuracy, size and quantize time of fp32, ours and the peer."""
    evaluation = dict(np.load(DIGITS_EVAL))
    rows = []
    paths = {"fp32": str(DIGITS_MODEL)}
    seconds = {"fp32": 0.0}
    for label, spec in (("ours fold-bn,quantize", "fold-bn,quantize"),
                        ("ours +equalize,bias_correction",
                         "fold-bn,quantize(equalize=true,bias_correction=true)")):
        paths[label] = os.path.join(tmp, f"digits_{len(paths)}.onnx")
        seconds[label] = _ours(str(DIGITS_MODEL), str(DIGITS_CALIB), paths[label], spec)
    paths[PEER] = os.path.join(tmp, "digits_peer.onnx")
    seconds[PEER] = _peer(str(DIGITS_MODEL), str(DIGITS_CALIB), paths[PEER])
    for label, path in paths.items():
        rows.append({"model": label, "accuracy": _accuracy(path, evaluation),
                     "bytes": os.path.getsize(path), "quantize_s": round(seconds[label], 2)})
    return rows


def equalization_part(tmp: str) -> list[dict[str, object]]:
    """MobileNetV2-style model: per-tensor with/without equalization and bias correction."""
    from testmodels.mobilenet import mobilenet_digits

    calib, evaluation = dict(np.load(DIGITS_CALIB)), dict(np.load(DIGITS_EVAL))
    fp32 = os.path.join(tmp, "mobilenet.onnx")
    onnx.save(mobilenet_digits(calib["input"], calib["labels"]), fp32)
    rows = [{"model": "fp32", "accuracy": _accuracy(fp32, evaluation)}]
    for options in ("", "per_channel=false", "per_channel=false,equalize=true",
                    "per_channel=false,bias_correction=true",
                    "per_channel=false,equalize=true,bias_correction=true",
                    "equalize=true,bias_correction=true"):
        out = os.path.join(tmp, f"mobilenet_{len(rows)}.onnx")
        _ours(fp32, str(DIGITS_CALIB), out, f"fold-bn,quantize({options})")
        rows.append({"model": f"quantize({options})", "accuracy": _accuracy(out, evaluation)})
        _log(f"mobilenet: {rows[-1]}")
    return rows


def _random_npz(path: str, samples: int, size: int) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((samples, 3, size, size)).astype(np.float32))
    return path


def speed_part(tmp: str, rounds: int) -> dict[str, dict[str, float]]:
    """Scaled residual classifier: paired latency ratios at batch 1 and 32."""
    fp32 = os.path.join(tmp, "scaled_fp32.onnx")
    folded, _ = onnxopt.optimize(residual_blocks(**SCALED), "fold-bn", validate=False)
    onnxopt.save(folded, fp32)
    calib = _random_npz(os.path.join(tmp, "scaled_calib.npz"), 64, SCALED["size"])
    ours = os.path.join(tmp, "scaled_ours.onnx")
    peer = os.path.join(tmp, "scaled_peer.onnx")
    times = {"ours": _ours(fp32, calib, ours, "quantize"), "peer": _peer(fp32, calib, peer)}
    _log(f"scaled model quantized: ours {times['ours']:.1f}s, peer {times['peer']:.1f}s")
    sessions = {"fp32": latency.bench_session(fp32), "ours": latency.bench_session(ours),
                "peer": latency.bench_session(peer)}
    results = {}
    for batch in (1, 32):
        x = np.random.default_rng(1).standard_normal(
            (batch, 3, SCALED["size"], SCALED["size"])).astype(np.float32)
        stats = latency.measure(sessions, {"input": x}, "fp32", rounds=rounds)
        results[f"batch {batch}"] = {
            "int8 speed-up vs fp32 (fp32 time / ours)": round(1.0 / stats["ours"].ratio, 2),
            "peer speed-up vs fp32": round(1.0 / stats["peer"].ratio, 2),
            "ours vs peer (peer time / ours)": round(stats["peer"].ratio / stats["ours"].ratio,
                                                     2),
        }
        _log(f"batch {batch}: {results[f'batch {batch}']}")
    return results


def _lazy_source(samples: int, size: int) -> FeedSource:
    def chunks():
        rng = np.random.default_rng(0)
        for start in range(0, samples, 32):
            n = min(32, samples - start)
            yield {"input": rng.standard_normal((n, 3, size, size)).astype(np.float32)}, None

    return FeedSource(chunks, f"lazy random:{samples}", samples)


def memory_child(samples: int) -> None:
    """In a fresh process: peak RSS growth (MiB) of calibrating the scaled model."""
    from onnxopt.ir import from_proto
    from onnxopt.passes.quantize.tensor_stats import collect_activation_stats

    model = from_proto(residual_blocks(**SCALED))
    names = [n.outputs[0].name for n in model.graph]
    before = _memory_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    stats = collect_activation_stats(model, _lazy_source(samples, SCALED["size"]), names,
                                     batch_size=8)
    peak = _memory_kib("VmHWM")
    assert all(s.samples == samples for s in stats.values())
    print(json.dumps({"samples": samples, "tensors": len(names),
                      "peak_growth_mib": round((peak - before) / 1024, 1),
                      "seconds": round(time.perf_counter() - start, 1)}))


def _memory_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of this process from ``/proc`` (Linux), in KiB.

    ``getrusage``'s ``ru_maxrss`` is not used: Linux carries it over ``exec`` from the
    parent, so a child started by a big benchmark process would report the parent's peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def memory_part() -> list[dict[str, object]]:
    rows = []
    for samples in (64, 1024):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", str(samples)],
                              capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        _log(f"calibration memory: {rows[-1]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {"accuracy": accuracy_part(tmp)}
        for row in results["accuracy"]:
            _log(f"digits: {row}")
        results["equalization"] = equalization_part(tmp)
        results["speed"] = speed_part(tmp, args.rounds)
    if not args.skip_memory:
        results["calibration_memory"] = memory_part()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
