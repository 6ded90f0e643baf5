"""How long the passes take on a real model at its real input size, and what they cost.

Three measurements, each printed with the load average (the machine may be shared):

1. A pipeline through the Python API, without validation (the pass's own time)::

       python benchmarks/planner_speed.py MODEL.onnx --input-shape x:1x3x640x640 \
           [--pipeline "cleanup,prune(macs=0.7)"] [--samples 32] [--eval-samples 8] \
           [--profile OUT.prof]

2. ``--cli``: the same pipeline through the command line, validation included, in a child
   process (its wall and CPU time, peak memory, and the CLI's own table)::

       python benchmarks/planner_speed.py MODEL.onnx --input-shape x:1x3x48x320 --cli \
           --pipeline cleanup,fold-bn,prune-zero,dead-layers,fuse-resconv

3. ``--refit-solves``: prune's refit solves at the sizes of the PP-OCRv4 detector's refits
   (384 rows, 97-865 unknowns), side by side: the normal equations with numpy's BLAS threads
   as they are (the old way), with one BLAS thread, and solved in the space of the rows with
   one thread (prune's way now), interleaved in random order for ``--rounds`` rounds after a
   warm-up; each cell is the median ratio to the old way, with an A/A row (the old way
   against itself) for the noise.

In 1., the pipeline runs as given (by default ``cleanup`` first, which makes weights held in
``Constant`` nodes initializers, as the OCR models keep them), with ``--input-shape`` as the
command line would pass it and no validation; the pass of interest is timed by the pass
manager. In 1. and 2., calibration and evaluation data are synthetic text images (lines of
random characters in the default PIL font on light noisy backgrounds, ImageNet-normalised),
drawn with different seeds, so an OCR detector or recognizer sees what it was trained for:
random noise would leave a text detector's output empty and make every metric meaningless.

Printed in 1.: each pass's own time (``PassRecord.seconds``: planning and rewriting, without
the manager's validation), the whole ``optimize`` wall time and CPU time (all threads; on a
loaded machine wall time says little), the process's peak memory, MACs and params before and
after, and the fidelity of the result against the original on the evaluation images: cosine
and SQNR of the first output, and an agreement that suits the output: top-1 along the class
axis (``[N, C]`` or ``[N, T, C]``), or for a one-channel probability map the share of pixels
on the same side of 0.3 (the DB detector's threshold) and the IoU of the two text masks.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx_ir as ir

import onnxopt
from onnxopt.compare import compare_outputs
from onnxopt.cost import model_cost
from onnxopt.data import parse_input_shapes
from onnxopt.ir import to_proto
from onnxopt.session import make_session

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:-"
MAP_THRESHOLD = 0.3


def text_images(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """``[count, 3, height, width]`` normalised images of random text lines."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, height, width), np.float32)
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(150, 256, 3))
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        single = height <= 64  # a recognizer's input: one line filling the height
        for _ in range(1 if single else int(rng.integers(4, 12))):
            if single:
                size = int(rng.integers(height * 5 // 10, height * 8 // 10))
                x, y = int(rng.integers(0, width // 8)), int(rng.integers(0, height - size))
            else:
                size = int(rng.integers(max(8, height // 40), max(12, height // 8)))
                x, y = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height - size))
            text = "".join(rng.choice(list(ALPHABET), int(rng.integers(3, 20))))
            colour = tuple(int(v) for v in rng.integers(0, 110, 3))
            draw.text((x, y), text, fill=colour, font=ImageFont.load_default(size=size))
        array = np.asarray(image, np.float32) / 255.0
        array = array + rng.normal(0.0, 0.02, array.shape).astype(np.float32)
        out[i] = ((array - MEAN) / STD).transpose(2, 0, 1)
    return out


def agreement(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Agreement measures that suit the output's form (see the module docstring)."""
    if reference.ndim == 4 and reference.shape[1] == 1:
        ref, act = reference > MAP_THRESHOLD, actual > MAP_THRESHOLD
        union = np.logical_or(ref, act).sum()
        return {"pixel agreement": float(np.mean(ref == act)),
                "mask IoU": float(np.logical_and(ref, act).sum() / union) if union else 1.0}
    if reference.ndim in (2, 3) and reference.shape[-1] > 1:
        return {"top-1 agreement": float(np.mean(reference.argmax(-1) == actual.argmax(-1)))}
    return {}


def first_output(model: ir.Model | Any, images: np.ndarray, name: str) -> np.ndarray:
    """First output of ``model`` over ``images``, one sample at a time."""
    session = make_session(model)
    return np.concatenate([session.run(None, {name: images[i:i + 1]})[0]
                           for i in range(len(images))])


def load_line() -> str:
    """The 1, 5 and 15 minute load averages and the core count."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"


def run_cli(args: argparse.Namespace) -> int:
    """The pipeline through ``python -m onnxopt`` in a child process, validation included."""
    shapes = parse_input_shapes(args.input_shape)
    name, shape = next(iter(shapes.items()))
    with tempfile.TemporaryDirectory() as tmp:
        calib = os.path.join(tmp, "calib.npz")
        if args.samples:
            np.savez(calib, **{name: text_images(args.samples, shape[2], shape[3], seed=1)})
        command = [sys.executable, "-m", "onnxopt", args.model, "-p", args.pipeline,
                   "-o", os.path.join(tmp, "out.onnx"),
                   *[f"--input-shape={s}" for s in args.input_shape],
                   *(["--calib", calib] if args.samples else [])]
        print("command   ", " ".join(["onnxopt", *command[3:]]))
        print("before    ", load_line())
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(done.stdout.rstrip())
    if done.returncode:
        print(done.stderr.rstrip())
    print(f"cli        exit {done.returncode}, {wall:.1f} s wall, "
          f"{usage.ru_utime + usage.ru_stime:.1f} s CPU, peak RSS {usage.ru_maxrss / 1024:.0f} MB")
    print("after     ", load_line())
    return done.returncode


#: (rows, unknowns, outputs) of prune's refits on the PP-OCRv4 detector's probes (crops of
#: 24 images, 16 positions each; 1x1 and 3x3 convolutions over 96 to 384 inputs, with a bias).
REFIT_SIZES = [(384, 97, 96), (384, 193, 192), (384, 385, 96), (384, 865, 24)]


def refit_solves(rounds: int) -> int:
    """Prune's refit solves side by side: old way, one BLAS thread, row space (see 3.)."""
    from onnxopt.blas import single_blas_thread
    from onnxopt.passes.prune import reconstruct as refit

    rng = np.random.default_rng(0)
    cases = []
    for rows, size, outputs in REFIT_SIZES:
        weight = rng.standard_normal((outputs, size - 1, 1))
        node = SimpleNamespace(graph=None, name="conv", op_type="Conv")
        view = refit.LinearView(node, weight, rng.standard_normal(outputs))  # type: ignore
        view.write = lambda graph, w, b: None  # type: ignore[method-assign]
        design = np.concatenate([rng.standard_normal((rows, size - 1)),
                                 np.ones((rows, 1))], axis=1).astype(np.float32)
        target = rng.standard_normal((rows, outputs)).astype(np.float32)
        cases.append((view, design, target))

    def system(view, design, target):  # what reconstruct has once every row is in
        s = refit._System(0, refit.RefitTarget(view.node, np.arange(target.shape[1])), view,
                          design.shape[1], target.shape[1])
        s.energy = float(np.sum(target.astype(np.float64) ** 2))
        s.rows = s.pending_rows = design.shape[0]
        s.pending = [(design, target)]
        return s

    def normal_equations() -> None:
        for case in cases:
            refit._flush(s := system(*case))
            refit._solve(s, 1e-2)

    def rows_space() -> None:
        for case in cases:
            refit._solve(system(*case), 1e-2)

    variants: dict[str, Callable[[], None]] = {
        "normal equations, BLAS threads as they are (old)": normal_equations,
        "normal equations (A/A)": normal_equations,
        "normal equations, one BLAS thread": single_blas_thread(normal_equations),
        "row space, one BLAS thread (now)": single_blas_thread(rows_space),
    }
    names = list(variants)
    for name in names:  # warm-up
        variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    print("before    ", load_line())
    for _ in range(rounds):
        for name in random.sample(names, len(names)):
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    base = np.array(times[names[0]])
    print(f"refit solves at {REFIT_SIZES} (rows, unknowns, outputs), {rounds} rounds")
    for name in names:
        ratio = np.array(times[name]) / base
        q1, median, q3 = np.percentile(ratio, [25, 50, 75])
        print(f"  {name:50s} {median:6.3f}x  [{q1:.3f}, {q3:.3f}]  "
              f"(median {1e3 * float(np.median(times[name])):.1f} ms)")
    print("after     ", load_line())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?",
                        help="an ONNX model whose first input takes NCHW images")
    parser.add_argument("--input-shape", action="append", default=[],
                        help="NAME:1x3xHxW, as for onnxopt")
    parser.add_argument("--cli", action="store_true",
                        help="run the pipeline through the command line (validation included)")
    parser.add_argument("--refit-solves", action="store_true",
                        help="time prune's refit solves side by side (no model needed)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of --refit-solves")
    parser.add_argument("--pipeline", default="cleanup,prune(macs=0.7)")
    parser.add_argument("--samples", type=int, default=32,
                        help="calibration images (0 with --cli: none, random validation data)")
    parser.add_argument("--eval-samples", type=int, default=8, help="evaluation images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passes")
    parser.add_argument("--profile", help="write a cProfile of optimize() here")
    args = parser.parse_args(argv)
    if args.refit_solves:
        return refit_solves(args.rounds)
    if not args.model or not args.input_shape:
        parser.error("give a MODEL and its --input-shape")
    if args.cli:
        return run_cli(args)

    shapes = parse_input_shapes(args.input_shape)
    name, shape = next(iter(shapes.items()))
    height, width = shape[2], shape[3]
    model = onnxopt.load(args.model)
    reference_proto = to_proto(model)
    before = model_cost(model, shapes)
    calib = {name: text_images(args.samples, height, width, seed=1)}
    images = text_images(args.eval_samples, height, width, seed=2)

    profiler = cProfile.Profile() if args.profile else None
    start, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    result, report = onnxopt.optimize(model, args.pipeline, calib=calib, validate=False,
                                      input_shapes=shapes, seed=args.seed)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    after = model_cost(result, shapes)
    reference = first_output(reference_proto, images, name)
    actual = first_output(result, images, name)
    metrics = compare_outputs([reference], [actual], ["output"]).outputs[0]
    print(f"model      {os.path.basename(args.model)}  input {name}:{'x'.join(map(str, shape))}")
    print(f"pipeline   {args.pipeline}  calibration {args.samples} samples, "
          f"evaluation {args.eval_samples}")
    for record in report.records:
        print(f"pass       {record.name}: {record.status.value}, {record.seconds:.1f} s"
              + (f" ({record.summary})" if record.summary else ""))
        check = record.stats.get("allocation_check")
        if check:
            print("           calibration errors of the plans compared: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in check.items()))
    print(f"optimize   {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak:.0f} MB, "
          f"{load_line()}")
    if before.macs and after.macs:
        print(f"MACs       {before.macs / 1e9:.3f} G -> {after.macs / 1e9:.3f} G "
              f"({after.macs / before.macs:.3f}x)")
    print(f"params     {before.params / 1e6:.3f} M -> {after.params / 1e6:.3f} M "
          f"({after.params / max(before.params, 1):.3f}x)")
    extra = "".join(f", {k} {v:.4f}" for k, v in agreement(reference, actual).items())
    print(f"fidelity   cosine {metrics.cosine:.5f}, SQNR {metrics.sqnr_db:.2f} dB{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
