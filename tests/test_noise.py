"""Noisy measurements: the spread in every latency stats dict, and time_infer timing noisy batch sizes longer."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kiln.core.errors import KilnError
from kiln.measure.benchmark import NOISE_WINDOW, BenchmarkSettings, latency_stats, robust_cv, time_infer

# Its figures are timed: run alone, before the two-worker phase (test.sh)
pytestmark = pytest.mark.timing

FEEDS = {"x": np.zeros((1, 4), np.float32)}


def alternating(noisy_calls: int | None, steady_ms: float = 3.0):
    """1 ms and 10 ms by turns for the first `noisy_calls` calls (all of them when None), then `steady_ms`."""

    def schedule(i: int) -> float:
        if noisy_calls is None or i < noisy_calls:
            return 1.0 if i % 2 else 10.0
        return steady_ms

    return schedule


class Scripted:
    """A session whose `infer` sleeps what `schedule(call index)` says, in ms; timed by the host clock."""

    input_names, output_names = ["x"], ["y"]

    def __init__(self, schedule):
        self.schedule, self.calls = schedule, 0

    def infer(self, feeds):
        time.sleep(self.schedule(self.calls) / 1e3)
        self.calls += 1
        return {"y": feeds["x"]}


class DeviceScripted(Scripted):
    """Reports its own time (as CUDA sessions do), so the times are exactly the schedule's."""

    def time_ms(self, feeds):
        ms = self.schedule(self.calls)
        self.infer(feeds)
        return ms


def settings(**kw) -> BenchmarkSettings:
    defaults = dict(warmup_iters=0, min_iters=5, min_time_s=0.05, max_cv=0.1, noisy_max_time_s=2.0)
    return BenchmarkSettings(**{**defaults, **kw})


def test_latency_stats_report_the_spread():
    stats = latency_stats([10.0] * 50 + [20.0] * 50, batch=4)
    assert stats["cv"] == pytest.approx(5 / 15) and stats["p99_over_p50"] == pytest.approx(20 / 15)
    assert stats["noisy"] is True
    steady = latency_stats([10.0] * 100, batch=1)
    assert steady["cv"] == 0.0 and steady["p99_over_p50"] == 1.0 and steady["noisy"] is False
    # std 1, mean 10: cv 0.1; `noisy` is decided by the middle half's spread, (11 - 9) / (1.349 x 10) = 0.148.
    assert latency_stats([9.0, 11.0] * 50, batch=1)["cv"] == pytest.approx(0.1)
    assert latency_stats([9.0, 11.0] * 50, batch=1)["robust_cv"] == pytest.approx(2 / 13.49)
    assert latency_stats([9.0, 11.0] * 50, batch=1)["noisy"] is True
    assert latency_stats([9.0, 11.0] * 50, batch=1, max_cv=0.2)["noisy"] is False
    one = latency_stats([5.0], batch=2)
    assert one["cv"] == 0.0 and one["noisy"] is False and one["iterations"] == 1


def test_robust_cv_ignores_outliers_but_not_a_second_mode():
    assert robust_cv([2.0] * 29 + [50.0]) == 0.0  # one GC pause
    assert robust_cv([1.0, 10.0] * 15) > 1  # half the iterations slow
    assert robust_cv([2.0] * 20 + [8.0] * 10) > 0.1  # a third of them slow: the median is at stake
    rng = np.random.default_rng(0)
    assert robust_cv(rng.normal(10.0, 0.5, 20000)) == pytest.approx(0.05, rel=0.05)  # reads like std/mean on Gaussian noise
    assert robust_cv([]) == 0.0 and robust_cv([3.0]) == 0.0


def test_steady_times_stop_at_min_iters_and_min_time():
    times = time_infer(Scripted(lambda i: 3.0), FEEDS, settings())
    assert len(times) >= 5 and sum(times) >= 45  # the 50 ms floor, timed by the host clock
    # Exactly 3 ms each (as a device reports it): never noisy, so timing stops at the floor, which iterations that
    # sleep at least 3 ms reach within 17 of them, however busy the machine.
    assert 5 <= len(time_infer(DeviceScripted(lambda i: 3.0), FEEDS, settings())) <= 17
    times = time_infer(Scripted(lambda i: 3.0), FEEDS, settings(min_iters=25, min_time_s=0.01))
    assert len(times) == 25


def test_one_outlier_does_not_keep_timing_going():
    # A GC pause among steady iterations: plain cv and the tail show it, but the bulk is steady: not noisy.
    session = DeviceScripted(lambda i: 40.0 if i == 3 else 2.0)
    times = time_infer(session, FEEDS, settings(min_iters=20, min_time_s=0.0))
    assert len(times) == 20
    stats = latency_stats(times, 1)
    assert stats["cv"] > 0.1 and stats["p99_over_p50"] > 5 and stats["noisy"] is False and stats["p50_ms"] == 2.0


def test_noisy_times_keep_going_until_the_last_window_is_steady():
    session = Scripted(alternating(noisy_calls=30))
    times = time_infer(session, FEEDS, settings())
    # The 50 ms floor is met after ~10 iterations, all noisy; timing goes on past the 30 noisy calls until
    # few enough of them are left in the last window for its quartiles to be steady (~46 iterations), which is
    # why it stopped (a steady last window), not the 2 s cap.
    assert 30 + NOISE_WINDOW // 2 <= len(times) <= 30 + NOISE_WINDOW
    assert robust_cv(times[-NOISE_WINDOW:]) <= 0.1


def test_deterministic_noise_stops_as_soon_as_the_window_is_steady():
    session = DeviceScripted(alternating(noisy_calls=30))
    times = time_infer(session, FEEDS, settings(min_time_s=0.0, min_iters=10))
    # Window of 30 ending at call n holds 60 - n noisy calls, half fast and half slow: the quartiles
    # lie among the steady ones once each half is at most 7 (n = 46).
    assert len(times) == 46


def test_times_that_stay_noisy_stop_at_the_time_cap():
    session = Scripted(alternating(noisy_calls=None))
    t0 = time.perf_counter()
    times = time_infer(session, FEEDS, settings(noisy_max_time_s=0.3))
    # Ran to the cap (not stopped early): its wall time, and more iterations than a stable run needs. The sum of the
    # iterations' own times is not asserted: the loop's overhead between them grows on a busy machine.
    assert time.perf_counter() - t0 >= 0.3 and len(times) > 30
    # Stopped by the cap: still noisy, and no iteration began after it (every time before the last one fell
    # within the 0.3 s, however slow the machine made each of them).
    assert robust_cv(times[-NOISE_WINDOW:]) > 0.1
    assert sum(times[:-1]) < 300


def test_times_that_stay_noisy_stop_at_max_iters():
    session = Scripted(alternating(noisy_calls=None))
    assert len(time_infer(session, FEEDS, settings(max_iters=40, noisy_max_time_s=5.0))) == 40


def test_settings_refuse_bad_noise_limits():
    with pytest.raises(KilnError, match=r"benchmark\.max_cv must be > 0"):
        BenchmarkSettings.from_params({"max_cv": 0})
    with pytest.raises(KilnError, match=r"benchmark\.max_cv must be > 0"):
        BenchmarkSettings.from_params({"max_cv": -0.1})
    with pytest.raises(KilnError, match=r"benchmark\.noisy_max_time_s \(1\.0\) must be >= min_time_s \(2\.0\)"):
        BenchmarkSettings.from_params({"noisy_max_time_s": 1.0})
    ok = BenchmarkSettings.from_params({"min_time_s": 0.5, "noisy_max_time_s": 0.5, "max_cv": 0.2})
    assert ok.to_params()["max_cv"] == 0.2 and ok.to_params()["noisy_max_time_s"] == 0.5
    assert BenchmarkSettings().max_cv == 0.1 and BenchmarkSettings().noisy_max_time_s == 6.0
