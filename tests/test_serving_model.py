"""The queue model (kiln.serving.queue_model) against queueing theory, and the search's bracket around its rate."""

from __future__ import annotations

import numpy as np
import pytest
from test_serving_search import Measured

from kiln.serving.arrivals import poisson_arrivals
from kiln.serving.batcher import BatcherSettings
from kiln.serving.queue_model import model_max_rate, simulate
from kiln.serving.slo import max_rate_at_slo


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
