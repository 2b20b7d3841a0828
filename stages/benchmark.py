"""benchmark@<target>: latency per batch size and accuracy against the eager fp32 reference, for one engine."""

import logging
import sys

from kiln import fingerprint, paths
from kiln.atomic import write_json, write_text
from kiln.benchmark import (
    BenchmarkSettings,
    accuracy_against_reference,
    benchmark_latency,
    benchmark_served,
    budget_violations,
    headline_metrics,
    profile_mismatch,
)
from kiln.config import Target, load_stage_params, served_spec
from kiln.engine import load_engine, read_manifest
from kiln.errors import KilnError
from kiln.stage import run_stage
from kiln.validate import load_reference


def main() -> None:
    name = sys.argv[1]
    params = load_stage_params("benchmark", name)
    target = Target.from_params(name, params)
    spec = served_spec(params)
    settings = BenchmarkSettings.from_params(params.get("benchmark"))
    machine = fingerprint.collect()
    if skipped := read_manifest(paths.ENGINES / name).get("skipped"):
        logging.getLogger("kiln.benchmark").warning("%s skipped on this machine: %s", name, skipped)
        write_outputs(name, {"target": name, "runtime": target.runtime, "skipped": skipped,
                             "precision": {"requested": target.precision, "executed": None}}, {}, {})
        return
    session, manifest = load_engine(paths.ENGINES / name, target, machine)

    # Accuracy first: an engine over its budget fails before minutes of timing.
    accuracy = accuracy_against_reference(session, load_reference(paths.REFERENCE), chunk=target.profile.opt)
    budget = {**settings.accuracy_budget, **target.accuracy_budget}
    violations = budget_violations(accuracy, budget)
    # A random-init network's scores sit too close together for agreement to mean anything:
    # its budget is reported, not enforced.
    enforced = settings.fail_on_budget and bool(spec.checkpoint or spec.weights)
    if violations and not enforced:
        logging.getLogger("kiln.benchmark").warning(
            "%s over its accuracy budget (%s); not enforced: %s", name, "; ".join(violations),
            "benchmark.fail_on_budget is false" if not settings.fail_on_budget else "the model has random weights (no checkpoint or weights)",
        )
    if violations and enforced:
        raise KilnError(
            f"target '{name}' is over its accuracy budget on {accuracy['source']}: {'; '.join(violations)}. "
            f"Keep sensitive layers in float (targets.{name}.calibration.ignored_scope), change the calibration, "
            "or relax targets.<name>.accuracy_budget / set benchmark.fail_on_budget: false to record it and go on"
        )
    stats, raw, notes = benchmark_latency(session, spec.inputs, target.profile, settings)
    served, requests = benchmark_served(session, spec.inputs, target.serve, settings) if target.serve else (None, [])
    if served:
        logging.getLogger("kiln.benchmark").info(
            "served %s: p50 %.3f ms, p99 %.3f ms per request, %.1f images/s over %d requests",
            target.serve, served["p50_ms"], served["p99_ms"], served["images_per_s"], served["requests"])
    metrics = headline_metrics(target.main_batch, stats[f"b{target.main_batch}"], accuracy, served)
    run = {
        "target": name,
        "runtime": target.runtime,
        "precision": manifest["precision"],
        "device": target.device,
        "threads": target.effective_threads,
        "profile": target.profile.to_params(),
        "machine": fingerprint.describe_hardware(machine["hardware"]),
        "versions": manifest["versions"],
        "settings": settings.to_params(),
        "main_batch": target.main_batch,
        "latency": stats,
        "times_ms": raw,
        "served": {"distribution": {str(b): p for b, p in target.serve.items()}, **served, "requests_ms": requests,
                   "profile_warning": profile_mismatch(target.profile, target.serve)} if served and target.serve else None,
        "compiler": {k: manifest[k] for k in ("build_seconds", "compile_seconds", "graph", "mode") if k in manifest},
        "accuracy": accuracy,
        "budget": {"limits": budget, "violations": violations, "enforced": enforced},
        "calibration": manifest.get("calibration"),
        "notes": notes,
    }
    write_outputs(name, run, stats, metrics)


def write_outputs(name: str, run: dict, stats: dict, metrics: dict) -> None:
    write_json(paths.RUNS / f"{name}.json", run)
    rows = ["batch,ms_per_image,images_per_s,p50_ms,p99_ms"]
    rows += [f"{k[1:]},{s['ms_per_image']:.4f},{s['images_per_s']:.2f},{s['p50_ms']:.4f},{s['p99_ms']:.4f}" for k, s in stats.items()]
    write_text(paths.PLOTS / f"{name}.csv", "\n".join(rows) + "\n")
    write_json(paths.METRICS / f"{name}.json", metrics)


if __name__ == "__main__":
    run_stage(main)
