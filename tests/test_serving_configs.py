"""The serving configuration search (model_analyzer's hill climbing, its Pareto front), the served/offline ratio
and its factors, and the steadiness check around a search, on synthetic figures and on a real ONNX Runtime engine."""

from __future__ import annotations

import math

import pytest

from kiln.config.views import Target
from kiln.measure.benchmark import BenchmarkSettings, benchmark_latency, benchmark_throughput
from kiln.pipeline.engine import build_engine, load_engine
from kiln.runtimes import BuildSource
from kiln.serving.configs import Axes, ServingConfig, best_config, hill_climb, pareto_front
from kiln.serving.offline import served_vs_offline
from kiln.serving.run import ServingSettings, serve_under_load

# Its figures are timed: run alone, before the two-worker phase (test.sh)
pytestmark = pytest.mark.timing

DELAY_GAIN = {1.0: 0.9, 5.0: 1.0, 20.0: 0.95}


def landscape(config: ServingConfig) -> dict:
    """A separable, single-peaked rate: more batch and a second worker help, 5 ms is the best delay."""
    rate = 10 * config.max_batch**0.5 * (1.6 if config.workers == 2 else 1.0) * DELAY_GAIN[config.max_queue_delay_ms]
    return {"max_rate": rate, "p99_ms_at_max": 50 + 5 * config.max_batch + config.max_queue_delay_ms}


AXES = Axes((1, 2), (1, 2, 4, 8), (1.0, 5.0, 20.0))


def test_hill_climb_reaches_the_peak_without_trying_the_whole_grid():
    calls = []

    def evaluate(c):
        calls.append(c)
        return landscape(c)

    result = hill_climb(evaluate, ServingConfig(1, 1, 5.0), AXES, budget_s=1e9)
    assert result["stopped"] == "converged"
    assert result["chosen"] == {"workers": 2, "max_batch": 8, "max_queue_delay_ms": 5.0}
    assert len(calls) == len(set(calls)) < 2 * 4 * 3  # each configuration once, fewer than the 24 of the grid
    chosen = [p for p in result["points"] if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["max_rate"] == max(p["max_rate"] for p in result["points"])


def test_hill_climb_stops_before_its_budget_at_the_pace_so_far():
    now = [0.0]

    def evaluate(c):
        now[0] += 10.0  # every configuration's search takes 10 s
        return landscape(c)

    result = hill_climb(evaluate, ServingConfig(1, 1, 5.0), AXES, budget_s=35.0, clock=lambda: now[0])
    # 10 s (start), 20 s, 30 s; a fourth would end at 40 s, past 35.
    assert result["stopped"] == "budget" and len(result["points"]) == 3 and now[0] == 30.0


def test_a_gain_within_the_noise_is_not_a_move():
    def evaluate(c):  # a second worker gains 3%, below MIN_GAIN; nothing else helps
        return {"max_rate": 100.0 * (1.03 if c.workers == 2 else 1.0) * (1.0 if c.max_batch == 1 else 0.5), "p99_ms_at_max": 80.0}

    result = hill_climb(evaluate, ServingConfig(1, 1, 5.0), AXES, budget_s=1e9)
    assert result["stopped"] == "converged"
    # The start's neighbours were tried, none was moved to: nothing two steps away was evaluated.
    assert {(p["workers"], p["max_batch"], p["max_queue_delay_ms"]) for p in result["points"]} == {
        (1, 1, 5.0),
        (1, 2, 5.0),
        (2, 1, 5.0),
        (1, 1, 20.0),
        (1, 1, 1.0),
    }
    assert result["chosen"]["workers"] == 2  # the best is still the highest rate, however small its gain


def test_pareto_front_keeps_only_the_undominated():
    a, b, c, d, e = (ServingConfig(1, m, 5.0) for m in (1, 2, 4, 8, 16))
    points = {
        a: {"max_rate": 10.0, "p99_ms_at_max": 20.0},  # lowest latency: on the front
        b: {"max_rate": 20.0, "p99_ms_at_max": 30.0},  # on the front
        c: {"max_rate": 15.0, "p99_ms_at_max": 40.0},  # dominated by b
        d: {"max_rate": 30.0, "p99_ms_at_max": 90.0},  # highest rate: on the front
        e: {"max_rate": 0.0, "p99_ms_at_max": math.nan},  # held no rate: never on the front
    }
    assert pareto_front(points) == [d, b, a]
    assert best_config(points) == d
    tie = {a: {"max_rate": 30.0, "p99_ms_at_max": 50.0}, d: {"max_rate": 30.0, "p99_ms_at_max": 40.0}}
    assert best_config(tie) == d  # equal rates: the lower p99


def test_axes_neighbours_step_one_axis_one_value():
    axes = Axes.around(ServingConfig(1, 4, 3.0), workers=[1, 2], batches=[1, 2, 4, 8], delays=[1, 5, 20])
    assert axes.max_queue_delay_ms == (1.0, 3.0, 5.0, 20.0)  # the start's own delay joins its axis
    got = {(c.workers, c.max_batch, c.max_queue_delay_ms) for c in axes.neighbours(ServingConfig(1, 4, 3.0))}
    assert got == {(1, 8, 3.0), (1, 2, 3.0), (2, 4, 3.0), (1, 4, 5.0), (1, 4, 1.0)}


LATENCY = {"b1": {"p50_ms": 10.0}, "b4": {"p50_ms": 20.0}, "b8": {"p50_ms": 36.0}}


def open_loop(rate: float, mean_batch: float, slo_ms: float = 250.0) -> dict:
    return {"max_rate_at_slo": rate, "sizes": {"1": 1.0}, "slo_ms": slo_ms, "at_max": {"mean_batch": mean_batch}}


def test_served_vs_offline_factors_multiply_to_the_ratio_and_name_the_smallest():
    out = served_vs_offline(open_loop(50.0, 2.0), LATENCY, {"batch": 8, "images_per_s": 400.0, "requests_in_flight": 4})
    assert out["served_images_per_s"] == 50.0 and out["ratio"] == pytest.approx(50.0 / 400.0)
    f = out["factors"]
    # closed loop at batch 8: 8 / 36 ms; at the mean batch 2: interpolated 13.33 ms
    assert f["instances"] == pytest.approx((8 / 0.036) / 400.0)
    assert f["batching"] == pytest.approx((2 / (40 / 3 / 1e3)) / (8 / 0.036))
    assert f["instances"] * f["batching"] * f["busy"] == pytest.approx(out["ratio"])
    assert out["eaten_by"] == "busy" and "queueing" in out["why"] and out["objective_allows"]
    # Busy engine, full batches, one request in flight: the instances factor is what is left.
    busy = served_vs_offline(open_loop(200.0, 8.0), LATENCY, {"batch": 8, "images_per_s": 400.0, "requests_in_flight": 4})
    assert busy["eaten_by"] == "instances"
    # At or above 0.75x nothing is named; an objective too tight for the offline batch is said.
    good = served_vs_offline(open_loop(200.0, 8.0), LATENCY, {"batch": 8, "images_per_s": 222.0, "requests_in_flight": 1})
    assert good["ratio"] >= 0.75 and good["eaten_by"] is None
    tight = served_vs_offline(open_loop(20.0, 1.0, slo_ms=50.0), LATENCY, {"batch": 8, "images_per_s": 400.0})
    assert not tight["objective_allows"] and "cannot hold a batch of 8" in tight["why"]
    # Without a throughput mode the best closed-loop batch stands in; no rate, no ratio.
    closed = served_vs_offline(open_loop(50.0, 2.0), LATENCY, {"batch": 8, "images_per_s": None})
    assert closed["offline_images_per_s"] == pytest.approx(8 / 0.036) and closed["factors"]["instances"] == pytest.approx(1.0)
    assert served_vs_offline(open_loop(0.0, 0.0), LATENCY, None) is None


def test_configuration_search_on_a_real_engine(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    raw = {"runtime": "onnxruntime", "threads": 1, "profile": {"min": 1, "opt": 2, "max": 4}, "serve": {1: 0.7, 2: 0.3}}
    target = Target.from_params("ort", {"targets": {"ort": raw}})
    build_engine(target, BuildSource(path, spec), tmp_path / "e")
    session, _ = load_engine(tmp_path / "e", target)
    bench = BenchmarkSettings(batch_sizes=(1, 2, 4), warmup_iters=2, min_iters=10, min_time_s=0.05, noisy_max_time_s=0.2)
    latency, _, _ = benchmark_latency(session, spec.inputs, target.profile, bench, progress=False)
    throughput = benchmark_throughput(session, spec.inputs, 2, bench)
    settings = ServingSettings(
        slo_ms=200.0,
        seconds_per_rate=0.2,
        min_requests=20,
        confidence=0.5,
        max_seconds_per_rate=0.5,
        search_iterations=1,
        max_queue_delay_ms=1.0,
        search_configs=True,
        config_budget_s=8.0,
        config_workers=(1, 2),
        config_delays_ms=(1.0, 5.0),
    )
    record = serve_under_load(session, spec.inputs, target, latency, settings, throughput)
    configs = record["configs"]
    points = configs["points"]
    keys = [(p["workers"], p["max_batch"], p["max_queue_delay_ms"]) for p in points]
    assert len(points) >= 2 and len(set(keys)) == len(keys)  # the start and at least one neighbour, each once
    assert configs["start"] == {"workers": 1, "max_batch": 2, "max_queue_delay_ms": 1.0}
    assert {w for w, _, _ in keys} <= {1, 2} and {b for _, b, _ in keys} <= {1, 2, 4}
    (chosen,) = [p for p in points if p["chosen"]]
    assert chosen["max_rate"] == max(p["max_rate"] for p in points) > 0 and chosen["pareto"]
    front = [p for p in points if p["pareto"]]
    for p in front:  # nothing tried beats a front point on both axes
        assert not any(q["max_rate"] > p["max_rate"] and q["p99_ms_at_max"] < p["p99_ms_at_max"] for q in points)
    assert configs["vs_offline"]["served_images_per_s"] == pytest.approx(chosen["max_rate"] * 1.3)
    vs = record["vs_offline"]
    assert vs["ratio"] == pytest.approx(vs["served_images_per_s"] / vs["offline_images_per_s"])
    assert vs["served_images_per_s"] == pytest.approx(record["max_rate_at_slo"] * 1.3)  # mean served size 0.7 + 0.6
    assert record["at_max"]["mean_batch"] >= 1.0
    steady = record["steady"]
    assert steady["before_p50_ms"] > 0 and steady["change"] == pytest.approx(steady["after_p50_ms"] / steady["before_p50_ms"])


def test_report_shows_the_ratio_its_factors_the_front_and_an_unsteady_search():
    from mdtables import assert_row
    from test_serving_and_report import run_record

    from kiln.report.markdown import render

    res = run_record("ort", 5.0)
    o = open_loop(50.0, 2.0)
    o.update(
        batcher={"max_batch": 8, "max_queue_delay_ms": 5.0, "workers": 1},
        p99_ms_at_max=90.0,
        search={"tried": [[2.0, 10.0, True], [50.0, 90.0, True]], "reason": "bisected", "settled": True},
        steady={"steady": False, "why": "the engine's closed-loop median moved from 5 to 7 ms (1.40x)"},
    )
    o["vs_offline"] = served_vs_offline(o, LATENCY, {"batch": 8, "images_per_s": 400.0, "requests_in_flight": 4})
    o["configs"] = hill_climb(lambda c: landscape(c), ServingConfig(1, 1, 5.0), AXES, budget_s=1e9)
    o["configs"]["probes"] = "short probes"
    res["run"]["open_loop"] = o
    md = render({"ort": res}, None, "ort")
    f = o["vs_offline"]["factors"]
    assert_row(md, "ort", 50.0, 400.0, 0.12, round(f["instances"], 2), round(f["batching"], 2), round(f["busy"], 2), "queueing")
    best = landscape(ServingConfig(2, 8, 5.0))
    assert f"| 2 | 8 | 5 | {best['max_rate']:.4g} | {best['p99_ms_at_max']:.1f} | yes | **best** |" in md
    assert "`serving.workers=2 serving.max_batch=8 serving.max_queue_delay_ms=5`" in md
    assert "- `ort`: the engine's closed-loop median moved from 5 to 7 ms" in md


class SlowsDown:
    """A fake engine that runs 1.6x slower from its `after`-th call on: a machine that loses speed mid-search."""

    def __init__(self, after: int | None) -> None:
        from fakes import FakeSession

        self.inner, self.after = FakeSession(base_ms=2.0), after
        self.input_names, self.output_names = self.inner.input_names, self.inner.output_names

    def infer(self, feeds):
        if self.after is not None and self.inner.calls == self.after:
            self.inner.base_ms *= 1.6
        return self.inner.infer(feeds)


@pytest.mark.parametrize("after", [None, 300])
def test_a_machine_that_slows_during_the_search_is_named(after):
    from kiln.config.views import InputSpec

    session = SlowsDown(after)
    target = Target.from_params(
        "fake", {"targets": {"fake": {"runtime": "onnxruntime", "profile": {"min": 1, "opt": 1, "max": 1}, "serve": {1: 1.0}}}}
    )
    settings = ServingSettings(
        slo_ms=25.0, max_queue_delay_ms=0.0, seconds_per_rate=0.3, min_requests=30, confidence=0.5, max_seconds_per_rate=0.6
    )
    record = serve_under_load(session, (InputSpec("input", (3,)),), target, {"b1": {"p50_ms": 2.0, "images_per_s": 500.0}}, settings)
    steady = record["steady"]
    if after is None:  # sleeps of one length: the before and after medians agree within the 10% tolerance
        assert steady["steady"], steady
    else:  # the before median was timed on the first 250 calls at most (0.5 s of 2 ms sleeps), the after one at 3.2 ms
        assert not steady["steady"] and steady["change"] > 1.3 and "speed changed" in steady["why"]
        assert record["search"]["settled"] is False


def test_a_machine_that_slows_and_recovers_inside_the_search_is_named_by_its_probes():
    import numpy as np
    from fakes import FakeSession

    from kiln.serving.steady import SteadyCheck

    def check(*probes):
        steady = SteadyCheck(FakeSession(base_ms=2.0), {"input": np.zeros((1, 3), np.float32)})
        for rate, ms, n in probes:  # n single-image requests of `ms`, and as many in batches of 4 (not counted)
            steady.probe(rate, np.array([1] * n + [4] * n), np.array([ms] * n + [9 * ms] * n))
        return steady.after()  # before and after: the same 2 ms sleeps, so only the probes can tell

    recovered = check((10.0, 2.0, 20), (40.0, 3.0, 20), (20.0, 2.1, 20))
    assert not recovered["steady"] and recovered["probe_spread"] == pytest.approx(1.5)
    assert "inside the search" in recovered["why"] and "2 ms (median, probe at 10 requests/s) and 3 ms (at 40)" in recovered["why"]
    held = check((10.0, 2.0, 20), (40.0, 2.3, 20))  # within 25%: more threads beside it at the higher rate
    assert held["steady"] and held["probe_spread"] == pytest.approx(1.15)
    few = check((10.0, 2.0, 20), (40.0, 3.0, 5))  # 5 single-image inferences: too few for a median that counts
    assert few["steady"] and "probe_spread" not in few
