"""reports/benchmark.md: the table a person reads, built from the per-target metrics and run files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

METRICS_DIR = Path("reports/metrics")
RUNS_DIR = Path("reports/runs")


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def load_results(target_names: list[str], metrics_dir: Path = METRICS_DIR, runs_dir: Path = RUNS_DIR) -> dict[str, dict[str, Any]]:
    """Metrics and run details for the targets in params only: stale files of removed targets are ignored."""
    results = {}
    for name in target_names:
        m, r = metrics_dir / f"{name}.json", runs_dir / f"{name}.json"
        if m.is_file() and r.is_file():
            results[name] = {"metrics": json.loads(m.read_text()), "run": json.loads(r.read_text())}
    return results


def render(
    results: Mapping[str, Mapping[str, Any]],
    validate: Mapping[str, Any] | None,
    baseline: str,
    export: Mapping[str, Any] | None = None,
    missing: list[str] | None = None,
) -> str:
    lines = ["# Kiln benchmark", ""]
    if results:
        machine = next((r["run"]["machine"] for r in results.values() if r["run"].get("machine")), "unknown")
        lines += [f"Machine: {machine}.", ""]
    if export:
        lines += [
            f"Model `{export.get('model')}` exported with the {export.get('exporter')} exporter at opset {export.get('opset')} "
            f"({export.get('nodes')} nodes, traced at batch {export.get('traced_batch')}, {len(export.get('warnings', []))} exporter warnings)"
            + (", preprocessing folded into the graph (engines take uint8 HWC images)" if export.get("folded_preprocess") else "") + ".",
            "",
        ]
    base = results.get(baseline, {}).get("metrics", {})
    lines += [
        f"Speed-up is ms/image of `{baseline}` divided by the target's, at the same batch size"
        + ("" if base else f" (n/a: no `{baseline}` target in this run)") + ". Latency is the median (p50) of the timed iterations.",
        "",
        "| target | runtime | precision (requested -> executed) | threads | batch | ms/batch p50 | ms/batch p99 | ms/image | images/s | speed-up | max abs err | top-1 agreement |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    accuracy_rows = []
    skipped = {n: r["run"]["skipped"] for n, r in results.items() if r["run"].get("skipped")}
    for name, res in results.items():
        metrics, run = res["metrics"], res["run"]
        if name in skipped:
            continue
        acc = metrics.get("accuracy", {})
        prec = run.get("precision", {})
        for key, stats in metrics.items():
            if not key.startswith("b") or not isinstance(stats, dict):
                continue
            base_stats = base.get(key)
            speedup = base_stats["ms_per_image"] / stats["ms_per_image"] if base_stats else None
            lines.append(
                f"| {name} | {run.get('runtime')} | {prec.get('requested')} -> {prec.get('executed')} | {run.get('threads')} | {key[1:]} "
                f"| {_fmt(stats['p50_ms'])} | {_fmt(stats['p99_ms'])} | {_fmt(stats['ms_per_image'])} | {_fmt(stats['images_per_s'], '.1f')} "
                f"| {_fmt(speedup, '.2f')}{'x' if speedup else ''} | {_fmt(acc.get('max_abs_err'), '.2e')} | {_fmt(acc.get('top1_agreement'), '.3f')} |"
            )
        for note in run.get("notes", []):
            lines.append(f"| {name} | | | | | | | | | | | {note} |")
        budget = run.get("budget") or {}
        violations = budget.get("violations") or []
        verdict = "ok"
        if violations:
            verdict = "OVER BUDGET: " + "; ".join(violations) + ("" if budget.get("enforced") else " (not enforced: random weights or fail_on_budget off)")
        accuracy_rows.append(
            f"| {name} | {_fmt(acc.get('top1_agreement'), '.4f')} | {_fmt(acc.get('sqnr_db'), '.1f')} | {_fmt(acc.get('cosine'), '.6f')} "
            f"| {_fmt(acc.get('max_abs_err'), '.2e')} | {_fmt(acc.get('top1'), '.4f')} | {_fmt(acc.get('top1_drop'), '.2f')} "
            f"| {verdict} |"
        )
    if skipped:
        lines += ["", "Skipped on this machine (targets marked `required: false`):", ""]
        lines += [f"- `{n}`: {reason}" for n, reason in skipped.items()]
    if accuracy_rows:
        source = next((r["run"]["accuracy"]["source"] for r in results.values() if r["run"].get("accuracy")), "the reference inputs")
        lines += [
            "",
            f"## Accuracy against eager fp32, on {source}",
            "",
            "SQNR n/a means the outputs are identical to the reference. Real top-1 needs labelled eval data (ImageFolder layout).",
            "",
            "| target | top-1 agreement | SQNR dB | cosine | max abs err | top-1 | top-1 drop (points) | budget |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            *accuracy_rows,
        ]
    calibrated = {n: r["run"]["calibration"] for n, r in results.items() if r["run"].get("calibration")}
    if calibrated:
        lines += ["", "## Calibration: layers whose quantization costs the most", ""]
        lines += [
            "Per layer, the quantization noise it adds (relative to signal power) over the layer before it, on a few "
            "calibration images; keep the worst in float with `targets.<name>.calibration.ignored_scope`.",
        ]
        for name, cal in calibrated.items():
            kept = cal.get("float_layers") or []
            aware = cal.get("accuracy_aware")
            lines += [
                "",
                f"`{name}`: {cal.get('images')} images from {cal.get('folder')}, method {cal.get('method')}"
                + (f", accuracy-aware (max top-1 drop {aware['max_drop_points']} points on {aware['eval_images']} eval images)" if aware else "")
                + (f"; left in float: {', '.join(kept)}" if kept else "; every quantizable layer in int8") + ".",
                "",
                "| layer | SQNR dB at its output | noise added (% of signal) |",
                "|---|---:|---:|",
                *[f"| {r['layer']} | {r['sqnr_db']:.1f} | {r['noise_added_pct']:.3f} |" for r in cal.get("sensitivity") or []],
            ]
    if validate:
        lines += [
            "",
            "## Validation (eager PyTorch against the exported ONNX graph in ONNX Runtime fp32)",
            "",
            f"Batch sizes {validate.get('batch_sizes')} (traced at {validate.get('traced_batch')}), "
            f"tolerance atol {validate.get('atol')} + rtol {validate.get('rtol')} x |ref|: "
            + ("passed." if validate.get("passed") else "FAILED."),
            "",
            "| output | max abs err | max rel err | mean abs err | top-1 agreement | note |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name, o in validate.get("outputs", {}).items():
            note = f"reference proves little: {o['degenerate']}" if o.get("degenerate") else ""
            lines.append(
                f"| {name} | {_fmt(o['max_abs_err'], '.2e')} | {_fmt(o['max_rel_err'], '.2e')} | {_fmt(o['mean_abs_err'], '.2e')} "
                f"| {_fmt(o.get('top1_agreement'), '.3f')} | {note} |"
            )
    if missing:
        lines += ["", f"No benchmark results for: {', '.join(missing)} (their stages have not run yet)."]
    return "\n".join(lines) + "\n"
