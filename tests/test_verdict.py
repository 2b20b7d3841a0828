"""The report's answer first: the engine to ship and why, what was passed over, recommendations offered only when
measured better, and changes within the measured noise said as such. Hand-made run records, no runtimes."""

from __future__ import annotations

import copy

import numpy as np
from test_serving_and_report import run_record

from kiln.measure.benchmark import headline_metrics
from kiln.report.changes import compare
from kiln.report.experiments import table
from kiln.report.markdown import render
from kiln.report.sections import compared_section
from kiln.report.verdict import OVER_BUDGET_MARK, verdict
from kiln.serving.recommend import judge_recommendation
from kiln.serving.slo import max_rate_at_slo

OVER = {"violations": ["top1_agreement 0.9 < min_top1_agreement 0.99"], "enforced": False, "limits": {}}


def candidates():
    """fp32 (100 images/s) and slow (50) are clean; int8 (500) is over its budget, bf16 (200) ran in f32, noisy (333)
    has a noisy main-batch timing, fp16 was skipped."""
    results = {name: run_record(name, ms) for name, ms in (("fp32", 10.0), ("int8", 2.0), ("bf16", 5.0), ("noisy", 3.0), ("slow", 20.0))}
    results["int8"]["run"]["budget"] = OVER
    results["int8"]["run"]["accuracy"]["top1_agreement"] = 0.9
    results["bf16"]["run"]["precision"] = {"requested": "bf16", "executed": "f32"}
    results["noisy"]["run"]["latency"]["b8"].update(noisy=True, robust_cv=0.25)
    results["fp16"] = {"metrics": {}, "run": {"target": "fp16", "skipped": "no fp16 here", "precision": {"requested": "fp16"}}}
    return results


def test_the_fastest_engine_over_its_budget_is_not_the_one_to_ship():
    v = verdict(candidates())
    assert v["reading"]["kind"] == "main"
    assert v["ship"]["target"] == "fp32" and v["runner_up"]["target"] == "slow"
    passed = {p["target"]: p["reasons"] for p in v["passed_over"]}
    assert [p["target"] for p in v["passed_over"]] == ["int8", "noisy", "bf16"]  # every faster one, fastest first
    assert passed["int8"] == [
        "over its accuracy budget (top1_agreement 0.9 < min_top1_agreement 0.99; not enforced: "
        "random weights or benchmark.fail_on_budget off)"
    ]
    assert passed["bf16"] == ["asked for bf16 but executed f32"]
    assert passed["noisy"] == ["its batch-8 timing stayed noisy (spread 25%)"]
    assert v["not_run"] == [{"target": "fp16", "reason": "no fp16 here"}]

    md = render(candidates(), None, "fp32")
    lines = md.splitlines()
    assert lines[2].startswith("Ship: `fp32` — the most images/s at its main batch (100.0 images/s)")
    assert "Runner-up: `slow` (50.0 images/s, 50% below)." in md
    assert "- `int8` (500.0 images/s): over its accuracy budget (top1_agreement 0.9 < min_top1_agreement 0.99" in md
    assert "Reading: images/s at each target's main batch" in md
    assert md.index("Ship:") < md.index("Machine:") < md.index("## Summary")
    # Over-budget rows are marked in every table they appear in, with the legend; the clean ones are not.
    assert f"{OVER_BUDGET_MARK} after a target's name or its agreement figure: over its accuracy budget" in md
    assert f"| int8 | fp32 | 8 | 2.000 | 500.0 | 5.00x | 0.900 {OVER_BUDGET_MARK} |" in md
    assert "| int8 | onnxruntime | fp32 -> fp32 | 2 | 8 (opt) |" in md and f"| 0.900 {OVER_BUDGET_MARK} |" in md
    assert f"| {OVER_BUDGET_MARK} over: top1_agreement 0.9 < min_top1_agreement 0.99 (not enforced) |" in md
    assert f"fp32 {OVER_BUDGET_MARK}" not in md and f"1.000 {OVER_BUDGET_MARK}" not in md


def test_an_enforced_budget_says_so_and_nothing_clean_means_no_pick():
    results = candidates()
    for name in ("fp32", "slow"):
        results[name]["run"]["budget"] = {**OVER, "enforced": True}
    v = verdict(results)
    assert v["ship"] is None and v["runner_up"] is None
    assert {p["target"] for p in v["passed_over"]} == {"fp32", "slow", "int8", "bf16", "noisy"}
    assert any("; enforced)" in r for p in v["passed_over"] for r in p["reasons"])
    assert render(results, None, "fp32").splitlines()[2].startswith("Ship: none — ")


def test_served_traffic_decides_when_every_target_was_served_under_load():
    results = candidates()
    del results["fp16"]
    # Under open-loop load the slow engine holds the highest rate within the objective: it ships, not fp32.
    for name, rate, tried in (("fp32", 30.0, 36.0), ("slow", 40.0, 50.0), ("int8", 90.0, 99.0), ("bf16", 10.0, 12.0), ("noisy", 5.0, 6.0)):
        results[name]["run"]["open_loop"] = {**open_loop(rate, rate, tried), "slo_ms": 100.0}
    v = verdict(results)
    assert v["reading"]["kind"] == "open_loop"
    assert v["ship"]["target"] == "slow" and v["runner_up"]["target"] == "fp32"
    assert not v["runner_up"]["close"]  # fp32 failed at 36 requests/s, below the 40 slow held
    assert [p["target"] for p in v["passed_over"]] == ["int8"]  # the only one that held more
    md = render(results, None, "fp32")
    assert "Ship: `slow` — the highest request rate within the 100 ms p99 objective (40.0 requests/s)" in md
    assert "Reading: max requests/s within the 100 ms p99 objective under open-loop load" in md
    results["fp32"]["run"]["open_loop"]["search"]["tried"][1] = [45.0, 500.0, False]  # fp32 failed only above 40: can't tell them apart
    assert verdict(results)["runner_up"]["close"]


def test_an_erratic_rate_search_ranks_nothing_and_served_traffic_decides():
    results = candidates()
    del results["fp16"]
    for name, rate in (("fp32", 30.0), ("slow", 40.0), ("int8", 90.0), ("bf16", 10.0), ("noisy", 5.0)):
        results[name]["run"]["open_loop"] = {**open_loop(rate, rate, rate * 1.2), "slo_ms": 100.0}
        ips = {"fp32": 95.0, "slow": 48.0}.get(name, 10.0)
        results[name]["run"]["served"] = {"distribution": {"1": 1.0}, "requests": 60, "p50_ms": 1e3 / ips, "p90_ms": 1e3 / ips}
        results[name]["run"]["served"].update(p99_ms=1e3 / ips, ms_per_image=1e3 / ips, images_per_s=ips)
    results["slow"]["run"]["open_loop"]["search"]["reason"] = "bisected; ... latency at these rates is erratic (a noisy machine?)"
    v = verdict(results)
    # The erratic 40 requests/s of `slow` would have won on rates; on served images/s fp32 is twice as fast.
    assert v["reading"]["kind"] == "served" and v["ship"]["target"] == "fp32"
    assert "`slow` (erratic" in v["reading"]["instead"] and "did not settle" in v["reading"]["instead"]
    assert "Reading: served images/s" in render(results, None, "fp32") and "did not settle for `slow`" in render(results, None, "fp32")
    results["slow"]["run"]["open_loop"]["search"]["reason"] = "bisected"
    assert verdict(results)["reading"]["kind"] == "open_loop" and verdict(results)["ship"]["target"] == "slow"


def open_loop(current_rate, recommended_rate, failed_at):
    return {
        "slo_ms": 250.0,
        "sizes": {"1": 0.7, "8": 0.3},
        "batcher": {"max_batch": 8, "max_queue_delay_ms": 5.0, "workers": 1},
        "max_rate_at_slo": current_rate,
        "p99_ms_at_max": 130.0,
        "search": {"tried": [[3.0, 11.0, True], [failed_at, 500.0, False], [current_rate, 130.0, True]], "reason": "bisected"},
        "recommended": {
            "profile": {"min": 1, "opt": 8, "max": 8},
            "batcher": {"max_batch": 8, "max_queue_delay_ms": 106.135, "workers": 1},
            "changed": True,
            "why": "max 8: fits.",
            "warnings": [],
            "override": "kiln params targets.ov.profile.min=1 targets.ov.profile.opt=8 targets.ov.profile.max=8",
        },
        "recommended_max_rate_at_slo": recommended_rate,
    }


def test_a_recommendation_measured_worse_is_not_offered():
    worse = judge_recommendation(open_loop(96.1, 54.0, 104.6))
    assert not worse["better"] and worse["apply"] is None
    assert worse["why"] == (
        "the current setting stands (max_batch 8, max_queue_delay_ms 5): 54.0 requests/s within the objective with the "
        "recommended batcher against 96.1 with the current one"
    )
    res = run_record("ov", 5.0)
    res["run"]["open_loop"] = open_loop(96.1, 54.0, 104.6)
    md = render({"ov": res}, None, "ov")
    assert "Apply:" not in md and "kiln params" not in md
    assert "- `ov`: the current setting stands (max_batch 8, max_queue_delay_ms 5): 54.0 requests/s" in md

    # Better, but by less than the search's step (the current batcher never failed below 100): not measured better.
    close = judge_recommendation(open_loop(96.1, 99.0, 100.0))
    assert not close["better"] and "within the rate search's step" in close["why"]
    # Better by a rate the current batcher failed at: offered, with the serving settings it was measured with.
    better = judge_recommendation(open_loop(48.2, 93.4, 55.8))
    assert better["better"] and better["apply"] == (
        "kiln params targets.ov.profile.min=1 targets.ov.profile.opt=8 targets.ov.profile.max=8 "
        "serving.max_batch=8 serving.max_queue_delay_ms=106.1"
    )
    unmeasured = {**open_loop(48.2, None, 55.8), "recommended_note": "outside this engine's profile"}
    assert judge_recommendation(unmeasured)["apply"] is None and "not measured" in judge_recommendation(unmeasured)["why"]


def test_the_lowest_rate_failing_with_a_fast_engine_does_not_blame_the_engine():
    class Busy:
        def __init__(self, compute_ms):
            self.e2e_ms = np.full(50, 400.0)
            self.compute_ms = np.full(50, compute_ms)

        def saturation(self):
            return "the queue kept growing"

    fast = max_rate_at_slo(lambda r: Busy(2.0), 100.0, lo=1.0, hi=20.0)
    assert fast["max_rate"] == 0.0 and "faster engine" not in fast["reason"]
    assert "far below the 100 ms objective, so the engine is not the cause" in fast["reason"]
    assert "serving.seconds_per_rate" in fast["reason"]
    slow = max_rate_at_slo(lambda r: Busy(80.0), 100.0, lo=1.0, hi=20.0)
    assert "a faster engine" in slow["reason"]


def test_a_change_within_the_measured_noise_is_said_as_such():
    metrics = headline_metrics(8, {"ms_per_image": 5.0, "images_per_s": 200.0, "robust_cv": 0.0312}, {}, None)
    assert metrics["ms_per_image_spread_pct"] == 3.1
    before = {"ms_per_image": 5.0, "images_per_s": 200.0, "ms_per_image_spread_pct": 3.1, "top1_agreement": 1.0}
    noise = {"ms_per_image": 5.1, "images_per_s": 196.1, "ms_per_image_spread_pct": 2.0, "top1_agreement": 1.0}  # +2%: within 3.1%
    real = {"ms_per_image": 4.0, "images_per_s": 250.0, "ms_per_image_spread_pct": 2.0, "top1_agreement": 1.0}  # -20%
    assert compare("ms_per_image", before, noise, False)["within_noise"]
    assert not compare("ms_per_image", before, real, False)["within_noise"]
    # Without a spread on either side there is no noise band: a change is a change.
    bare = {k: v for k, v in before.items() if k != "ms_per_image_spread_pct"}
    assert not compare("ms_per_image", bare, {"ms_per_image": 5.1}, False)["within_noise"]

    section = "\n".join(compared_section({"a": noise, "b": real}, {"a": before, "b": before}, "HEAD"))
    assert "| a | ms/image | 5 | 5.1 | +2.0%, within noise (spread 3.1%) |" in section
    assert "| b | ms/image | 5 | 4 | -20.0% (better) |" in section

    rows = [
        {"name": "workspace", "params": {"p": 1}, "metrics": {"ov": before}},
        {"name": "exp-noise", "params": {"p": 2}, "metrics": {"ov": noise}},
        {"name": "exp-real", "params": {"p": 3}, "metrics": {"ov": copy.deepcopy(real)}},
    ]
    out = table(rows)
    assert "| workspace | p=1 | ov | 5 | 200.0 | 1.0000 |  | ±3.1% |" in out  # the reference row: no change
    assert "| exp-noise | p=2 | ov | 5.1 (within noise) | 196.1 (within noise) | 1.0000 |  | ±2% |" in out
    assert "| exp-real | p=3 | ov | 4 (-20.0%) | 250.0 (+25.0%) | 1.0000 |  | ±2% |" in out


def test_a_target_timed_beside_other_work_is_named_under_the_verdict():
    results = candidates()
    quiet = {"cores": 2, "others": 0.01, "steal": 0.0, "busy": False}
    for r in results.values():
        r["run"]["machine_load"] = {"before": quiet, "after": quiet, "busy": False}
    assert verdict(results)["busy"] == [] and "Timed while other work" not in render(results, None, "fp32")
    busy = {"cores": 2, "others": 0.9, "steal": 0.1, "busy": True}
    results["slow"]["run"]["machine_load"] = {"before": quiet, "after": busy, "busy": True}
    v = verdict(results)
    assert v["busy"] == [{"target": "slow", "others": 0.9}]
    head = render(results, None, "fp32").split("## ")[0]  # on the first screen, with the verdict
    assert "Timed while other work used the cores: `slow` (0.90 cores)" in head
