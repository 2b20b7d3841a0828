"""What the closed-loop figures say before a probe: the queue model (kiln.serving.queue_model) against queueing
theory, the search's bracket around its rate, and traffic no rate can serve; and the confirmation's way down."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import FakeSession
from test_serving_search import Measured

from kiln.config.views import InputSpec, Target
from kiln.serving.arrivals import poisson_arrivals
from kiln.serving.batcher import BatcherSettings
from kiln.serving.queue_model import model_max_rate, simulate
from kiln.serving.run import ServingSettings, serve_under_load
from kiln.serving.slo import max_rate_at_slo, out_of_reach

# Its figures are timed: run alone, before the two-worker phase (test.sh)
pytestmark = pytest.mark.timing


def test_one_worker_without_batching_is_lindleys_recursion():
    # M/D/1: each request waits for the work ahead of it, W[n] = max(0, W[n-1] + S - gap[n]), then takes S.
    e2e = simulate(70.0, {1: 1.0}, {1: 10.0}, BatcherSettings(1, 0.0, 1), requests=5000, seed=3)
    t = np.array([r.arrival_s for r in poisson_arrivals(70.0, 5000, {1: 1.0}, 3)])
    wait = np.zeros(5000)
    for n in range(1, 5000):
        wait[n] = max(0.0, wait[n - 1] + 0.010 - (t[n] - t[n - 1]))
    np.testing.assert_allclose(e2e, wait * 1e3 + 10.0, atol=1e-6)
    assert e2e.max() > 50.0  # at 70% utilisation some requests queue: the comparison is not of idle service times


def test_a_lone_request_waits_the_batchers_delay_and_a_full_batch_does_not():
    lone = simulate(0.5, {1: 1.0}, {1: 10.0, 8: 20.0}, BatcherSettings(8, 30.0, 1), requests=200, seed=1)
    assert np.median(lone) == pytest.approx(40.0)  # nobody to batch with: the whole 30 ms delay, then 10 ms
    full = simulate(0.5, {8: 1.0}, {1: 10.0, 8: 20.0}, BatcherSettings(8, 30.0, 1), requests=200, seed=1)
    assert np.median(full) == pytest.approx(20.0)  # a request of max_batch images leaves at once


def test_batching_and_workers_raise_the_modelled_rate():
    service = {1: 10.0, 8: 20.0}  # a batch of 8 costs twice one image: batching is worth 4x
    alone = model_max_rate({1: 1.0}, service, BatcherSettings(1, 0.0, 1), slo_ms=100.0)
    batched = model_max_rate({1: 1.0}, service, BatcherSettings(8, 5.0, 1), slo_ms=100.0)
    two = model_max_rate({1: 1.0}, service, BatcherSettings(1, 0.0, 2), slo_ms=100.0)
    assert alone["max_rate"] < 100.0  # one server of 10 ms: under 100 requests/s
    assert batched["max_rate"] > 2.5 * alone["max_rate"]
    assert 1.7 * alone["max_rate"] < two["max_rate"] < 2.6 * alone["max_rate"]
    for m in (alone, batched, two):
        assert m["p99_ms"] <= 100.0 and 0.0 < m["utilisation"] <= 1.0


def test_the_bracket_around_a_guess_finds_the_rate_finer_and_survives_a_wrong_guess():
    # A deterministic engine: every probe holds up to 40 requests/s and fails above.
    def run_at(rate):
        return Measured(10.0 if rate <= 40.0 else 500.0)

    plain = max_rate_at_slo(run_at, 250.0, lo=5.0, hi=100.0, iterations=3)
    near = max_rate_at_slo(run_at, 250.0, lo=5.0, hi=50.0, iterations=3, start=36.0)  # the model's 0.8x bracket
    assert near["tried"][1][0] == 36.0 and near["tried"][1][2]  # probed right after lo, and held
    assert 40.0 - near["max_rate"] < 40.0 - plain["max_rate"]  # same bisections, finer answer
    assert 38.0 <= near["max_rate"] <= 40.0
    high = max_rate_at_slo(run_at, 250.0, lo=5.0, hi=100.0, iterations=5, start=80.0)  # a guess twice too high
    assert not high["tried"][1][2] and 100.0 not in [r for r, _, _ in high["tried"]]  # 80 failed: no need to try hi
    assert 36.0 <= high["max_rate"] <= 40.0
    low = max_rate_at_slo(run_at, 250.0, lo=5.0, hi=12.0, iterations=3, start=10.0)  # far too low: hi raised
    assert low["max_rate"] >= 18.0


def test_traffic_whose_large_requests_alone_break_the_objective_has_no_rate():
    sizes = {1: 0.7, 4: 0.2, 8: 0.1}
    found = out_of_reach(sizes, {1: 42.0, 4: 180.0, 8: 352.0}, 250.0)  # torch-eager's ResNet-18 on 2 cores
    assert found["max_rate"] == 0.0 and found["settled"] and found["tried"] == []
    assert "8 images (10% of requests) take 352 ms" in found["reason"] and "1%" in found["reason"]
    assert out_of_reach({1: 0.995, 8: 0.005}, {1: 42.0, 8: 352.0}, 250.0) is None  # 0.5% over: the p99 may leave them
    assert out_of_reach(sizes, {1: 42.0, 4: 180.0, 8: 240.0}, 250.0) is None

    # Through the benchmark's open-loop step: known from the closed-loop figures, so no probe is sent (a short probe
    # at a low rate passes by drawing none of the slow requests: the quick study reported 2.0 requests/s here).
    session = FakeSession(base_ms=1.0)
    target = Target.from_params(
        "fake", {"targets": {"fake": {"runtime": "onnxruntime", "profile": {"min": 1, "opt": 8, "max": 8}, "serve": sizes}}}
    )
    latency = {"b1": {"p50_ms": 42.0, "images_per_s": 23.8}, "b8": {"p50_ms": 352.0, "images_per_s": 22.7}}
    record = serve_under_load(session, (InputSpec("input", (3,)),), target, latency, ServingSettings(slo_ms=250.0))
    assert record["max_rate_at_slo"] == 0.0 and record["search"]["tried"] == [] and record["search"]["settled"]
    assert "at_50pct" not in record and record["model"]["max_rate"] == 0.0


def test_a_search_raised_by_luck_confirms_where_it_held_below_the_steps():
    # Probes pass up to 60 requests/s by luck of their arrivals; with other arrivals only 22 holds. The steps below the
    # rate found (at most 15% each) stop at about 33: the rate that held in the search below them, 20, is tried next.
    found = max_rate_at_slo(
        lambda r: Measured(10.0 if r <= 60.0 else 500.0),
        250.0,
        lo=5.0,
        hi=100.0,
        iterations=3,
        start=20.0,
        confirm=lambda r: Measured(10.0 if r <= 22.0 else 500.0),
    )
    assert found["max_rate"] == 20.0 and found["settled"], found
    assert [ok for _, _, ok in found["confirmed"]] == [False] * 4 + [True]


def test_an_undecided_probe_passes_only_where_the_model_agrees():
    # Every probe holds 50 requests, too few to decide at 90% (min_requests 100): the point p99 passes up to 60
    # requests/s (a short probe from an empty queue misses its tail), the model's up to 25.
    def run_at(rate):
        return Measured(10.0 if rate <= 60.0 else 500.0, n=50)

    def model_p99(rate):
        return 100.0 if rate <= 25.0 else 400.0

    common = dict(slo_ms=250.0, lo=5.0, hi=100.0, iterations=4, confidence=0.9, min_requests=100, confirm=run_at)
    by_point = max_rate_at_slo(run_at, **common)
    steered = max_rate_at_slo(run_at, expected=model_p99, **common)
    assert by_point["max_rate"] > 40.0 and by_point["unsettled"] == "undecided"
    assert 15.0 <= steered["max_rate"] <= 25.0 and steered["unsettled"] == "undecided", steered
    # A probe that measured a p99 over the objective fails whatever the model says.
    failing = max_rate_at_slo(lambda r: Measured(500.0 if r > 10.0 else 10.0, n=50), expected=lambda r: 1.0, **{**common, "confirm": None})
    assert failing["max_rate"] <= 10.0
