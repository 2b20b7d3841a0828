"""The report's open-loop sections: the rate each engine holds within the SLO, the profile and batcher that fit
the traffic (offered only when measured better), and why serving can be slower than the benchmark, per target."""

from __future__ import annotations

from typing import Any, Mapping

from kiln.report.sections import fmt
from kiln.report.verdict import target_cell
from kiln.serving.recommend import judge_recommendation

CURVE_COLUMNS = ("target", "offered_rate", "p99_ms", "within_slo")


def _p99(point: Mapping[str, Any] | None) -> float | None:
    return (point or {}).get("e2e_p99_ms")


def open_loop_section(built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    runs = {n: r["run"]["open_loop"] for n, r in built.items() if r["run"].get("open_loop")}
    if not runs:
        return []
    first = next(iter(runs.values()))
    lines = [
        "",
        f"## Served under open-loop load (p99 objective {fmt(first['slo_ms'], 'g')} ms)",
        "",
        "Requests arrive as a seeded Poisson process (the same sequence for every target, scaled to each rate), sizes drawn "
        f"from {first['sizes']}, and wait for a dynamic batcher. Max rate: the highest offered rate whose p99 end-to-end "
        "latency (queueing included) stays within the objective without the queue growing (a binary search). Queue share: "
        "how much of the slowest requests' latency at 90% of that rate is waiting rather than computing. Queue model: the max "
        "rate of the same batcher simulated on the engine's closed-loop median per batch size (`kiln.serving.queue_model`: "
        "nothing but the engine's own time), and the measured rate as a share of it: what threads, Python and the engine's "
        "variance beyond its median cost. Recommended: the profile "
        "and batcher for the traffic (`kiln.serving.recommend`: max, the largest batch whose inference fits in half the "
        "objective; opt, where ms/image flattens; the delay, half the objective left after the largest batch), its batcher "
        "searched again on the same engine; a command to apply it is given only where it held a rate the current one failed."
        + _decided_line(first),
        "",
        "| target | batcher (max batch, delay ms) | max requests/s at SLO | queue model (measured/model) | p99 ms at max "
        "| p99 ms at 50% | p99 ms at 90% | queue share at 90% | recommended profile (min/opt/max) | batcher "
        "| max requests/s, recommended batcher | cost per 1M requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    notes = []
    applied = False
    for name, o in runs.items():
        b, rec = o["batcher"], o.get("recommended") or {}
        p = rec.get("profile") or {}
        rb = rec.get("batcher") or {}
        at90 = o.get("at_90pct") or {}
        cell = target_cell(name, built[name]["run"])
        lines.append(
            f"| {cell} | {b['max_batch']}, {fmt(b['max_queue_delay_ms'], 'g')} | {fmt(o['max_rate_at_slo'], '.1f')} "
            f"| {_model_cell(o.get('model'))} | {fmt(o.get('p99_ms_at_max'), '.1f')} "
            f"| {fmt(_p99(o.get('at_50pct')), '.1f')} | {fmt(_p99(at90), '.1f')} "
            f"| {fmt(at90.get('p99_queue_share'), '.2f')} | {p.get('min')}/{p.get('opt')}/{p.get('max')} "
            f"| {rb.get('max_batch')}, {fmt(rb.get('max_queue_delay_ms'), '.3g')} | {fmt(o.get('recommended_max_rate_at_slo'), '.1f')} "
            f"| {fmt(o.get('cost_per_million'), '.3g')} |"
        )
        if o["max_rate_at_slo"] == 0:
            notes.append(f"- `{name}`: no rate meets the objective: {o['search']['reason']}")
        elif o["search"].get("unsettled") == "undecided":
            undecided = ", ".join(fmt(r, ".4g") for r in o["search"].get("undecided") or [])
            notes.append(
                f"- `{name}`: its max rate is an estimate: the requests of its probes at {undecided} requests/s did not decide "
                "their p99 in the time allowed (study=deep, or a larger serving.max_seconds_per_rate, decides them)"
            )
        judged = judge_recommendation(o)
        risks = " ".join(rec.get("warnings") or [])
        if judged and judged["apply"]:
            notes.append(f"- `{name}`: {judged['why']}. Apply: `{judged['apply']}`" + (f" ({risks})" if risks else ""))
            applied = True
        elif judged:
            notes.append(f"- `{name}`: {judged['why']}." + (f" {risks[0].upper()}{risks[1:]}" if risks else ""))
        if rec.get("profiles_override"):
            notes.append(
                f"- `{name}`: its engine holds several shape profiles; one per common small request size was not measured: "
                f"to measure it, rebuild with `{rec['profiles_override']}`"
            )
        if (o.get("steady") or {}).get("steady") is False:
            notes.append(f"- `{name}`: {o['steady']['why']}")
    if notes:
        lines += ["", *notes]
    if applied:
        lines += [
            "",
            "`serving.max_batch` and `serving.max_queue_delay_ms` are shared by every target: apply the command of the engine "
            "you ship (the verdict above).",
        ]
    return lines + offline_lines(runs, built) + configs_lines(runs, built)


def _model_cell(model: Mapping[str, Any] | None) -> str:
    if not model:  # a record from before the queue model
        return "n/a"
    return f"{fmt(model['max_rate'], '.1f')} ({fmt(model['vs_measured'], '.2f')}x)"


def _ratio_row(cell: str, v: Mapping[str, Any]) -> str:
    f = v["factors"]
    return (
        f"| {cell} | {fmt(v['served_images_per_s'], '.4g')} | {fmt(v['offline_images_per_s'], '.4g')} ({v['offline']}) "
        f"| **{fmt(v['ratio'], '.2f')}** | {fmt(f['instances'], '.2f')} | {fmt(f['batching'], '.2f')} | {fmt(f['busy'], '.2f')} "
        f"| {v.get('why') or 'at or above MLPerf CPU Server runs (0.75x)'} |"
    )


def offline_lines(runs: Mapping[str, Mapping[str, Any]], built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Served images/s at the max rate against the engine's offline images/s, and the factor that eats most."""
    rows = [_ratio_row(target_cell(n, built[n]["run"]), o["vs_offline"]) for n, o in runs.items() if o.get("vs_offline")]
    if not rows:
        return []
    return [
        "",
        "### Served against offline (MLPerf's Server/Offline ratio)",
        "",
        "Images/s served at the max rate (rate x mean request size) against the engine's offline images/s (throughput mode, "
        "several requests in flight). MLPerf CPU submissions serve about 0.76-0.78x of Offline under their p99 bound. The "
        "ratio is the product of three measured factors (`kiln.serving.offline`): instances (one request in flight against "
        "the throughput mode's several), batching (the mean batch formed at the max rate against the offline batch, closed "
        "loop) and busy (the share of time the engine computes at the max rate: the rest is idle time the p99 needs). "
        "Preprocessing is not in this loop (requests arrive as tensors): its cost per frame is in the next section.",
        "",
        "| target | served images/s | offline images/s | ratio | instances | batching | busy | what eats it |",
        "|---|---:|---|---:|---:|---:|---:|---|",
        *rows,
    ]


def configs_lines(runs: Mapping[str, Mapping[str, Any]], built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The configurations the search tried per target, its Pareto front of rate against p99, and the best."""
    searched = {n: o["configs"] for n, o in runs.items() if o.get("configs")}
    if not searched:
        return []
    lines = [
        "",
        "### Serving configurations searched (Triton model_analyzer's quick search)",
        "",
        "Workers (inferences in flight) x the batcher's max batch x its queue delay, hill-climbed from the configured batcher "
        "(`serving.search_configs`, within `serving.config_budget_s` per target). Front: no other configuration tried holds "
        "a higher rate at a lower p99. Best: the highest rate within the objective.",
    ]
    for name, c in searched.items():
        cell = target_cell(name, built[name]["run"])
        lines += [
            "",
            f"{cell}: {len(c['points'])} configurations in {fmt(c['seconds'], '.0f')} s "
            f"({'converged' if c['stopped'] == 'converged' else 'stopped by the budget'}); {c['probes']}.",
            "",
            "| workers | max batch | delay ms | max requests/s | p99 ms at max | front | best |",
            "|---:|---:|---:|---:|---:|:-:|:-:|",
        ]
        for p in sorted(c["points"], key=lambda p: -(p.get("max_rate") or 0.0)):
            lines.append(
                f"| {p['workers']} | {p['max_batch']} | {fmt(p['max_queue_delay_ms'], 'g')} | {fmt(p['max_rate'], '.4g')} "
                f"| {fmt(p['p99_ms_at_max'], '.1f')} | {'yes' if p['pareto'] else ''} | {'**best**' if p['chosen'] else ''} |"
            )
        chosen, start = c.get("chosen"), c.get("start")
        if chosen and chosen != start:
            lines += [
                "",
                f"To serve with it: `serving.workers={chosen['workers']} serving.max_batch={chosen['max_batch']} "
                f"serving.max_queue_delay_ms={fmt(chosen['max_queue_delay_ms'], 'g')}`"
                + (f"; its served images/s are {c['vs_offline']['ratio']:.2f}x offline" if c.get("vs_offline") else ""),
            ]
    return lines


def diagnosis_section(built: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why an engine can serve slower than its benchmark, each cause with the figure kiln measured for it."""
    rows = []
    contended = any((r["run"].get("open_loop") or {}).get("contention") for r in built.values())
    for name, res in built.items():
        run = res["run"]
        o = run.get("open_loop")
        if not o:
            continue
        prec = run.get("precision") or {}
        main = (run.get("latency") or {}).get(f"b{run.get('main_batch')}", {})
        b1 = (run.get("latency") or {}).get("b1", {})
        prep = (o.get("preprocessing") or {}).get("ms_per_image")
        engine = main.get("ms_per_image")
        prep_share = prep / (prep + engine) if prep and engine else None
        served = run.get("served") or {}
        at90 = o.get("at_90pct") or {}
        profile = run.get("profile") or {}
        rows.append(
            f"| {target_cell(name, run)} | opt {profile.get('opt')} vs mean served {fmt(served.get('mean_batch'), '.2g')} "
            f"| {fmt(b1.get('ms_per_image'), '.3g')} vs {fmt(engine, '.3g')} "
            f"| {fmt(at90.get('p99_queue_share'), '.2f')} | {prec.get('requested')} -> {prec.get('executed')} "
            f"| {fmt(prep, '.3g')} ({fmt(100 * prep_share if prep_share is not None else None, '.0f')}%) |"
            + (f" {_contention(o.get('contention'))} |" if contended else "")
        )
    if not rows:
        return []
    return [
        "",
        "## Why production can be slower than the benchmark (per target)",
        "",
        "An engine can serve slower than its benchmark for a few usual reasons; each, with the figure that confirms or "
        "rules it out: the profile's shape against the served batches (ms/image at batch 1 against the main "
        "batch: the price of serving small batches without a batcher), queueing in the p99 at 90% of the max rate, the "
        "precision asked for against the one that ran, and preprocessing per frame (kiln's own, on a 640x480 JPEG) with its "
        "share of the end-to-end per-frame cost, and, with `serving.contention: true`, the slow-down when a second copy of the "
        "engine runs beside it on the same device (two different engines: `kiln contention <a> <b>`)"
        + ("." if contended else "; not measured in this run."),
        "",
        "| target | profile vs traffic | ms/image at batch 1 vs main batch | queue share of p99 | precision requested -> executed "
        "| preprocessing ms/frame (share) |" + (" contention |" if contended else ""),
        "|---|---|---:|---:|---|---:|" + ("---|" if contended else ""),
        *rows,
    ]


def _contention(c: Mapping[str, Any] | None) -> str:
    if not c:
        return "not measured"
    return f"{c['slowdown']:.2f}x beside a second copy"


def curve_rows(built: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every offered rate each target was measured at, for the latency-throughput plot (reports/serving.csv)."""
    rows = []
    for name, res in built.items():
        o = res["run"].get("open_loop")
        if not o:
            continue
        points = [(r, p99, ok) for r, p99, ok in o["search"]["tried"]]
        for extra in (o.get("at_50pct"), o.get("at_90pct"), *(o.get("curve") or [])):
            if extra:
                points.append((extra["rate"], extra["e2e_p99_ms"], extra["e2e_p99_ms"] <= o["slo_ms"] and not extra["saturated"]))
        for rate, p99, ok in sorted(points):
            if p99 is not None and p99 == p99 and p99 != float("inf"):
                rows.append({"target": name, "offered_rate": round(rate, 3), "p99_ms": round(p99, 3), "within_slo": bool(ok)})
    return rows


def curve_csv(rows: list[dict[str, Any]]) -> str:
    lines = [",".join(CURVE_COLUMNS)] + [",".join(str(r[c]) for c in CURVE_COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"


def _decided_line(o: Mapping[str, Any]) -> str:
    """How a probe's p99 was judged: decided at a confidence (LoadGen's early stopping), or its point value."""
    confidence = (o.get("search") or {}).get("confidence")
    if confidence is None:
        return ""
    return (
        f" A probe's p99 counts as within or over the objective when its requests decide it at {confidence:.0%} confidence "
        "(MLPerf LoadGen's early-stopping rule, its first third left out as warm-up); a probe they do not decide is undecided."
    )
