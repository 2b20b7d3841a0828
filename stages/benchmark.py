"""benchmark@<target>: latency per batch size and accuracy against the eager fp32 reference, for one engine."""

import sys

import numpy as np

from kiln import fingerprint, paths
from kiln.atomic import write_json, write_text
from kiln.benchmark import BenchmarkSettings, accuracy_against_reference, benchmark_latency
from kiln.config import ModelSpec, Target, load_params
from kiln.engine import load_engine
from kiln.stage import run_stage

METRIC_KEYS = ("p50_ms", "p90_ms", "p99_ms", "ms_per_image", "images_per_s")
ACCURACY_KEYS = ("max_abs_err", "mean_abs_err", "top1_agreement", "cosine", "sqnr_db")


def main() -> None:
    name = sys.argv[1]
    params = load_params()
    target = Target.from_params(name, params)
    spec = ModelSpec.from_params(params.get("model") or {})
    settings = BenchmarkSettings.from_params(params.get("benchmark"))
    machine = fingerprint.collect()
    session, manifest = load_engine(paths.ENGINES / name, target, machine)

    stats, raw, notes = benchmark_latency(session, spec.inputs, target.profile, settings)
    with np.load(paths.REFERENCE) as ref:
        reference = {k: ref[k] for k in ref.files if k != "__seed__"}
        seed = int(ref["__seed__"])
    accuracy = accuracy_against_reference(session, spec.inputs, reference, seed, chunk=target.profile.opt)

    metrics = {key: {k: round(s[k], 4) for k in METRIC_KEYS} for key, s in stats.items()}
    metrics["accuracy"] = {k: accuracy[k] for k in ACCURACY_KEYS}
    run = {
        "target": name,
        "runtime": target.runtime,
        "precision": manifest["precision"],
        "device": target.device,
        "threads": target.effective_threads,
        "profile": target.profile.to_params(),
        "machine": fingerprint.describe_hardware(machine["hardware"]),
        "versions": manifest["versions"],
        "settings": {**settings.__dict__, "batch_sizes": list(settings.batch_sizes)},
        "latency": stats,
        "times_ms": raw,
        "accuracy": accuracy,
        "notes": notes,
    }
    write_json(paths.RUNS / f"{name}.json", run)
    rows = ["batch,ms_per_image,images_per_s,p50_ms,p99_ms"]
    rows += [f"{k[1:]},{s['ms_per_image']:.4f},{s['images_per_s']:.2f},{s['p50_ms']:.4f},{s['p99_ms']:.4f}" for k, s in stats.items()]
    write_text(paths.PLOTS / f"{name}.csv", "\n".join(rows) + "\n")
    write_json(paths.METRICS / f"{name}.json", metrics)


if __name__ == "__main__":
    run_stage(main)
