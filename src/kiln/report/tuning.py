"""The report's sections on what the chip gives: tuning, throughput mode, the roofline, and what each engine costs."""

from __future__ import annotations

from typing import Any, Mapping

from kiln.report.sections import fmt
from kiln.report.verdict import target_cell

NOISY_MARK = "~"


def tuning_section(built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    tuned = {n: r["run"]["tuning"] for n, r in built.items() if r["run"].get("tuning")}
    if not tuned:
        return []
    lines = [
        "",
        "## Tuning: default against tuned settings",
        "",
        "Measured at build time in interleaved rounds at the batch shown (kiln.measure.tuning); a setting is kept only when it beats "
        "the best so far by more than the spread of those rounds and by `tuning.min_gain`, and the winner must beat the "
        "default once more. The latency tables above measure the engine as tuned.",
        "",
        "| target | batch | default ms/image | tuned ms/image | speed-up | winning settings | trials | seconds | note |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for name, t in tuned.items():
        changed = ", ".join(f"{k}={v}" for k, v in (t.get("changed") or {}).items()) or "default kept"
        note = t.get("kept_default") or t.get("stopped") or ""
        done = [x for x in t.get("trials") or [] if "won" in x]
        cell = target_cell(name, built[name]["run"])
        lines.append(
            f"| {cell} | {t.get('batch')} | {fmt(t.get('default_ms_per_image'))} | {fmt(t.get('tuned_ms_per_image'))} "
            f"| {fmt(t.get('speedup'), '.2f')}x | {changed} | {len(done)} | {fmt(t.get('seconds'), '.1f')} | {note} |"
        )
    lines += [
        "",
        "Searched: " + "; ".join(f"`{n}`: " + ", ".join(f"{k} {v}" for k, v in (t.get("knobs") or {}).items()) for n, t in tuned.items()),
    ]
    return lines


def throughput_section(built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = []
    for name, res in built.items():
        run = res["run"]
        tp = run.get("throughput")
        if not tp:
            continue
        sync = (run.get("latency") or {}).get(f"b{tp.get('batch')}", {})
        cell = target_cell(name, run)
        if tp.get("images_per_s") is None:
            rows.append(f"| {cell} | {tp.get('batch')} | {fmt(sync.get('images_per_s'), '.1f')} | n/a | | | {tp.get('why', '')} |")
            continue
        gain = tp["images_per_s"] / sync["images_per_s"] if sync.get("images_per_s") else None
        rows.append(
            f"| {cell} | {tp['batch']} | {fmt(sync.get('images_per_s'), '.1f')} | {fmt(tp['images_per_s'], '.1f')} "
            f"| {fmt(gain, '.2f')}{'x' if gain else ''} | {tp.get('requests_in_flight')} | {tp.get('method', '')} |"
        )
    if not rows:
        return []
    return [
        "",
        "## Throughput mode (several requests in flight, MLPerf's Offline scenario)",
        "",
        "images/s with the runtime's own concurrent API at the profile's opt batch, beside one synchronous request at a time.",
        "",
        "| target | batch | sync images/s | throughput images/s | gain | requests in flight | how |",
        "|---|---:|---:|---:|---:|---:|---|",
        *rows,
    ]


def peak_for(precision: str | None, peaks: Mapping[str, Any]) -> float | None:
    entry = peaks.get(precision or "fp32") or {}
    return entry.get("macs_per_s")


def roofline(built: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target with a roofline record (the benchmark's: MACs per image and its machine's measured peaks): MAC/s
    achieved at its main batch (sync and throughput mode) and its percent of the peak of its precision. A peak
    below what an engine on the same machine reaches is raised to it (a microbenchmark can under-state what the
    runtime's best kernels do): `peak_raised` says so."""
    achieved: dict[str, dict[str, Any]] = {}
    for name, res in built.items():
        run = res["run"]
        roof = run.get("roofline") or {}
        macs = roof.get("macs_per_image")
        if not macs:
            continue
        precision = (run.get("precision") or {}).get("requested")
        sync = (run.get("latency") or {}).get(f"b{run.get('main_batch')}", {}).get("images_per_s")
        tp = (run.get("throughput") or {}).get("images_per_s")
        rates = [r for r in (sync, tp) if r]
        achieved[name] = {
            "precision": precision,
            "machine": run.get("machine"),
            "measured_peak": peak_for(precision, (roof.get("machine") or {}).get("peaks") or {}),
            "macs_per_s": macs * sync if sync else None,
            "throughput_macs_per_s": macs * tp if tp else None,
            "best_macs_per_s": macs * max(rates) if rates else None,
        }
    best: dict[tuple[Any, Any], float] = {}
    for a in achieved.values():
        if a["best_macs_per_s"]:
            key = (a["machine"], a["precision"])
            best[key] = max(best.get(key, 0.0), a["best_macs_per_s"])
    for a in achieved.values():
        measured = a["measured_peak"]
        peak = max(measured or 0.0, best.get((a["machine"], a["precision"]), 0.0)) or None
        a["peak_macs_per_s"] = peak
        a["peak_raised"] = bool(measured and peak and peak > measured)
        a["pct_of_peak"] = 100 * a["macs_per_s"] / peak if peak and a["macs_per_s"] else None
        a["throughput_pct_of_peak"] = 100 * a["throughput_macs_per_s"] / peak if peak and a["throughput_macs_per_s"] else None
    return achieved


def _gmacs(value: float | None) -> str:
    return fmt(value / 1e9 if value else None, ".0f")


def roofline_section(built: Mapping[str, Mapping[str, Any]], achieved: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """`achieved`: roofline(built), which the summary uses too."""
    roofs = {n: r["run"]["roofline"] for n, r in built.items() if (r["run"].get("roofline") or {}).get("macs_per_image")}
    if not roofs:
        return []
    first = next(iter(roofs.values()))
    lines = ["", "## Roofline: multiply-accumulates per second against this machine's measured peak", ""]
    uncounted = first.get("uncounted") or []
    lines.append(
        f"The model does {first['macs_per_image'] / 1e9:.3f} GMAC per image ("
        + ", ".join(f"{op} {v / 1e9:.3f}" for op, v in sorted((first.get("by_op") or {}).items(), key=lambda kv: -kv[1]))
        + ", counted from the ONNX graph"
        + (f"; {len(uncounted)} compute nodes of unknown shape not counted: a lower bound" if uncounted else "")
        + ")."
    )
    machines = {built[n]["run"].get("machine"): roof.get("machine") or {} for n, roof in roofs.items()}
    for machine, facts in machines.items():
        peaks = facts.get("peaks") or {}
        if not peaks:
            continue
        clock = facts.get("clock") or {}
        lines += [
            "",
            f"Peak per precision on {machine}, measured with large GEMMs and convolutions through the runtimes on "
            f"{facts.get('cores')} cores (the peak stage); the ISA bound is SIMD lanes x FMA units x cores x clock "
            f"({fmt((clock.get('hz') or 0) / 1e9, '.2f')} GHz, {clock.get('source', 'clock unknown')}).",
            "",
            "| precision | measured peak GMAC/s | by | ISA bound GMAC/s | measured / bound |",
            "|---|---:|---|---:|---:|",
        ]
        for precision, p in peaks.items():
            measured, bound = p.get("macs_per_s"), p.get("isa_macs_per_s")
            lines.append(
                f"| {precision} | {_gmacs(measured)} | {p.get('runtime') or ''} | {_gmacs(bound)} "
                f"| {fmt(measured / bound if measured and bound else None, '.2f')} |"
            )
        for note in facts.get("preflight") or []:
            lines += ["", f"Pre-flight: {note}"]
    lines += [
        "",
        "| target | precision | GMAC/s (sync, main batch) | % of peak | GMAC/s (throughput mode) | % of peak |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, a in achieved.items():
        raised = " (peak raised to this)" if a["peak_raised"] and a["best_macs_per_s"] == a["peak_macs_per_s"] else ""
        lines.append(
            f"| {target_cell(name, built[name]['run'])} | {a['precision']} | {_gmacs(a['macs_per_s'])} | {fmt(a['pct_of_peak'], '.0f')} "
            f"| {_gmacs(a['throughput_macs_per_s'])} | {fmt(a['throughput_pct_of_peak'], '.0f')}{raised} |"
        )
    if any(a["peak_raised"] for a in achieved.values()):
        lines += ["", "A peak an engine exceeds is raised to what that engine reaches: the microbenchmark under-stated it."]
    return lines


def costs_section(built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = []
    method = None
    for name, res in built.items():
        c = res["run"].get("costs")
        if not c:
            continue
        method = method or c.get("memory_method")
        cell = target_cell(name, res["run"])
        rows.append(
            f"| {cell} | {fmt(c.get('peak_rss_mb'), '.0f')} | {fmt(c.get('added_mb'), '.0f')} | {fmt(c.get('engine_mb'), '.1f')} "
            f"| {fmt(c.get('load_s'), '.2f')} | {fmt(c.get('first_infer_ms'), '.1f')} | {fmt(c.get('build_s'), '.1f')} "
            f"| {fmt(c.get('tuning_s'), '.1f') if c.get('tuning_s') is not None else ''} |"
        )
    if not rows:
        return []
    return [
        "",
        "## What each engine costs",
        "",
        "Each target is benchmarked in its own process (its benchmark stage). Peak RSS is that process's resident memory at its "
        "highest while loading and running the engine; added is that peak minus the memory before the load (the runtime's "
        f"libraries included when the engine is the first to import them). Memory: {method}. Cold start is the load "
        "(compile included where the runtime compiles on load) and the first inference at the main batch.",
        "",
        "| target | peak RSS MB | added MB | engine on disk MB | load s | first inference ms | build s | tuning s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
