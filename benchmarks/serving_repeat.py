"""Does the open-loop search give the same answer twice? Runs it twice, back to back, on each built engine.

Run after `dvc repro` (it reads the engines in artifacts/engines/ and params.yaml), on a quiet machine:

    python benchmarks/serving_repeat.py [--targets onnxruntime-int8 ...] [--study quick|deep]

For each target, twice: the closed-loop latency and throughput the benchmark stage measures, then `serve_under_load`
with the same settings (the serving block of params.yaml, or conf/serving/<study>.yaml), each inside a
LoadWatch (other processes' CPU use) and with its own steadiness check. The table gives both max rates, their
ratio (the issue's goal: within 10%), whether each search settled, the engine's closed-loop change over each
search, and whether other work ran beside it. A pair that disagrees on a quiet, steady machine is the search's
noise; one that disagrees with a busy or unsteady run is the machine's.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import yaml

from kiln.config.views import Target, load_params
from kiln.core import paths
from kiln.data.engine_input import engine_spec
from kiln.measure.benchmark import BenchmarkSettings, benchmark_latency, benchmark_throughput
from kiln.measure.machine_load import LoadWatch
from kiln.pipeline.engine import load_engine, read_manifest
from kiln.runtimes import fingerprint
from kiln.serving.run import ServingSettings, serve_under_load

CONF = Path(__file__).resolve().parents[1] / "conf" / "serving"


def serving_settings(params: dict, study: str | None) -> ServingSettings:
    if study is None:
        return ServingSettings.from_params(params.get("serving"))
    raw: dict = {}
    for name in ("default", study):  # deep.yaml names default as its base
        raw.update({k: v for k, v in (yaml.safe_load((CONF / f"{name}.yaml").read_text()) or {}).items() if k != "defaults"})
    return ServingSettings.from_params(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="*", help="default: every target in params.yaml with a built engine and served traffic")
    ap.add_argument("--study", choices=("quick", "deep"), help="the serving settings of this study instead of params.yaml's")
    ap.add_argument("--no-configs", action="store_true", help="leave the configuration search out even where the settings ask for it")
    ap.add_argument("--configs", type=float, metavar="SECONDS", help="search serving configurations too, for this many seconds")
    ap.add_argument("--no-recommended", action="store_true", help="do not search again with the recommended batcher")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    params = load_params()
    spec = engine_spec(params)
    settings = serving_settings(params, {"quick": "default", "deep": "deep", None: None}[args.study])
    if args.no_configs:
        settings = replace(settings, search_configs=False)
    if args.no_recommended:
        settings = replace(settings, measure_recommended=False)
    if args.configs:
        settings = replace(settings, search_configs=True, config_budget_s=args.configs)
    bench = BenchmarkSettings.from_params(params.get("benchmark"))
    built = [n for n in params["targets"] if (paths.ENGINES / n / "manifest.json").is_file()]
    names = args.targets or built
    hardware = fingerprint.describe_hardware(fingerprint.collect()["hardware"])
    print(f"machine: {hardware}")
    print(f"settings: confidence {settings.confidence}, probes {settings.seconds_per_rate}-{settings.max_seconds_per_rate} s, ")
    print(f"          {settings.search_iterations} bisections, objective p99 {settings.slo_ms:g} ms\n")
    print("| target | run 1 requests/s | run 2 requests/s | ratio | settled | closed-loop change | busy beside | seconds |")
    print("|---|---:|---:|---:|---|---|---|---:|")
    for name in names:
        target = Target.from_params(name, params)
        if not target.serve or read_manifest(paths.ENGINES / name).get("skipped"):
            continue
        session, _ = load_engine(paths.ENGINES / name, target)
        runs = []
        for _ in range(2):  # each run as the benchmark stage does it: its own closed-loop figures, then the search
            with LoadWatch() as load:
                latency, _, _ = benchmark_latency(session, spec.inputs, target.profile, bench, progress=False)
                throughput = benchmark_throughput(session, spec.inputs, target.main_batch, bench)
                record = serve_under_load(session, spec.inputs, target, latency, settings, throughput)
            runs.append((record, load))
        (a, la), (b, lb) = runs
        ra, rb = a["max_rate_at_slo"], b["max_rate_at_slo"]
        ratio = max(ra, rb) / min(ra, rb) if min(ra, rb) > 0 else float("inf")
        print(
            f"| {name} | {ra:.4g} | {rb:.4g} | {ratio:.3f} "
            f"| {a['search']['unsettled'] or 'yes'} / {b['search']['unsettled'] or 'yes'} "
            f"| {a['steady']['change']:.2f}x / {b['steady']['change']:.2f}x "
            f"| {'yes' if la.busy else 'no'} / {'yes' if lb.busy else 'no'} | {a['seconds']:.0f} + {b['seconds']:.0f} |",
            flush=True,
        )
        for i, (record, _) in enumerate(runs, 1):
            vs, configs, model = record.get("vs_offline") or {}, record.get("configs"), record["model"]
            print(
                f"    run {i}: queue model {model['max_rate']:.4g} requests/s (the engine's medians alone), measured "
                f"{model['vs_measured']:.2f}x of it; single-image inferences {record['steady'].get('probe_spread', float('nan')):.2f}x "
                f"apart between probes; tried {[(round(r, 2), ok) for r, _, ok in record['search']['tried']]}"
            )
            if vs:
                f = vs["factors"]
                print(
                    f"    run {i}: served {vs['served_images_per_s']:.4g} images/s = {vs['ratio']:.2f}x offline "
                    f"({vs['offline_images_per_s']:.4g}; instances {f['instances']:.2f}, batching {f['batching']:.2f}, "
                    f"busy {f['busy']:.2f})"
                )
            if configs:
                best = next(p for p in configs["points"] if p["chosen"]) if configs["chosen"] else None
                print(
                    f"    run {i}: {len(configs['points'])} configurations in {configs['seconds']:.0f} s ({configs['stopped']}); best "
                    + (
                        f"{best['workers']} workers, max batch {best['max_batch']}, delay {best['max_queue_delay_ms']:g} ms: "
                        f"{best['max_rate']:.4g} requests/s"
                        if best
                        else "none held"
                    )
                    + (f", {configs['vs_offline']['ratio']:.2f}x offline" if configs.get("vs_offline") else "")
                )


if __name__ == "__main__":
    main()
