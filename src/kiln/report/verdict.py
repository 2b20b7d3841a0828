"""The verdict: the engine to ship for the configured objective, the runner-up, and why each faster engine
was passed over, from the run records (`reports/runs/<target>.json`, as `kiln.report.markdown.load_results` loads
them). One function, `verdict`, so the markdown report and anything else that shows the answer say the same.

The rule:

- the reading: where every built target was served under open-loop load, the highest request rate within
  the p99 objective (`open_loop.max_rate_at_slo`), unless a search did not settle (erratic, or only its lowest
  probe held: such rates rank nothing, and the served images/s are used instead, saying why); else, where
  every one served the configured traffic, served images/s (`served.images_per_s`); else images/s at the main
  batch (the profile's opt). One reading for all, so the figures compare.
- a target is eligible when it ran here, is within its accuracy budget (enforced or not: a budget not
  enforced because the weights are random still says the engine computes something else), executed the
  precision it asked for, and its reading is not marked noisy.
- ship: the eligible target with the best reading; runner-up: the next one. Every target with a better
  reading than the pick is listed as passed over, with its reasons; skipped targets are listed apart.
"""

from __future__ import annotations

from typing import Any, Mapping

from kiln.serving.recommend import rate_step

OVER_BUDGET_MARK = "✗"
# A runtime's words for the precision it executed (OpenVINO: f32, u8; torch: "bf16 autocast"), as the precision names.
EXECUTED = {"f32": "fp32", "fp32": "fp32", "f16": "fp16", "fp16": "fp16", "bf16": "bf16", "u8": "int8", "i8": "int8", "int8": "int8"}
EXECUTED.update({"fp8": "fp8", "f8e4m3": "fp8"})
NOT_ENFORCED = "not enforced: random weights or benchmark.fail_on_budget off"


def budget_violations(run: Mapping[str, Any]) -> list[str]:
    return list((run.get("budget") or {}).get("violations") or [])


def target_cell(name: str, run: Mapping[str, Any]) -> str:
    """A target's name in a table, marked when it is over its accuracy budget (enforced or not)."""
    return f"{name} {OVER_BUDGET_MARK}" if budget_violations(run) else name


def mark_over_budget(run: Mapping[str, Any]) -> str:
    """The mark to put after a figure of an over-budget target (for tables whose name cell must stay plain)."""
    return f" {OVER_BUDGET_MARK}" if budget_violations(run) else ""


def legend(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not any(budget_violations(r["run"]) for r in results.values() if not r["run"].get("skipped")):
        return []
    return [
        f"{OVER_BUDGET_MARK} after a target's name or its agreement figure: over its accuracy budget, whether or not the "
        "budget is enforced (the accuracy table says by how much); such a target is never the one to ship.",
        "",
    ]


def executed_as_requested(precision: Mapping[str, Any] | None) -> bool:
    """False when the engine's dominant executed precision is another than the one asked for ('f32' for bf16)."""
    requested, executed = (precision or {}).get("requested"), (precision or {}).get("executed")
    if not requested or not executed:
        return True
    dominant = EXECUTED.get(str(executed).split(",")[0].split()[0].lower())
    return dominant is None or dominant == EXECUTED.get(str(requested).lower(), str(requested).lower())


def _main_stats(run: Mapping[str, Any]) -> Mapping[str, Any]:
    return (run.get("latency") or {}).get(f"b{run.get('main_batch')}") or {}


READINGS = {
    "open_loop": "max requests/s within the {slo:g} ms p99 objective under open-loop load (the served sizes, a dynamic batcher)",
    "served": "served images/s (requests drawn one after another from the served batch-size distribution)",
    "main": "images/s at each target's main batch (its profile's opt), one request at a time",
}
UNITS = {"open_loop": "requests/s", "served": "images/s", "main": "images/s"}
BEST = {
    "open_loop": "the highest request rate within the {slo:g} ms p99 objective",
    "served": "the most images/s on the served traffic",
    "main": "the most images/s at its main batch",
}


# search.unsettled (kiln.serving.slo) -> how the verdict names it.
UNSETTLED = {
    "erratic": "erratic: its rate did not hold with other arrivals",
    "lowest-only": "only its lowest probe held",
    "undecided": "undecided: too few requests to decide its p99 at the stated confidence",
    "too-short": "its probes were too short to settle",
    "unsteady": "unsteady: the machine's speed changed during its search",
}


def _unsettled(run: Mapping[str, Any]) -> str | None:
    """Why a target's open-loop rate is not a measured maximum (kiln.serving.slo: search.settled), or None."""
    search = run["open_loop"].get("search") or {}
    code, reason = search.get("unsettled"), search.get("reason") or ""
    if code in UNSETTLED:
        return UNSETTLED[code]
    # Run records from before the search named why in one word: read it from the reason.
    if "erratic" in reason:
        return UNSETTLED["erratic"]
    if search.get("settled") is False:
        return UNSETTLED["lowest-only"] if "only the lowest probe" in reason else "not settled: " + reason.split(":")[0]
    return None


def _reading_kind(built: Mapping[str, Mapping[str, Any]]) -> tuple[str, str | None]:
    """(the reading, why a better one was not used or None)."""
    runs = {n: r["run"] for n, r in built.items()}
    served = bool(runs) and all((r.get("served") or {}).get("images_per_s") is not None for r in runs.values())
    if runs and all(r.get("open_loop") for r in runs.values()):
        unsettled = {n: why for n, r in sorted(runs.items()) if (why := _unsettled(r))}
        if not (unsettled and served):
            return "open_loop", None
        # A rate a search could not settle ranks nothing: the probes were too short for this engine or the machine.
        return "served", (
            "the open-loop rate searches did not settle for "
            + ", ".join(f"`{n}` ({why})" for n, why in unsettled.items())
            + ", so the rates do not rank the engines; a longer search (study=deep, or serving.seconds_per_rate) may settle them"
        )
    if served:
        return "served", None
    return "main", None


def _value(run: Mapping[str, Any], kind: str) -> float | None:
    if kind == "open_loop":
        return run["open_loop"].get("max_rate_at_slo")
    if kind == "served":
        return run["served"].get("images_per_s")
    return _main_stats(run).get("images_per_s")


def _noise(run: Mapping[str, Any], kind: str) -> str | None:
    """Why this target's reading cannot be trusted, where the run record says so."""
    if kind == "open_loop":
        why = _unsettled(run)
        return f"its rate search did not settle ({why})" if why else None
    stats = _main_stats(run)
    if stats.get("noisy"):
        spread = stats.get("robust_cv", stats.get("cv"))
        return f"its batch-{run.get('main_batch')} timing stayed noisy" + (f" (spread {spread:.0%})" if spread is not None else "")
    return None


def _reasons(run: Mapping[str, Any], kind: str) -> list[str]:
    reasons = []
    violations = budget_violations(run)
    if violations:
        budget = run.get("budget") or {}
        why = budget.get("why_not_enforced")  # which rule applied (kiln.accuracy.budgets.judge_budget); older records lack it
        state = "enforced" if budget.get("enforced") else f"not enforced: {why}" if why else NOT_ENFORCED
        reasons.append(f"over its accuracy budget ({'; '.join(violations)}; {state})")
    prec = run.get("precision") or {}
    if not executed_as_requested(prec):
        reasons.append(f"asked for {prec.get('requested')} but executed {prec.get('executed')}")
    noise = _noise(run, kind)
    if noise:
        reasons.append(noise)
    return reasons


def _close(a: Mapping[str, Any], b: Mapping[str, Any], kind: str, va: float, vb: float) -> bool:
    """Whether the gap between two readings (va >= vb) is within what the measurement can tell apart."""
    if kind == "open_loop":
        step = rate_step(b["open_loop"])
        return step is not None and va < step
    if kind == "main":
        spreads = [s for s in (_main_stats(a).get("robust_cv"), _main_stats(b).get("robust_cv")) if s is not None]
        return bool(spreads) and vb > 0 and (va - vb) / vb <= max(spreads)
    return False


def verdict(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{"reading": {kind, what, unit, best}, "ship": {target, value, why} | None, "runner_up": {target, value, close} | None,
    "passed_over": [{target, value, reasons}] (every target read better than the pick, best first),
    "not_run": [{target, reason}] (skipped on this machine), "busy": [{target, others}] (timed beside other work, in cores)}."""
    not_run = [{"target": n, "reason": r["run"]["skipped"]} for n, r in results.items() if r["run"].get("skipped")]
    built = {n: r for n, r in results.items() if not r["run"].get("skipped")}
    kind, instead = _reading_kind(built)
    slo = next((r["run"]["open_loop"].get("slo_ms") for r in built.values() if r["run"].get("open_loop")), 0.0)
    reading = {"kind": kind, "what": READINGS[kind].format(slo=slo or 0.0), "unit": UNITS[kind], "best": BEST[kind].format(slo=slo or 0.0)}
    reading["instead"] = instead
    ranked = []
    for name, res in built.items():
        value = _value(res["run"], kind)
        reasons = _reasons(res["run"], kind) if value is not None else ["no figure for this reading in its run record"]
        ranked.append((-(value if value is not None else float("-inf")), name, value, reasons))
    ranked.sort()
    eligible = [(name, value) for _, name, value, reasons in ranked if not reasons]
    ship = runner_up = None
    if eligible:
        name, value = eligible[0]
        ship = {"target": name, "value": value}
        if len(eligible) > 1:
            other, other_value = eligible[1]
            close = _close(built[name]["run"], built[other]["run"], kind, value, other_value)
            runner_up = {"target": other, "value": other_value, "close": close}
    top = ship["value"] if ship else None
    passed = [
        {"target": name, "value": value, "reasons": reasons}
        for _, name, value, reasons in ranked
        if reasons and (top is None or (value is not None and value > top))
    ]
    if ship:
        ship["why"] = (
            f"{reading['best']} ({ship['value']:.1f} {reading['unit']}) among the engines within their accuracy budget "
            "that ran as asked"
            + (f"; {len(passed)} faster {'engine was' if len(passed) == 1 else 'engines were'} passed over" if passed else "")
        )
    busy = [{"target": n, "others": _busy_cores(r["run"])} for n, r in built.items() if (r["run"].get("machine_load") or {}).get("busy")]
    return {"reading": reading, "ship": ship, "runner_up": runner_up, "passed_over": passed, "not_run": not_run, "busy": busy}


def _busy_cores(run: Mapping[str, Any]) -> float:
    load = run["machine_load"]
    return max((load.get(k) or {}).get("others") or 0.0 for k in ("before", "after"))


def verdict_lines(v: Mapping[str, Any]) -> list[str]:
    """The report's opening: the pick and why, the runner-up, what was passed over and why, and the reading used."""
    unit = v["reading"]["unit"]
    ship, runner = v["ship"], v["runner_up"]
    if ship:
        lines = [f"Ship: `{ship['target']}` — {ship['why']}.", ""]
    else:
        lines = ["Ship: none — no engine is within its accuracy budget, ran the precision it asked for and was measured cleanly.", ""]
    if runner:
        gap = (ship["value"] - runner["value"]) / ship["value"] * 100 if ship["value"] else 0.0
        lines += [
            f"Runner-up: `{runner['target']}` ({runner['value']:.1f} {unit}, {gap:.0f}% below"
            + ("; within what the measurement can tell apart, so either will do" if runner["close"] else "")
            + ").",
            "",
        ]
    if v["passed_over"]:
        lines += ["Passed over" + (" (faster than the pick)" if ship else "") + ":", ""]
        lines += [
            f"- `{p['target']}` ({'n/a' if p['value'] is None else format(p['value'], '.1f')} {unit}): {'; '.join(p['reasons'])}."
            for p in v["passed_over"]
        ]
        lines.append("")
    if v.get("busy"):
        names = ", ".join(f"`{b['target']}` ({b['others']:.2f} cores)" for b in v["busy"])
        lines += [
            f"Timed while other work used the cores: {names}. Their figures are low and the ranking may be off: run "
            "`dvc repro --force` for those benchmark stages on a quiet machine.",
            "",
        ]
    if v["not_run"]:
        names = ", ".join(f"`{n['target']}`" for n in v["not_run"])
        lines += [f"Not run on this machine: {names} (the reasons are under the latency table).", ""]
    why = f", because {v['reading']['instead']}" if v["reading"].get("instead") else _why_reading(v["reading"]["kind"])
    lines += [f"Reading: {v['reading']['what']}" + why + ".", ""]
    return lines


def _why_reading(kind: str) -> str:
    if kind == "open_loop":
        return ", because serving traffic and an objective are configured (`serve`, `serving`)"
    if kind == "served":
        return ", because served traffic is configured (`serve`) without an open-loop run for every target"
    return ", because no served traffic was measured for every target"
