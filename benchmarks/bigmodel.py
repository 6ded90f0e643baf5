"""Peak memory of ``onnxopt`` on a generated model whose weights exceed protobuf's 2 GB.

Usage (from the repository root, after ``pip install -e .[bench]``)::

    python benchmarks/bigmodel.py [--layers 4] [--channels 11600] [--keep DIR] [--out DIR]

The model is ``layers`` x ``Conv -> BN`` (``Relu -> Identity`` between) on a ``[N, C, 1, 1]``
input with ``C x C`` 1x1 kernels (default 4 x 538 MB = 2.15 GB of float32 weights), written
straight to an external-data file through ``numpy.memmap``, so generating it never holds a
weight in memory. ``onnxopt MODEL -p cleanup,fold-bn,prune-zero -o OUT`` then runs in a
subprocess (``prune-zero`` is dropped when it is not registered) while this script samples the
resident set size of the process every 10 ms. The figure of merit is peak RSS divided by the
weight size: holding the weights once is 1x; the goal is below 1.5x. ``fold-bn`` replaces every
weight, so an old and a new copy of a tensor could be resident together; ``--layers 2 --channels
16384`` (two 1 GiB tensors) is that worst case. Anonymous memory (RSS minus file-backed pages,
which the kernel can drop under pressure) is reported beside it. Writes ``bigmodel.md`` to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
DATA_NAME = "big.onnx.data"
#: External tensors start on page boundaries so runtimes may memory-map them.
ALIGN = 1 << 16


@dataclass
class Peak:
    """Peak memory of a process tree, sampled."""

    rss: int = 0
    anonymous: int = 0
    samples: int = 0


def _write_weight(data: Path, offset: int, shape: tuple[int, ...], seed: int,
                  scale: float) -> int:
    """Fill ``data[offset:]`` with a random float32 tensor chunk by chunk; returns its bytes."""
    count = int(np.prod(shape))
    target = np.memmap(data, dtype=np.float32, mode="r+", offset=offset, shape=(count,))
    rng = np.random.default_rng(seed)
    step = 1 << 24
    for start in range(0, count, step):
        stop = min(start + step, count)
        target[start:stop] = rng.standard_normal(stop - start, dtype=np.float32) * scale
    target.flush()
    del target
    return count * 4


def build_model(folder: Path, channels: int, layers: int) -> tuple[Path, int]:
    """Write the model and its external data to ``folder``; returns the path and weight bytes."""
    data = folder / DATA_NAME
    shape = (channels, channels, 1, 1)
    size = channels * channels * 4
    padded = -(-size // ALIGN) * ALIGN
    with open(data, "wb") as fh:
        fh.truncate(layers * padded)
    initializers = []
    for i in range(layers):
        offset = i * padded
        _write_weight(data, offset, shape, seed=i, scale=1.0 / np.sqrt(channels))
        tensor = TensorProto(name=f"conv{i}.weight", data_type=TensorProto.FLOAT, dims=shape)
        for key, value in (("location", DATA_NAME), ("offset", offset), ("length", size)):
            tensor.external_data.add(key=key, value=str(value))
        tensor.data_location = TensorProto.EXTERNAL
        initializers.append(tensor)
    rng = np.random.default_rng(7)
    nodes = []
    x = "input"
    for i in range(layers):
        params = {"scale": rng.uniform(0.5, 1.5, channels), "bias": rng.normal(0, 0.1, channels),
                  "mean": rng.normal(0, 0.1, channels), "var": rng.uniform(0.5, 1.5, channels)}
        names = [f"bn{i}.{k}" for k in params]
        initializers += [numpy_helper.from_array(v.astype(np.float32), n)
                         for n, v in zip(names, params.values(), strict=True)]
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"],
                                      kernel_shape=[1, 1], name=f"conv{i}"))
        last = i == layers - 1
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *names],
                                      ["output" if last else f"b{i}"], name=f"bn{i}"))
        if not last:
            nodes += [helper.make_node("Relu", [f"b{i}"], [f"r{i}"]),
                      helper.make_node("Identity", [f"r{i}"], [f"i{i}"])]
            x = f"i{i}"
    dims = ["N", channels, 1, 1]
    graph = helper.make_graph(
        nodes, "bigmodel", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    onnx.save(model, path)
    return path, layers * size


def _layout_of(model: Path) -> tuple[int, int]:
    """(channels, layers) of a model built by :func:`build_model`."""
    proto = onnx.load(model, load_external_data=False)
    channels = proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    return channels, sum(n.op_type == "Conv" for n in proto.graph.node)


def _sample(pid: int, peak: Peak, stop: threading.Event) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            infos = [p.memory_info() for p in procs]
        except psutil.Error:
            break
        rss = sum(i.rss for i in infos)
        anonymous = sum(i.rss - i.shared for i in infos)
        peak.rss, peak.anonymous = max(peak.rss, rss), max(peak.anonymous, anonymous)
        peak.samples += 1
        time.sleep(0.01)


def run_onnxopt(model: Path, pipeline: str, out: Path, report: Path,
                ) -> tuple[int, float, Peak, str]:
    """Run the CLI in a subprocess; returns exit code, seconds, peak memory and stderr."""
    cmd = [sys.executable, "-m", "onnxopt", str(model), "-p", pipeline, "-o", str(out),
           "--report", str(report), "--max-samples", "4", "-q"]
    peak = Peak()
    stop = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=_sample, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    return proc.returncode, time.perf_counter() - start, peak, err


def _pipeline() -> str:
    from onnxopt.pass_base import registered_passes

    names = ["cleanup", "fold-bn", "prune-zero"]
    return ",".join(n for n in names if n in registered_passes())


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass
class Row:
    """One pipeline's run on the big model."""

    pipeline: str
    peak: Peak
    seconds: float
    out_bytes: int
    passes: list[tuple[str, str]]


def _measure(model: Path, pipeline: str, folder: Path) -> Row | str:
    """Run one pipeline; a Row, or the tail of stderr if onnxopt failed."""
    out, report_path = folder / "big.opt.onnx", folder / "report.json"
    print(f"bigmodel: running onnxopt -p {pipeline}", file=sys.stderr)
    code, seconds, peak, err = run_onnxopt(model, pipeline, out, report_path)
    if code != 0:
        return err[-3000:]
    report = json.loads(report_path.read_text())
    data = out.with_name(out.name + ".data")
    out_bytes = out.stat().st_size + (data.stat().st_size if data.exists() else 0)
    for path in (out, data, report_path):
        path.unlink(missing_ok=True)
    return Row(pipeline, peak, seconds, out_bytes,
               [(p["name"], p["status"]) for p in report["passes"]])


def _table(rows: list[Row], weight_bytes: int, layers: int, channels: int) -> str:
    lines = [
        "# Big model round trip: peak memory",
        "",
        f"Generated by `python benchmarks/bigmodel.py` on {platform.node()} "
        f"({psutil.cpu_count()} CPUs, {_gb(psutil.virtual_memory().total)} RAM), "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Model: {layers} x (`Conv -> BN`) with `Relu -> Identity` between, {channels}x"
        f"{channels} 1x1 float32 kernels ({_gb(weight_bytes)} of weights, largest tensor "
        f"{_gb(weight_bytes / layers)}) in external data. Command: "
        f"`onnxopt big.onnx -p PIPELINE -o big.opt.onnx --max-samples 4` (validation on, random "
        f"data), peak resident set size of the process sampled every 10 ms. Target: peak RSS "
        f"below 1.5x the weight size. Anonymous = RSS minus file-backed (memory-mapped) pages.",
        "",
        "| pipeline | peak RSS | **peak RSS / weights** | peak anonymous | output | time | "
        "passes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.pipeline}` | {_gb(r.peak.rss)} | **{r.peak.rss / weight_bytes:.2f}x** | "
            f"{_gb(r.peak.anonymous)} ({r.peak.anonymous / weight_bytes:.2f}x) | "
            f"{_gb(r.out_bytes)} | {r.seconds:.0f} s | "
            + ", ".join(f"{n} {s}" for n, s in r.passes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Generate, optimize, measure, and write ``bigmodel.md``; exit 1 above 1.5x."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=11600,
                        help="C of the C x C kernels (default: 4 x 538 MB = 2.15 GB)")
    parser.add_argument("--layers", type=int, default=4, help="number of Conv+BN layers")
    parser.add_argument("--pipeline", action="append", default=[],
                        help="passes to run, repeatable (default: cleanup,fold-bn,prune-zero "
                        "without those not registered, then cleanup,fold-bn)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for bigmodel.md")
    parser.add_argument("--keep", help="build in this folder and keep the model (a model kept "
                        "there by an earlier run with the same layout is reused)")
    args = parser.parse_args(argv)

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="onnxopt-big-"))
    folder.mkdir(parents=True, exist_ok=True)
    pipelines = args.pipeline or list(dict.fromkeys([_pipeline(), "cleanup,fold-bn"]))
    rows: list[Row] = []
    try:
        t0 = time.perf_counter()
        model = folder / "big.onnx"
        if args.keep and model.exists() and _layout_of(model) == (args.channels, args.layers):
            weight_bytes = args.layers * args.channels * args.channels * 4  # reuse a kept model
        else:
            free = shutil.disk_usage(folder).free
            needed = 3 * 4 * args.layers * args.channels ** 2
            if free < needed:
                print(f"bigmodel: {_gb(needed)} of disk needed, {_gb(free)} free in {folder}",
                      file=sys.stderr)
                return 2
            model, weight_bytes = build_model(folder, args.channels, args.layers)
        print(f"bigmodel: {_gb(weight_bytes)} of weights in {folder} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for pipeline in pipelines:
            row = _measure(model, pipeline, folder)
            if isinstance(row, str):
                print(row, file=sys.stderr)
                return 2
            rows.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    text = _table(rows, weight_bytes, args.layers, args.channels)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bigmodel.md").write_text(text)
    print(text)
    return 0 if all(r.peak.rss < 1.5 * weight_bytes for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
