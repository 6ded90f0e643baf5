"""Wall time of the builds of a sweep: --jobs 1 against --jobs 2 and --ray, side by side.

    python benchmarks/build_bench.py [--rounds 3] [--out benchmarks/results]

Builds the variants of an eight-variant sweep of the bundled digits classifier (the build
phase of ``onnxopt sweep``; the timing phase runs in the driver whatever the executor) under
each executor, interleaved: every round runs each configuration once in a fresh random order,
with ``--jobs 1`` twice (the A/A row: the noise). The ratio is each run's wall time over the
``--jobs 1`` run of the same round; the table shows the median and range over rounds. Ray
is started for each run, as ``onnxopt build --ray`` does, so its start-up is in its time.
Also states how the work divides across a cluster: the independent jobs and the bytes each
ships and returns. Writes build.md and build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import load_average, machine_info  # noqa: E402

from onnxopt.build.build import build  # noqa: E402
from onnxopt.build.executors import make_executor  # noqa: E402
from onnxopt.build.recipe import Entry, Recipe  # noqa: E402
from onnxopt.build.variants import expand_alternatives  # noqa: E402

SPEC = ("fold-bn,quantize(per_channel=true|false,method=minmax|percentile)|"
        "prune(ratio=0.3|0.5,allocation=uniform,sensitivity=false,round_to=8)|cleanup|"
        "dead-layers")
CONFIGS = {"jobs 1": (1, None), "jobs 1 (A/A)": (1, None), "jobs 2": (2, None),
           "ray (local, started per run)": (1, "local")}


def entries(folder: Path, calib: Path, eval_data: Path) -> tuple[Entry, ...]:
    model = ROOT / "testmodels" / "digits_resnet.onnx"
    return tuple(Entry(name=f"v{i}", path=model, pipeline=p, output=folder / f"v{i}.onnx",
                       report=folder / f"v{i}.report.json", calib=str(calib),
                       eval=str(eval_data))
                 for i, p in enumerate(expand_alternatives(SPEC), 1))


def run_once(folder: Path, calib: Path, eval_data: Path, jobs: int, ray: str | None) -> float:
    recipe = Recipe(folder / "recipe.toml", folder, entries(folder, calib, eval_data))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    outcome = build(recipe, make_executor(jobs, ray), force=True, summaries=False)
    seconds = time.perf_counter() - start
    bad = [r for r in outcome.results if r.status not in ("built", "gate missed")]
    if bad:
        raise SystemExit(f"{bad[0].name}: {bad[0].status}: {bad[0].message}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=128,
                        help="calibration and evaluation samples (default 128)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    machine = machine_info()
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {label: [] for label in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        data = {}
        for name in ("calib", "eval"):
            arrays = np.load(ROOT / "testmodels" / f"digits_{name}.npz")
            data[name] = Path(tmp) / f"{name}.npz"
            np.savez(data[name], input=arrays["input"][:args.samples],
                     labels=arrays["labels"][:args.samples])
        run_once(Path(tmp) / "warm-up", data["calib"], data["eval"], 1, None)
        for r in range(args.rounds):
            for index in rng.permutation(len(CONFIGS)):
                label = list(CONFIGS)[index]
                jobs, ray = CONFIGS[label]
                seconds = run_once(Path(tmp) / f"r{r}-{index}", data["calib"], data["eval"],
                                   jobs, ray)
                times[label].append(seconds)
                print(f"round {r + 1}: {label}: {seconds:.1f}s (load {load_average()})",
                      file=sys.stderr, flush=True)
        jobs_list = entries(Path(tmp) / "sizes", data["calib"], data["eval"])
        model_bytes = os.path.getsize(jobs_list[0].path)
        calib_bytes, eval_bytes = (os.path.getsize(data["calib"]),
                                   os.path.getsize(data["eval"]))
        outputs = [os.path.getsize(Path(tmp) / "r0-0" / f"{e.name}.onnx") for e in jobs_list]
    base = np.array(times["jobs 1"])
    rows = []
    for label, values in times.items():
        ratios = np.array(values) / base
        rows.append({"config": label, "seconds": values,
                     "median_s": float(np.median(values)),
                     "ratio_median": float(np.median(ratios)),
                     "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max())})
    result = {"machine": machine, "load_average_end": load_average(), "spec": SPEC,
              "variants": len(jobs_list), "samples": args.samples, "rounds": args.rounds,
              "rows": rows,
              "per_job_bytes": {"model": model_bytes, "calib": calib_bytes, "eval": eval_bytes,
                                "outputs": outputs}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").write_text(json.dumps(result, indent=2))
    (out / "build.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    b = r["per_job_bytes"]
    lines = [
        "# Sweep builds: --jobs 1 against --jobs 2 and --ray", "",
        f"Measured {m['date']} with `python benchmarks/build_bench.py --rounds {r['rounds']}` "
        f"on {m['cpu']} ({m['usable_cpus']} usable CPUs), onnxruntime {m['onnxruntime']}; "
        f"load average {m['load_average_start']} at the start, {r['load_average_end']} at "
        f"the end (other jobs shared the machine).", "",
        f"{r['variants']} variants of the digits ResNet (`{r['spec']}`), {r['samples']} "
        f"calibration and {r['samples']} evaluation samples, every variant rebuilt (`--force`). "
        f"Each round runs every configuration once in a random order; the ratio is the wall "
        f"time over the `--jobs 1` run of the same round (median [min-max] over rounds).", "",
        "| executor | wall time (median) | ratio to --jobs 1 |", "|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['config']} | {row['median_s']:.1f} s | "
                     f"{row['ratio_median']:.2f}x [{row['ratio_min']:.2f}-"
                     f"{row['ratio_max']:.2f}] |")
    total_in = b["model"] + b["calib"] + b["eval"]
    lines += [
        "", "How the work divides on a cluster: the sweep is "
        f"{r['variants']} independent jobs (one per variant; nothing is shared between them "
        f"but their inputs). Each job reads the model ({b['model'] / 1024:.0f} kB), the "
        f"calibration data ({b['calib'] / 1024:.0f} kB) and the evaluation data "
        f"({b['eval'] / 1024:.0f} kB), {total_in / 1024:.0f} kB in all, which the object "
        f"store holds once for all jobs (`--ray-files store`), and sends back its model "
        f"({min(b['outputs']) / 1024:.0f}-{max(b['outputs']) / 1024:.0f} kB) and its report. "
        f"So a cluster runs at most {r['variants']} jobs at a time, and the longest variant "
        f"(a prune with its refit) bounds the wall time; the latency measurement afterwards "
        f"runs in the driver, one model at a time, on purpose.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
