"""reports/benchmark.md: the table a person reads, built from the per-target metrics and run files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from kiln.core.paths import METRICS, RUNS
from kiln.report.sections import compared_section, compiler_section, fmt, served_section
from kiln.report.serving import diagnosis_section, open_loop_section
from kiln.report.tuning import NOISY_MARK, costs_section, roofline, roofline_section, throughput_section, tuning_section
from kiln.report.verdict import OVER_BUDGET_MARK, legend, mark_over_budget, verdict, verdict_lines

METRICS_DIR = METRICS
RUNS_DIR = RUNS
SUMMARY_COLUMNS = (
    "target",
    "runtime",
    "precision",
    "batch",
    "ms_per_image",
    "images_per_s",
    "speedup",
    "top1_agreement",
    "throughput_images_per_s",
    "peak_rss_mb",
    "pct_of_peak",
)
AGREEMENT_NAMES = {
    "top1_agreement": "top-1 agreement",
    "detection_f1": "detection F1",
    "pixel_agreement": "pixel agreement",
    "embedding_cosine_min": "min embedding cosine",
    None: "cosine",
}
DEGENERATE_MARK = "†"
LABELLED_NAMES = {"top1": "top-1", "map": "mAP@0.5:0.95", "miou": "mIoU"}


def agreement_cell(acc: Mapping[str, Any], spec: str = ".3f") -> str:
    """The task's agreement figure, marked when the reference it was measured against proves little."""
    value = acc.get("agreement", acc.get("top1_agreement"))  # runs recorded before tasks had only top-1
    return fmt(value, spec) + (DEGENERATE_MARK if acc.get("reference_degenerate") else "")


def agreement_name(results: Mapping[str, Mapping[str, Any]]) -> str:
    metrics = {(r["run"].get("accuracy") or {}).get("agreement_metric") for r in results.values() if r["run"].get("accuracy")}
    return AGREEMENT_NAMES.get(next(iter(metrics)) if len(metrics) == 1 else None, "agreement")


def load_results(target_names: list[str], metrics_dir: Path = METRICS_DIR, runs_dir: Path = RUNS_DIR) -> dict[str, dict[str, Any]]:
    """Metrics and run details for the targets in params only: stale files of removed targets are ignored."""
    results = {}
    for name in target_names:
        m, r = metrics_dir / f"{name}.json", runs_dir / f"{name}.json"
        if m.is_file() and r.is_file():
            results[name] = {"metrics": json.loads(m.read_text()), "run": json.loads(r.read_text())}
    return results


def stale_result_files(target_names: list[str], *folders: Path) -> list[Path]:
    """Per-target files (metrics, runs, plots) of targets no longer in params: left behind when a target set shrinks."""
    keep = set(target_names)
    return sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_file() and p.stem not in keep)


def _speedup(base: Mapping[str, Any], stats: Mapping[str, Any], key: str) -> float | None:
    base_stats = (base or {}).get(key)
    return base_stats["ms_per_image"] / stats["ms_per_image"] if base_stats else None


def summary_rows(
    results: Mapping[str, Mapping[str, Any]], baseline: str, achieved: Mapping[str, Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One row per built target at its main batch size: what the plots and the summary table show
    (`achieved`: kiln.report.tuning.roofline's per-target figures, for the percent of peak)."""
    base = results.get(baseline, {}).get("run", {}).get("latency", {})
    rows = []
    for name, res in results.items():
        run = res["run"]
        if run.get("skipped"):
            continue
        key = f"b{run['main_batch']}"
        stats = run["latency"][key]
        rows.append(
            {
                "target": name,
                "runtime": run.get("runtime"),
                "precision": (run.get("precision") or {}).get("requested"),
                "batch": run["main_batch"],
                "ms_per_image": round(stats["ms_per_image"], 4),
                "images_per_s": round(stats["images_per_s"], 2),
                "speedup": round(s, 3) if (s := _speedup(base, stats, key)) else None,
                "top1_agreement": (run.get("accuracy") or {}).get("top1_agreement"),
                "throughput_images_per_s": _round((run.get("throughput") or {}).get("images_per_s"), 2),
                "peak_rss_mb": (run.get("costs") or {}).get("peak_rss_mb"),
                "pct_of_peak": _round(((achieved or {}).get(name) or {}).get("pct_of_peak"), 1),
            }
        )
    return rows


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def summary_csv(rows: list[dict[str, Any]]) -> str:
    lines = [",".join(SUMMARY_COLUMNS)]
    lines += [",".join("" if r.get(c) is None else str(r[c]) for c in SUMMARY_COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"


def study_line(study: Mapping[str, Any]) -> str:
    """Which study this report is, and what the other one would add: conf/study/<name>.yaml says both."""
    name = study.get("name") or "unnamed"
    return f"Study: **{name}**" + (" (the default)" if name == "quick" else "") + (f"; {study['adds']}." if study.get("adds") else ".")


def render(
    results: Mapping[str, Mapping[str, Any]],
    validate: Mapping[str, Any] | None,
    baseline: str,
    export: Mapping[str, Any] | None = None,
    missing: list[str] | None = None,
    previous: Mapping[str, Mapping[str, Any]] | None = None,
    previous_label: str = "HEAD",
    study: Mapping[str, Any] | None = None,
) -> str:
    lines = ["# Kiln benchmark", ""]
    if results:
        lines += verdict_lines(verdict(results)) + legend(results)
    if study:
        lines += [study_line(study), ""]
    if results:
        machine = next((r["run"]["machine"] for r in results.values() if r["run"].get("machine")), "unknown")
        lines += [f"Machine: {machine}.", ""]
    if export and export.get("source_onnx"):
        lines += [
            f"Model: the ONNX file `{export['source_onnx']}` as given (opset {export.get('opset')}, {export.get('nodes')} nodes, "
            f"made by {export.get('producer') or 'an unnamed producer'}); nothing was exported. "
            + (
                "Its reference outputs are ONNX Runtime fp32 on the CPU, not PyTorch: every figure compares against them."
                if export.get("reference") == "onnxruntime"
                else "The PyTorch model validated it."
            ),
            "",
        ]
    elif export:
        path = export.get("export_path") or {}
        wrapper = path.get("model_wrapper") or {}
        lines += [
            f"Model `{export.get('model')}` exported with the {export.get('exporter')} exporter at opset {export.get('opset')} "
            f"({export.get('nodes')} nodes, traced at batch {export.get('traced_batch')}, "
            f"{len(export.get('warnings', []))} exporter warnings)"
            + (", preprocessing folded into the graph (engines take uint8 HWC images)" if export.get("folded_preprocess") else "")
            + ".",
            "",
        ]
        if export.get("task_reason"):
            lines += [f"Outputs judged as {export['task_reason']}.", ""]
        if path.get("why"):
            lines += [
                f"Export path: {path['why']}." + (f" Postprocessing: {wrapper['postprocess']}." if wrapper.get("postprocess") else ""),
                "",
            ]
    degenerate = next(
        (
            r["run"]["accuracy"]["reference_degenerate"]
            for r in results.values()
            if (r["run"].get("accuracy") or {}).get("reference_degenerate")
        ),
        None,
    )
    if degenerate:
        lines += [
            f"{DEGENERATE_MARK} Figures marked {DEGENERATE_MARK} are measured against a reference that proves little: {degenerate}.",
            "",
        ]
    agree = agreement_name(results)
    base = results.get(baseline, {}).get("run", {}).get("latency", {})
    skipped = {n: r["run"]["skipped"] for n, r in results.items() if r["run"].get("skipped")}
    built = {n: r for n, r in results.items() if n not in skipped}
    achieved = roofline(built)
    summary = summary_rows(results, baseline, achieved)
    if summary:
        lines += [
            "## Summary at each target's main batch size (its profile's opt)",
            "",
            f"| target | precision | batch | ms/image | images/s | speed-up | {agree} | served images/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in summary:
            served = built[row["target"]]["run"].get("served") or {}
            run = built[row["target"]]["run"]
            agreement = agreement_cell(run.get("accuracy") or {}) + mark_over_budget(run)
            lines.append(
                f"| {row['target']} | {row['precision']} | {row['batch']} | {fmt(row['ms_per_image'])} | {fmt(row['images_per_s'], '.1f')} "
                f"| {fmt(row['speedup'], '.2f')}{'x' if row['speedup'] else ''} | {agreement} "
                f"| {fmt(served.get('images_per_s'), '.1f')} |"
            )
        lines.append("")
    lines += [
        "## Latency per batch size",
        "",
        f"Speed-up is ms/image of `{baseline}` divided by the target's, at the same batch size"
        + ("" if base else f" (n/a: no `{baseline}` target in this run)")
        + ". Latency is the median (p50) of the timed iterations; "
        "min/opt/max mark the batch sizes of the target's profile.",
        "",
        "| target | runtime | precision (requested -> executed) | threads | batch | ms/batch p50 | ms/batch p99 | ms/image | images/s "
        f"| speed-up | max abs err | {agree} |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    accuracy_rows = []
    unenforced = False
    for name, res in built.items():
        run = res["run"]
        acc = run.get("accuracy") or {}
        prec = run.get("precision", {})
        profile = run.get("profile") or {}
        for key, stats in (run.get("latency") or {}).items():
            batch = int(key[1:])
            marks = "/".join(m for m in ("min", "opt", "max") if profile.get(m) == batch)
            speedup = _speedup(base, stats, key)
            lines.append(
                f"| {name} | {run.get('runtime')} | {prec.get('requested')} -> {prec.get('executed')} | {run.get('threads')} "
                f"| {batch}{f' ({marks})' if marks else ''} "
                f"| {fmt(stats['p50_ms'])}{NOISY_MARK if stats.get('noisy') else ''} | {fmt(stats['p99_ms'])} "
                f"| {fmt(stats['ms_per_image'])} | {fmt(stats['images_per_s'], '.1f')} "
                f"| {fmt(speedup, '.2f')}{'x' if speedup else ''} | {fmt(acc.get('max_abs_err'), '.2e')} "
                f"| {agreement_cell(acc)}{mark_over_budget(run)} |"
            )
        for note in run.get("notes", []):
            lines.append(f"| {name} | | | | | | | | | | | {note} |")
        budget = run.get("budget") or {}
        violations = budget.get("violations") or []
        within = "ok"
        if violations:
            why = budget.get("why_not_enforced")
            within = (
                f"{OVER_BUDGET_MARK} over: "
                + "; ".join(violations)
                + ("" if budget.get("enforced") else f" (not enforced{': ' + why if why else ''})")
            )
            unenforced = unenforced or not budget.get("enforced")
        labelled = next((k for k in ("top1", "map", "miou") if acc.get(k) is not None), None)
        mark = DEGENERATE_MARK if acc.get("reference_degenerate") else ""
        agreement = agreement_cell(acc, ".4f") + mark_over_budget(run)
        accuracy_rows.append(
            f"| {name} | {agreement} | {fmt(acc.get('sqnr_db'), '.1f')}{mark if acc.get('sqnr_db') is not None else ''} "
            f"| {fmt(acc.get('cosine'), '.6f')}{mark if acc.get('cosine') is not None else ''} "
            f"| {fmt(acc.get('max_abs_err'), '.2e')} "
            f"| {LABELLED_NAMES.get(labelled, '')} {fmt(acc.get(labelled), '.4f') if labelled else ''} "
            f"| {fmt(acc.get(f'{labelled}_drop'), '.2f') if labelled else 'n/a'} "
            f"| {within} |"
        )
    if skipped:
        lines += ["", "Skipped on this machine (targets marked `required: false`):", ""]
        lines += [f"- `{n}`: {reason}" for n, reason in skipped.items()]
    lines += served_section(built)
    lines += open_loop_section(built)
    lines += diagnosis_section(built)
    lines += throughput_section(built)
    lines += tuning_section(built)
    if accuracy_rows:
        source = next((r["run"]["accuracy"]["source"] for r in built.values() if r["run"].get("accuracy")), "the reference inputs")
        lines += [
            "",
            f"## Accuracy against eager fp32, on {source}",
            "",
            "SQNR n/a means the outputs are identical to the reference (or, for detections, not measured: padded lists are "
            "matched by class and IoU instead). Real accuracy needs labelled eval data: ImageFolder layout for top-1, "
            "COCO JSON or YOLO txt for detection mAP.",
            "",
            f"| target | {agree} | SQNR dB | cosine | max abs err | against labels | drop (points) | budget |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            *accuracy_rows,
        ]
        if unenforced:
            lines += ["", "A budget not enforced (its row says why) still keeps the target from being the one to ship."]
    lines += compiler_section(built)
    lines += roofline_section(built, achieved)
    lines += costs_section(built)
    lines += _calibration_section(built)
    lines += _validation_section(validate)
    lines += compared_section({n: r["metrics"] for n, r in built.items()}, previous, previous_label)
    if missing:
        lines += ["", f"No benchmark results for: {', '.join(missing)} (their stages have not run yet)."]
    return "\n".join(lines) + "\n"


def _calibration_section(built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    calibrated = {n: r["run"]["calibration"] for n, r in built.items() if r["run"].get("calibration")}
    if not calibrated:
        return []
    lines = [
        "",
        "## Calibration: layers whose quantization costs the most",
        "",
        "Per layer, the quantization noise it adds (relative to signal power) over the layer before it, on a few "
        "calibration images; keep the worst in float with `targets.<name>.calibration.ignored_scope`.",
    ]
    for name, cal in calibrated.items():
        kept = cal.get("float_layers") or []
        aware = cal.get("accuracy_aware")
        lines += [
            "",
            f"`{name}`: {cal.get('images')} images from {cal.get('folder')}, method {cal.get('method')}"
            + (
                f", accuracy-aware (max top-1 drop {aware['max_drop_points']} points on {aware['eval_images']} eval images)"
                if aware
                else ""
            )
            + (f"; left in float: {', '.join(kept)}" if kept else "; every quantizable layer in int8")
            + ".",
            "",
            "| layer | SQNR dB at its output | noise added (% of signal) |",
            "|---|---:|---:|",
            *[f"| {r['layer']} | {r['sqnr_db']:.1f} | {r['noise_added_pct']:.3f} |" for r in cal.get("sensitivity") or []],
        ]
    return lines


def _validation_section(validate: Mapping[str, Any] | None) -> list[str]:
    if not validate:
        return []
    lines = [
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
        reason = o.get("degenerate") or validate.get("degenerate")
        note = f"reference proves little: {reason}" if reason else ""
        lines.append(
            f"| {name} | {fmt(o['max_abs_err'], '.2e')} | {fmt(o['max_rel_err'], '.2e')} | {fmt(o['mean_abs_err'], '.2e')} "
            f"| {fmt(o.get('top1_agreement'), '.3f')} | {note} |"
        )
    return lines
