"""How much does kiln's harness add over a bare loop on each runtime's own API, with the same engine?

Run after `dvc repro` (it reads the engines in artifacts/engines/ and params.yaml):

    python benchmarks/harness_overhead.py [--batch 8] [--rounds 5] [--iters 15]

For each target, kiln's path (load_engine + Session.infer inside kiln's timing loop)
and a bare loop over the runtime's API alternate round by round on the same inputs,
so machine noise hits both alike; the table gives the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from kiln.config.views import ModelSpec, Target, load_params
from kiln.core import paths
from kiln.data.inputs import make_inputs
from kiln.measure.benchmark import BenchmarkSettings, time_infer
from kiln.pipeline.engine import load_engine, read_manifest


def bare_loop(target: Target, engine: Path, feeds: dict[str, np.ndarray]) -> Callable[[], None]:
    """The runtime's own API, as its documentation shows it, on the engine kiln built."""
    threads = target.effective_threads
    if target.runtime == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(engine / "model.optimized.onnx"), so, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, feeds)
    if target.runtime == "openvino":
        import openvino as ov

        manifest = json.loads((engine / "manifest.json").read_text())
        compiled = ov.Core().compile_model(
            str(engine / "model.xml"), target.device.upper(), manifest["compile_config"] | {"INFERENCE_NUM_THREADS": threads}
        )
        request = compiled.create_infer_request()
        return lambda: request.infer(feeds)
    if target.runtime == "torch":
        import torch

        from kiln.export.models import build_model

        torch.set_num_threads(threads)
        spec = ModelSpec.from_params(json.loads((engine / "model.json").read_text())["model"])
        model = build_model(spec)
        model.load_state_dict(torch.load(engine / "state_dict.pt", weights_only=True))
        args = [torch.from_numpy(feeds[i.name]) for i in spec.inputs]

        def run() -> None:
            with torch.inference_mode():
                model(*args)

        return run
    raise SystemExit(f"no bare loop for runtime {target.runtime}")


def bare_times(fn: Callable[[], None], iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--targets", nargs="*", help="default: every target in params.yaml with a built engine")
    args = ap.parse_args()

    params = load_params()
    spec = ModelSpec.from_params(params["model"])
    feeds = make_inputs(spec.inputs, args.batch, seed=7 + args.batch)
    settings = BenchmarkSettings(warmup_iters=0, min_iters=args.iters, min_time_s=0.0, max_iters=args.iters)
    built = [n for n in params["targets"] if (paths.ENGINES / n / "manifest.json").is_file()]
    names = args.targets or [n for n in built if not read_manifest(paths.ENGINES / n).get("skipped")]

    print(f"batch {args.batch}, {args.rounds} alternating rounds of {args.iters} iterations; medians of all iterations\n")
    print("| target | bare API ms/image | kiln ms/image | kiln overhead |")
    print("|---|---:|---:|---:|")
    for name in names:
        target = Target.from_params(name, params)
        session, _ = load_engine(paths.ENGINES / name, target)
        bare = bare_loop(target, paths.ENGINES / name, feeds)
        for _ in range(3):  # warm both paths
            bare()
            session.infer(feeds)
        kiln_ms: list[float] = []
        bare_ms: list[float] = []
        for _ in range(args.rounds):
            bare_ms += bare_times(bare, args.iters)
            kiln_ms += time_infer(session, feeds, settings)
        b, k = statistics.median(bare_ms) / args.batch, statistics.median(kiln_ms) / args.batch
        print(f"| {name} | {b:.3f} | {k:.3f} | {100 * (k / b - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
