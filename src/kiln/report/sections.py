"""Report sections beyond the latency table: served traffic, what each compiler did, and the change
against the last committed metrics."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Mapping

from kiln.report.changes import SPREAD_KEY, compare, describe
from kiln.report.verdict import target_cell

# Headline metrics compared with the last commit: (key, label, higher is better).
COMPARED = (
    ("ms_per_image", "ms/image", False),
    ("images_per_s", "images/s", True),
    ("top1_agreement", "top-1 agreement", True),
    ("top1", "top-1", True),
    ("served_images_per_s", "served images/s", True),
)


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def served_section(built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    served = {n: r["run"]["served"] for n, r in built.items() if r["run"].get("served")}
    if not served:
        return []
    lines = [
        "",
        "## Served traffic",
        "",
        "Requests drawn one after another from each target's served batch-size distribution (`serve`): per-request "
        "latency percentiles, and images/s over the whole run. Compare with the main-batch figures above: a benchmark "
        "at a batch size that is rarely served overstates what users get.",
        "",
        "| target | distribution (batch: share) | requests | p50 ms | p90 ms | p99 ms | ms/image | images/s | main batch ms/image "
        "| profile |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    warnings: dict[str, list[str]] = {}  # one line per distinct warning, naming every target it applies to
    for name, s in served.items():
        run = built[name]["run"]
        main = run["latency"].get(f"b{run['main_batch']}", {})
        dist = ", ".join(f"{b}: {p:g}" for b, p in s["distribution"].items())
        warning = s.get("profile_warning")
        if warning:
            warnings.setdefault(warning, []).append(f"**`{name}`**")
        lines.append(
            f"| {target_cell(name, run)} | {dist} | {s['requests']} | {fmt(s['p50_ms'])} | {fmt(s['p90_ms'])} | {fmt(s['p99_ms'])} "
            f"| {fmt(s['ms_per_image'])} | {fmt(s['images_per_s'], '.1f')} | {fmt(main.get('ms_per_image'))} "
            f"| {'FLAGGED' if warning else 'ok'} |"
        )
    if warnings:
        lines += ["", "Profiles tuned for a batch size far from the served ones:", ""]
        lines += [f"- {', '.join(names)}: {warning}." for warning, names in warnings.items()]
    return lines


def _top(counts: Mapping[str, int] | None, n: int = 4) -> str:
    if not counts:
        return ""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{k} x{v}" for k, v in items[:n])
    return text + (f", +{len(items) - n} more" if len(items) > n else "")


def compiler_section(built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Where the speed came from: nodes before and after each runtime's compiler, fusions, executed precisions."""
    rows = []
    for name, res in built.items():
        comp = res["run"].get("compiler") or {}
        graph = comp.get("graph") or {}
        if not comp:
            continue
        rows.append(
            f"| {target_cell(name, res['run'])} | {fmt(comp.get('build_seconds'), '.1f')} | {fmt(comp.get('compile_seconds'), '.1f')} "
            f"| {fmt(graph.get('nodes_in'))} | {fmt(graph.get('nodes_out'))} | {_top(graph.get('fusions')) or '-'}"
            f"{f'; attention {attention}' if (attention := graph.get('attention')) else ''} "
            f"| {_top(graph.get('layer_precisions')) or '-'} | {graph.get('source') or ''} |"
        )
    if not rows:
        return []
    return [
        "",
        "## What each compiler did",
        "",
        "Nodes in: the graph the runtime was given (ONNX nodes, or ATen ops for PyTorch). Nodes out: what it runs "
        "(ONNX Runtime's optimised graph, OpenVINO's runtime model, TensorRT's engine layers, Inductor's kernels). "
        "Fusions: the node kinds merged into one; executed precisions: layers per precision, where the runtime says.",
        "",
        "| target | build s | compile s | nodes in | nodes out | fusions | executed precisions (layers) | counted from |",
        "|---|---:|---:|---:|---:|---|---|---|",
        *rows,
    ]


def committed_metrics(names: list[str], metrics_dir: Path, rev: str = "HEAD") -> dict[str, dict[str, Any]] | None:
    """The per-target metrics files as committed at `rev`; None outside a git repository or before the first commit."""
    out: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            path = (metrics_dir / f"{name}.json").as_posix()
            proc = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, timeout=10)
            if proc.returncode == 0:
                try:
                    out[name] = json.loads(proc.stdout)
                except json.JSONDecodeError:
                    continue
            elif "not a git repository" in proc.stderr or "invalid object name" in proc.stderr.lower():
                return None
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out


def compared_section(current: Mapping[str, Mapping[str, Any]], previous: Mapping[str, Mapping[str, Any]] | None, label: str) -> list[str]:
    if previous is None:
        return []
    lines = ["", f"## Compared with the metrics committed at {label}", ""]
    rows = []
    for name, now in current.items():
        before = previous.get(name)
        if before is None:
            rows.append(f"| {name} | new target | | | |")
            continue
        for key, label_, higher_better in COMPARED:
            c = compare(key, before, now, higher_better)
            if c is None or before[key] == now[key]:
                continue
            rows.append(f"| {name} | {label_} | {fmt(float(before[key]), '.4g')} | {fmt(float(now[key]), '.4g')} | {describe(c)} |")
    if not rows:
        return lines + ["No headline metric changed."]
    lines += ["| target | metric | before | now | change |", "|---|---|---:|---:|---|", *rows]
    lines += [
        "",
        f"Within noise: a change in ms/image or images/s no larger than the spread of the timed iterations (`{SPREAD_KEY}`, "
        "the larger of the two runs'); figures without a spread are compared as they are.",
    ]
    return lines
