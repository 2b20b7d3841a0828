"""benchmark@<target>'s work: one engine's accuracy against the fp32 reference, then its latency, throughput,
served and open-loop traffic and costs, as the run record, the latency table and the headline metrics.

Accuracy comes first: an engine over its budget fails before minutes of timing. The other processes' CPU use
is sampled around the timing (kiln.measure.machine_load): a figure measured beside other work is low, and the
record says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from kiln.accuracy.budgets import accuracy_against_reference, enforce_budget, judge_budget
from kiln.config.views import Target
from kiln.core import paths
from kiln.core.atomic import write_json, write_text
from kiln.core.errors import KilnError
from kiln.data.engine_input import engine_spec
from kiln.data.images import preprocess_for
from kiln.data.inputs import make_inputs
from kiln.data.reference import load_reference
from kiln.measure.benchmark import (
    BenchmarkSettings,
    benchmark_latency,
    benchmark_served,
    benchmark_throughput,
    headline_metrics,
    run_record,
    significant,
    skipped_record,
)
from kiln.measure.costs import MemoryWatch, cold_start, engine_costs
from kiln.measure.machine_load import LoadWatch
from kiln.measure.roofline import roofline_inputs
from kiln.measure.tuning import tuned_target
from kiln.pipeline.engine import load_engine, read_manifest
from kiln.runtimes import fingerprint
from kiln.serving.contention import contention_slowdown
from kiln.serving.run import ServingSettings, preprocessing_cost, serve_under_load

log = logging.getLogger("kiln.measure.benchmark")


@dataclass
class TargetResult:
    run: dict[str, Any]  # reports/runs/<target>.json: everything measured, with the settings and the machine
    stats: dict[str, Any]  # per batch size ("b8"): the latency table behind reports/plots/<target>.csv
    metrics: dict[str, Any]  # reports/metrics/<target>.json: the headline figures `dvc metrics diff` compares


def benchmark_target(name: str, params: Mapping[str, Any], diagnose: Callable[..., str | None] | None = None) -> TargetResult:
    """Measure the built engine of target `name` (artifacts/engines/<name>) with its slice of params. An engine
    over an enforced accuracy budget fails here, with `diagnose(name, target, engine_dir, onnx, reference)`'s
    finding (kiln.diagnose.debug.diagnose, which sits above this package: the stage hands it in)."""
    target = Target.from_params(name, params)
    spec = engine_spec(params)
    settings = BenchmarkSettings.from_params(params.get("benchmark"))
    machine = fingerprint.collect()
    if skipped := read_manifest(paths.ENGINES / name).get("skipped"):
        log.warning("%s skipped on this machine: %s", name, skipped)
        return TargetResult(skipped_record(target, skipped), {}, {})
    main_feeds = make_inputs(spec.inputs, target.main_batch, settings.seed)
    # Costs: this process is the target's alone (one stage per target), so its memory is the engine's plus
    # Python's and the libraries'; MemoryWatch resets the high-water mark so each span is measured alone.
    with MemoryWatch() as load_watch:
        (session, manifest), cold = cold_start(lambda: load_engine(paths.ENGINES / name, target, machine), lambda s: s[0].infer(main_feeds))
    target = tuned_target(target, manifest)  # the settings the engine runs with: its tuning's winner

    reference = load_reference(paths.REFERENCE)
    accuracy = accuracy_against_reference(session, reference, chunk=target.profile.opt)
    verdict = judge_budget(
        accuracy, settings.accuracy_budget, target.accuracy_budget, settings.fail_on_budget, trained=spec.trained_weights()
    )
    log.info("%s: accuracy budget %s (%s)", name, "enforced" if verdict.enforced else "not enforced", verdict.rule)
    if verdict.why_not_enforced:
        log.warning("%s over its accuracy budget (%s); not enforced: %s", name, "; ".join(verdict.violations), verdict.why_not_enforced)
    if verdict.violations and verdict.enforced:  # before failing: where the engine first departs from fp32
        finding = diagnose(name, target, paths.ENGINES / name, paths.ONNX, reference) if diagnose else None
        enforce_budget(verdict, name, accuracy["source"], finding)

    with LoadWatch(settings.load_sample_s) as load:
        with MemoryWatch() as run_watch:
            stats, raw, notes = benchmark_latency(session, spec.inputs, target.profile, settings)
            served, requests = benchmark_served(session, spec.inputs, target.serve, settings) if target.serve else (None, [])
        with MemoryWatch() as throughput_watch:  # its extra sessions or streams are not what one request costs
            throughput = benchmark_throughput(session, spec.inputs, target.main_batch, settings)
        serving = ServingSettings.from_params(params.get("serving"))
        open_loop = serve_under_load(session, spec.inputs, target, stats, serving, throughput) if serving.enabled and target.serve else None
        if open_loop is not None:
            open_loop["preprocessing"] = preprocessing_cost(preprocess_for(spec, params.get("data") or {}))
            if serving.contention:  # opt-in: a second copy of the engine beside it, for as long again
                second, _ = load_engine(paths.ENGINES / name, target, machine)
                open_loop["contention"] = contention_slowdown(session, second, main_feeds, max(settings.min_time_s, serving.contention_s))
                del second
    if load.busy:
        log.warning("%s: other work ran beside the timing (%s): its figures are low", name, load.describe())
    costs = engine_costs(paths.ENGINES / name, manifest, cold, load_watch.result(), run_watch.result(), throughput_watch.result())
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
    hardware = fingerprint.describe_hardware(machine["hardware"])
    run = run_record(
        target, manifest, hardware, settings, stats, raw, served, requests, accuracy, verdict.to_dict(), notes, throughput, costs
    )
    run["roofline"] = roofline
    run["machine_load"] = load.to_dict()
    run["open_loop"] = open_loop
    metrics = headline_metrics(target.main_batch, stats[f"b{target.main_batch}"], accuracy, served, throughput, costs)
    if open_loop:
        metrics["max_rate_at_slo"] = significant(open_loop["max_rate_at_slo"]) if open_loop["max_rate_at_slo"] else 0.0
        if open_loop.get("cost_per_million") is not None:
            metrics["cost_per_million"] = significant(open_loop["cost_per_million"])
    if roofline:  # GMAC/s achieved at the main batch: comparable across runs; the percent of peak is in the report
        metrics["gmac_per_s"] = significant(roofline["macs_per_image"] * stats[f"b{target.main_batch}"]["images_per_s"] / 1e9)
    return TargetResult(run, stats, metrics)


def write_outputs(name: str, result: TargetResult) -> None:
    """The stage's three outputs: the run record, the latency table for the plots, the metrics file."""
    write_json(paths.RUNS / f"{name}.json", result.run)
    rows = ["batch,ms_per_image,images_per_s,p50_ms,p99_ms"]
    rows += [
        f"{k[1:]},{s['ms_per_image']:.4f},{s['images_per_s']:.2f},{s['p50_ms']:.4f},{s['p99_ms']:.4f}" for k, s in result.stats.items()
    ]
    write_text(paths.PLOTS / f"{name}.csv", "\n".join(rows) + "\n")
    write_json(paths.METRICS / f"{name}.json", result.metrics)
