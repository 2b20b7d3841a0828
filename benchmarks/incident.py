"""The seed's incident on this CPU: an engine benchmarked at batch 32 and served single images without a batcher,
against the same engine behind the batcher kiln recommends for that traffic.

After `dvc repro` of the default pipeline (its engines are used as built):

    python benchmarks/incident.py [--target openvino-int8] [--slo 250] [--seconds 3]

Prints ms/image at batch 32 (what a batch-32 benchmark claims) and at batch 1 closed loop, then under open-loop
traffic of single images: the highest rate within the p99 objective without batching (max_batch 1) and with the
recommended batcher, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="openvino-int8")
    parser.add_argument("--slo", type=float, default=250.0, help="p99 end-to-end objective, ms")
    parser.add_argument("--seconds", type=float, default=3.0, help="per offered rate")
    args = parser.parse_args()
    os.chdir(ROOT)

    from kiln.config.views import Target, load_params
    from kiln.core import paths
    from kiln.data.engine_input import engine_spec
    from kiln.data.inputs import make_inputs
    from kiln.measure.benchmark import BenchmarkSettings, latency_stats, time_infer
    from kiln.pipeline.engine import load_engine
    from kiln.runtimes.fingerprint import collect, describe_hardware
    from kiln.serving import BatcherSettings, feeds_cache, max_rate_at_slo, poisson_arrivals, recommend_profile, run_load, warm_up

    params = load_params()
    spec = engine_spec(params)
    target = Target.from_params(args.target, params)
    session, _ = load_engine(paths.ENGINES / args.target, target)
    settings = BenchmarkSettings(min_time_s=args.seconds, min_iters=10)
    latency = {b: latency_stats(time_infer(session, make_inputs(spec.inputs, b, 7), settings), b) for b in (1, 2, 4, 8, 16, 32)}
    print(
        f"Machine: {describe_hardware(collect()['hardware'])}; target {args.target}; single-image requests; p99 objective {args.slo:g} ms\n"
    )

    singles = {1: 1.0}
    feeds_for = feeds_cache(spec.inputs, 7)

    def best_rate(batcher: BatcherSettings) -> dict:
        warm_up(session, feeds_for, batcher.max_batch)
        hi = 1.5 * max(s["images_per_s"] for b, s in latency.items() if b <= batcher.max_batch)

        def run_at(rate: float):
            arrivals = poisson_arrivals(rate, max(30, int(rate * args.seconds * 1.1)), singles, 7)
            return run_load(session, feeds_for, arrivals, batcher, args.seconds, max_drain_s=args.seconds)

        return max_rate_at_slo(run_at, args.slo, hi / 40, hi, 5)

    plain = best_rate(BatcherSettings(1, 0.0))
    rec = recommend_profile(singles, {b: s["p50_ms"] for b, s in latency.items()}, args.slo, target.profile, args.target)
    batched_settings = BatcherSettings(rec["batcher"]["max_batch"], rec["batcher"]["max_queue_delay_ms"])
    batched = best_rate(batched_settings)

    b32, b1 = latency[32]["ms_per_image"], latency[1]["ms_per_image"]
    served_plain = 1e3 / plain["max_rate"] if plain["max_rate"] else float("inf")
    served_batched = 1e3 / batched["max_rate"] if batched["max_rate"] else float("inf")
    print("| measurement | ms per image | images/s |")
    print("|---|---:|---:|")
    print(f"| benchmark at batch 32 (the profile's max, what a batch-32 benchmark claims) | {b32:.3f} | {1e3 / b32:.1f} |")
    print(f"| benchmark at batch 1, closed loop | {b1:.3f} | {1e3 / b1:.1f} |")
    print(f"| served single images, no batcher: max rate within p99 {args.slo:g} ms | {served_plain:.3f} | {plain['max_rate']:.1f} |")
    print(
        f"| served single images, recommended batcher (max_batch {batched_settings.max_batch}, "
        f"delay {batched_settings.max_queue_delay_ms:.3g} ms): max rate | {served_batched:.3f} | {batched['max_rate']:.1f} |"
    )
    print(f"\nServed without batching / benchmarked at batch 32: {served_plain / b32:.2f}x the time per image")
    print(f"With the recommended batcher / without: {batched['max_rate'] / plain['max_rate']:.2f}x the rate" if plain["max_rate"] else "")
    print(f"Recommended: {rec['why']}\nApply: {rec['override']}")


if __name__ == "__main__":
    main()
