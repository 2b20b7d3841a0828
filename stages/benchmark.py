"""benchmark@<target>: latency per batch size and accuracy against the eager fp32 reference, for one engine."""

import logging
import sys

from kiln import fingerprint, paths
from kiln.accuracy import accuracy_against_reference, enforce_budget, judge_budget
from kiln.atomic import write_json, write_text
from kiln.benchmark import BenchmarkSettings, benchmark_latency, benchmark_served, headline_metrics, run_record, skipped_record
from kiln.config import Target, engine_spec, load_stage_params
from kiln.engine import load_engine, read_manifest
from kiln.reference import load_reference
from kiln.stage import run_stage

log = logging.getLogger("kiln.benchmark")


def main() -> None:
    name = sys.argv[1]
    params = load_stage_params("benchmark", name)
    target = Target.from_params(name, params)
    spec = engine_spec(params)
    settings = BenchmarkSettings.from_params(params.get("benchmark"))
    machine = fingerprint.collect()
    if skipped := read_manifest(paths.ENGINES / name).get("skipped"):
        log.warning("%s skipped on this machine: %s", name, skipped)
        write_outputs(name, skipped_record(target, skipped), {}, {})
        return
    session, manifest = load_engine(paths.ENGINES / name, target, machine)

    # Accuracy first: an engine over its budget fails before minutes of timing.
    accuracy = accuracy_against_reference(session, load_reference(paths.REFERENCE), chunk=target.profile.opt)
    verdict = judge_budget(
        accuracy, settings.accuracy_budget, target.accuracy_budget, settings.fail_on_budget, trained=bool(spec.checkpoint or spec.weights)
    )
    if verdict.why_not_enforced:
        log.warning("%s over its accuracy budget (%s); not enforced: %s", name, "; ".join(verdict.violations), verdict.why_not_enforced)
    enforce_budget(verdict, name, accuracy["source"])

    stats, raw, notes = benchmark_latency(session, spec.inputs, target.profile, settings)
    served, requests = benchmark_served(session, spec.inputs, target.serve, settings) if target.serve else (None, [])
    if served:
        log.info(
            "served %s: p50 %.3f ms, p99 %.3f ms per request, %.1f images/s over %d requests",
            target.serve,
            served["p50_ms"],
            served["p99_ms"],
            served["images_per_s"],
            served["requests"],
        )
    run = run_record(
        target,
        manifest,
        fingerprint.describe_hardware(machine["hardware"]),
        settings,
        stats,
        raw,
        served,
        requests,
        accuracy,
        verdict.to_dict(),
        notes,
    )
    write_outputs(name, run, stats, headline_metrics(target.main_batch, stats[f"b{target.main_batch}"], accuracy, served))


def write_outputs(name: str, run: dict, stats: dict, metrics: dict) -> None:
    write_json(paths.RUNS / f"{name}.json", run)
    rows = ["batch,ms_per_image,images_per_s,p50_ms,p99_ms"]
    rows += [f"{k[1:]},{s['ms_per_image']:.4f},{s['images_per_s']:.2f},{s['p50_ms']:.4f},{s['p99_ms']:.4f}" for k, s in stats.items()]
    write_text(paths.PLOTS / f"{name}.csv", "\n".join(rows) + "\n")
    write_json(paths.METRICS / f"{name}.json", metrics)


if __name__ == "__main__":
    run_stage(main)
