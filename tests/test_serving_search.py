"""The open-loop search's p99 is earned: LoadGen's early-stopping rule, the minimum count, and a search that lands
within 10% below and 15% above a fake engine's true maximum rate at the objective (computed from its service times)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fakes import FakeSession

from kiln.config.views import InputSpec, Target
from kiln.measure.machine_load import LoadWatch
from kiln.serving.early_stop import binom_cdf, decide, decide_latencies, requests_to_decide
from kiln.serving.run import ServingSettings, serve_under_load
from kiln.serving.slo import max_rate_at_slo

# Its figures are timed: run alone, before the two-worker phase (test.sh)
pytestmark = pytest.mark.timing


def test_the_rule_decides_p99_from_the_count_over_the_objective():
    # No request over: within once 0.99**n <= 1%, i.e. n >= log(0.01) / log(0.99) = 458.2.
    assert requests_to_decide(0, 99, 0.99) == math.ceil(math.log(0.01) / math.log(0.99)) == 459
    assert decide(0, 458) == "undecided" and decide(0, 459) == "within"
    # Each request over the objective needs more requests to say within; enough of them say over.
    assert requests_to_decide(0) < requests_to_decide(1) < requests_to_decide(2)
    assert decide(1, requests_to_decide(1)) == "within" and decide(1, requests_to_decide(1) - 1) == "undecided"
    assert 1 - binom_cdf(4, 100, 0.01) <= 0.01 < 1 - binom_cdf(3, 100, 0.01)  # P(X >= 5) <= 1% < P(X >= 4)
    assert decide(5, 100) == "over" and decide(4, 100) == "undecided"
    # A lower confidence decides sooner, as the quick study's 0.9 does.
    assert requests_to_decide(0, 99, 0.9) == math.ceil(math.log(0.1) / math.log(0.99)) == 230
    # A probe's first third is its warm-up (its queue starts empty): 344 requests leave the 230 that decide at 0.9.
    assert decide_latencies(np.full(344, 5.0), 10.0, confidence=0.9) == "within"
    assert decide_latencies(np.full(343, 5.0), 10.0, confidence=0.9) == "undecided"
    assert decide_latencies(np.full(345, 5.0), 10.0, confidence=0.99) == "undecided"
    slow_start = np.concatenate([np.full(114, 99.0), np.full(230, 5.0)])  # over the objective only while warming up
    assert decide_latencies(slow_start, 10.0, confidence=0.9) == "within"


class Measured:
    """A LoadResult stand-in: `n` requests, every one taking `latency_ms`."""

    def __init__(self, latency_ms: float, n: int = 200) -> None:
        self.e2e_ms = self.compute_ms = np.full(n, latency_ms)

    def saturation(self) -> None:
        return None


def test_a_probe_below_its_minimum_count_is_never_reported_decided():
    # Every probe is 1 ms against a 50 ms objective, but holds 200 requests where 300 are the minimum: no probe is
    # decided, so the rate the search climbs to (hi, raised twice: it keeps passing) is an estimate, said so.
    found = max_rate_at_slo(lambda r: Measured(1.0), 50.0, lo=10.0, hi=100.0, iterations=2, confidence=0.5, min_requests=300)
    assert found["max_rate"] == 225.0 and not found["settled"] and found["unsettled"] == "undecided"
    assert found["undecided"] == [r for r, _, _ in found["tried"][1:]] + [r for r, _, _ in found["confirmed"]]
    assert "did not decide" in found["reason"] and "serving.max_seconds_per_rate" in found["reason"]
    # The same probes with enough requests decide, and the answer is settled.
    enough = max_rate_at_slo(lambda r: Measured(1.0, 400), 50.0, lo=10.0, hi=100.0, iterations=2, confidence=0.5, min_requests=300)
    assert enough["settled"] and enough["max_rate"] == 225.0 and enough["undecided"] == []
    # 200 requests cannot decide p99 at 99% confidence whatever the minimum (459 past the warm-up are needed).
    short = max_rate_at_slo(lambda r: Measured(1.0), 50.0, lo=10.0, hi=100.0, iterations=2, confidence=0.99)
    assert short["unsettled"] == "undecided"
    # A probe its requests decide over fails, whatever its point percentile says.
    over = Measured(1.0, 400)
    over.e2e_ms[-20:] = 80.0  # 20 of the 267 counted past the warm-up: p99 is over 50 ms at 50% confidence
    failing = max_rate_at_slo(lambda r: over if r > 50 else Measured(1.0, 400), 50.0, lo=10.0, hi=100.0, iterations=2, confidence=0.5)
    assert not failing["tried"][1][2] and failing["max_rate"] < 100.0


def true_max_rate(service_ms: np.ndarray, slo_ms: float, percentile: float = 99.0) -> float:
    """The highest Poisson rate at which one server with these service times (drawn at random) keeps the
    `percentile` of time in system within `slo_ms`: Lindley's recursion over two million arrivals, bisected."""
    rng = np.random.default_rng(0)
    gaps, service = rng.exponential(1.0, 2_000_000), rng.choice(service_ms, 2_000_000)

    def p(rate: float) -> float:
        steps = np.concatenate([[0.0], np.cumsum(service[:-1] - gaps[1:] / rate * 1e3)])
        wait = steps - np.minimum(np.minimum.accumulate(steps), 0.0)
        return float(np.percentile(wait + service, percentile))

    lo, hi = 1.0, 1e3 / float(np.mean(service_ms))
    for _ in range(24):  # the bracket (hundreds of requests/s) to within a thousandth of a request/s
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p(mid) <= slo_ms else (lo, mid)
    return lo


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_search_lands_within_10pct_below_and_15pct_above_the_true_max_rate(seed):
    # One worker, batches of one, 2 ms per request against a 25 ms p99 objective: M/D/1, whose true maximum rate
    # at the objective is computed from the service times the fake engine really took (its sleeps overshoot a little).
    session = FakeSession(base_ms=2.0)
    target = Target.from_params(
        "fake", {"targets": {"fake": {"runtime": "onnxruntime", "profile": {"min": 1, "opt": 1, "max": 1}, "serve": {1: 1.0}}}}
    )
    settings = ServingSettings(
        slo_ms=25.0,
        max_queue_delay_ms=0.0,
        seconds_per_rate=0.5,
        min_requests=50,
        confidence=0.9,
        max_seconds_per_rate=3.0,
        search_iterations=4,
        seed=seed,
    )
    latency = {"b1": {"p50_ms": 2.0, "images_per_s": 500.0}}
    with LoadWatch() as load:  # the other pytest-xdist worker, or anything else: kiln's own check says whether it was quiet
        record = serve_under_load(session, (InputSpec("input", (3,)),), target, latency, settings)
    search = record["search"]
    assert search["settled"], search["reason"]
    truth = true_max_rate(np.array(session.took_ms), 25.0)
    # Within 10% below and 15% above on a quiet machine. Above, because these 0.5-s probes see too few of a queue's long
    # busy periods at 80-90% utilisation and read p99 low (measured on a 2-core AVX2 EPYC: 1.06-1.10x the truth, seeds
    # 1-3 twice each; 0.91x with 2.5-s probes, seed 2; docs/pipeline.md). Beside other work the sleeps' wake-ups queue
    # behind it and the M/D/1 model of the truth no longer holds (seen under a second worker: 422 found, the model's 378,
    # the confirmation's p99 20.7 ms within 25): there the search must still land within 25%.
    below, above = (0.25, 0.25) if load.busy else (0.1, 0.15)
    found = record["max_rate_at_slo"]
    assert (1 - below) * truth <= found <= (1 + above) * truth, (found, truth, load.describe(), search)
    # The queue model on the 2 ms median is M/D/1 too: its rate is the truth's but for the sleeps' overshoot
    model = record["model"]
    assert 0.9 * truth <= model["max_rate"] <= 1.25 * truth, (model, truth)
    assert model["vs_measured"] == pytest.approx(found / model["max_rate"])
