"""benchmark@<target>: latency per batch size and accuracy against the eager fp32 reference, for one engine."""

import json
import logging
import sys

from kiln import fingerprint, paths
from kiln.accuracy import accuracy_against_reference, enforce_budget, judge_budget
from kiln.atomic import write_json, write_text
from kiln.benchmark import (
    BenchmarkSettings,
    benchmark_latency,
    benchmark_served,
    benchmark_throughput,
    headline_metrics,
    run_record,
    significant,
    skipped_record,
)
from kiln.config import Target, engine_spec
from kiln.costs import MemoryWatch, cold_start, engine_size_bytes
from kiln.engine import load_engine, read_manifest
from kiln.errors import KilnError
from kiln.images import preprocess_for
from kiln.inputs import make_inputs
from kiln.machine_load import other_load
from kiln.reference import load_reference
from kiln.roofline import roofline_inputs
from kiln.serving.run import ServingSettings, contention_slowdown, preprocessing_cost, serve_under_load
from kiln.stage import run_stage
from kiln.stage_params import load_stage_params
from kiln.tuning import tuned_target

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
    main_feeds = make_inputs(spec.inputs, target.main_batch, settings.seed)
    # Costs: this process is the target's alone (one stage per target), so its memory is the engine's plus
    # Python's and the libraries'; MemoryWatch resets the high-water mark so each span is measured alone.
    with MemoryWatch() as load_watch:
        (session, manifest), cold = cold_start(lambda: load_engine(paths.ENGINES / name, target, machine), lambda s: s[0].infer(main_feeds))
    target = tuned_target(target, manifest)  # the settings the engine runs with: its tuning's winner

    # Accuracy first: an engine over its budget fails before minutes of timing.
    reference = load_reference(paths.REFERENCE)
    accuracy = accuracy_against_reference(session, reference, chunk=target.profile.opt)
    verdict = judge_budget(
        accuracy, settings.accuracy_budget, target.accuracy_budget, settings.fail_on_budget, trained=spec.trained_weights()
    )
    log.info("%s: accuracy budget %s (%s)", name, "enforced" if verdict.enforced else "not enforced", verdict.rule)
    if verdict.why_not_enforced:
        log.warning("%s over its accuracy budget (%s); not enforced: %s", name, "; ".join(verdict.violations), verdict.why_not_enforced)
    if verdict.violations and verdict.enforced:  # before failing: where the engine first departs from fp32
        from kiln.debug import diagnose

        enforce_budget(verdict, name, accuracy["source"], diagnose(name, target, paths.ENGINES / name, paths.ONNX, reference))

    # Other work on the cores makes every figure below low: sampled around the timing, said in the report.
    load_before = other_load(0.5)
    with MemoryWatch() as run_watch:
        stats, raw, notes = benchmark_latency(session, spec.inputs, target.profile, settings)
        served, requests = benchmark_served(session, spec.inputs, target.serve, settings) if target.serve else (None, [])
    with MemoryWatch() as throughput_watch:  # its extra sessions or streams are not what one request costs
        throughput = benchmark_throughput(session, spec.inputs, target.main_batch, settings)
    serving = ServingSettings.from_params(params.get("serving"))
    open_loop = serve_under_load(session, spec.inputs, target, stats, serving) if serving.enabled and target.serve else None
    if open_loop is not None:
        open_loop["preprocessing"] = preprocessing_cost(preprocess_for(spec, params.get("data") or {}))
        if serving.contention:  # opt-in: a second copy of the engine beside it, for as long again
            second, _ = load_engine(paths.ENGINES / name, target, machine)
            open_loop["contention"] = contention_slowdown(session, second, main_feeds, max(settings.min_time_s, 1.0))
            del second
    load_after = other_load(0.5)
    busy = load_before.busy or load_after.busy
    if busy:
        log.warning(
            "%s: other work ran beside the timing (before: %s; after: %s): its figures are low",
            name,
            load_before.describe(),
            load_after.describe(),
        )
    costs = engine_costs(manifest, cold, load_watch.result(), run_watch.result(), throughput_watch.result())
    try:
        roofline = roofline_inputs(paths.ONNX, json.loads(paths.PEAK.read_text()))
    except KilnError as e:  # e.g. a symbolic input dimension other than the batch: no roofline, said why
        log.warning("no roofline for this model: %s", e)
        roofline = None
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
        throughput,
        costs,
    )
    run["roofline"] = roofline
    run["machine_load"] = {"before": load_before.to_dict(), "after": load_after.to_dict(), "busy": busy}
    run["open_loop"] = open_loop
    metrics = headline_metrics(target.main_batch, stats[f"b{target.main_batch}"], accuracy, served, throughput, costs)
    if open_loop:
        metrics["max_rate_at_slo"] = significant(open_loop["max_rate_at_slo"]) if open_loop["max_rate_at_slo"] else 0.0
        if open_loop.get("cost_per_million") is not None:
            metrics["cost_per_million"] = significant(open_loop["cost_per_million"])
    if roofline:  # GMAC/s achieved at the main batch: comparable across runs; the percent of peak is in the report
        metrics["gmac_per_s"] = significant(roofline["macs_per_image"] * stats[f"b{target.main_batch}"]["images_per_s"] / 1e9)
    write_outputs(name, run, stats, metrics)


def engine_costs(manifest: dict, cold: dict, load: dict, run: dict, throughput: dict) -> dict:
    """Memory, disk, cold start and build time of one engine, for the run record and the metrics file."""
    tuning = manifest.get("tuning") or {}
    return {
        "peak_rss_mb": round(max(load["peak_rss_mb"], run["peak_rss_mb"]), 1),
        "added_mb": round(max(load["peak_rss_mb"], run["peak_rss_mb"]) - (load["rss_before_mb"] or 0.0), 1),
        "rss_before_load_mb": load["rss_before_mb"],
        "throughput_peak_rss_mb": round(throughput["peak_rss_mb"], 1),
        "memory_method": load["method"],
        "engine_mb": round(engine_size_bytes(paths.ENGINES / manifest["target"]) / 1e6, 3),
        "load_s": round(cold["load_s"], 3),
        "first_infer_ms": round(cold["first_infer_ms"], 2),
        "build_s": manifest.get("build_seconds"),
        "tuning_s": tuning.get("seconds"),
    }


def write_outputs(name: str, run: dict, stats: dict, metrics: dict) -> None:
    write_json(paths.RUNS / f"{name}.json", run)
    rows = ["batch,ms_per_image,images_per_s,p50_ms,p99_ms"]
    rows += [f"{k[1:]},{s['ms_per_image']:.4f},{s['images_per_s']:.2f},{s['p50_ms']:.4f},{s['p99_ms']:.4f}" for k, s in stats.items()]
    write_text(paths.PLOTS / f"{name}.csv", "\n".join(rows) + "\n")
    write_json(paths.METRICS / f"{name}.json", metrics)


if __name__ == "__main__":
    run_stage(main)
