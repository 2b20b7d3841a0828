"""kiln.serving: open-loop arrivals, the dynamic batcher, the load runner, the rate search and the profile advice.

Most tests drive a fake session whose inference sleeps `base_ms + per_image_ms * batch`: a controlled service
time is what makes the queueing assertions exact (capacity, utilisation and the batching delay are known
numbers), and sleeping takes no CPU from whatever else this machine runs. One test loads a real ONNX Runtime
engine, to show the runner drives what kiln builds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from fakes import FakeSession

from kiln.config.views import ShapeProfile
from kiln.core.errors import KilnError
from kiln.serving import (
    BatcherSettings,
    Request,
    cost_per_million,
    max_rate_at_slo,
    poisson_arrivals,
    recommend_profile,
    run_load,
    sweep,
)

# Its figures are timed: run alone, before the two-worker phase (test.sh)
pytestmark = pytest.mark.timing

SIZES = {1: 0.7, 4: 0.2, 8: 0.1}


_FEEDS: dict[int, dict[str, np.ndarray]] = {}


def feeds_for(batch: int) -> dict[str, np.ndarray]:
    return _FEEDS.setdefault(batch, {"input": np.zeros((batch, 1), np.float32)})


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    """Every test: run_load's threads are gone when it returns (libraries may start their own, e.g. tqdm's monitor)."""
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("kiln-serving", "kiln-contention"))]


def first_in_batch_queue_ms(result: Any) -> np.ndarray:
    """The wait of each batch's oldest request (the one the batching delay is measured from)."""
    out = []
    for start in np.unique(result.start_s):
        rode = result.start_s == start
        out.append(result.queue_ms[rode][np.argmin(result.arrival_s[rode])])
    return np.array(out)


def test_poisson_arrivals_are_seeded_at_the_rate_and_distribution():
    a = poisson_arrivals(200.0, 4000, SIZES, seed=3)
    assert a == poisson_arrivals(200.0, 4000, SIZES, seed=3)
    assert a != poisson_arrivals(200.0, 4000, SIZES, seed=4)
    assert [r.index for r in a] == list(range(4000)) and a[0].arrival_s == 0.0
    assert all(y.arrival_s >= x.arrival_s for x, y in zip(a, a[1:]))
    rate = (len(a) - 1) / a[-1].arrival_s
    assert rate == pytest.approx(200.0, rel=0.05)
    sizes = np.array([r.size for r in a])
    for size, share in SIZES.items():
        assert np.mean(sizes == size) == pytest.approx(share, abs=0.025)
    # Another rate: the same sizes, the same pattern scaled in time (what keeps a rate search monotone).
    b = poisson_arrivals(100.0, 4000, SIZES, seed=3)
    assert [r.size for r in b] == [r.size for r in a]
    assert b[-1].arrival_s == pytest.approx(2 * a[-1].arrival_s)
    for bad_rate in (0, -5.0, float("nan")):
        with pytest.raises(KilnError, match="rate"):
            poisson_arrivals(bad_rate, 10, SIZES, seed=0)
    for bad_sizes in ({}, {1: 0.5}, {0: 1.0}, {1: -0.5, 2: 1.5}):
        with pytest.raises(KilnError):
            poisson_arrivals(10.0, 10, bad_sizes, seed=0)


def test_low_load_requests_ride_alone_and_barely_wait():
    session = FakeSession(base_ms=4.0)
    result = run_load(session, feeds_for, poisson_arrivals(30.0, 30, {1: 1.0}, seed=1), BatcherSettings(8, 0.0), max_seconds=5)
    s = result.summary()
    assert s["requests_completed"] == 30 and s["not_sent"] == 0 and s["abandoned"] == 0
    assert s["mean_batch"] < 1.3
    # Times compared with what the same run measured, not with the clock: a sleep never ends early, the engine's
    # time is the session's own (however late a busy machine wakes it), and at 12% utilisation few requests queue.
    took = float(np.median(session.took_ms))
    assert 4.0 <= took <= s["compute_p50_ms"] < 1.5 * took
    assert s["queue_p50_ms"] < 0.5 * s["compute_p50_ms"]
    assert not s["saturated"], s["saturated_why"]
    assert result.achieved_rate == pytest.approx(result.offered_rate, rel=0.1)


class StallsOnTheLastCall(FakeSession):
    """A stall (a page fault, a busy neighbour) on one inference at the very end of a run that otherwise keeps up."""

    def __init__(self, base_ms: float, last_call: int, stall_ms: float) -> None:
        super().__init__(base_ms)
        self.last_call, self.stall_ms = last_call, stall_ms

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.calls + 1 == self.last_call:
            time.sleep(self.stall_ms / 1e3)
        return super().infer(feeds)


def test_one_late_request_at_the_end_does_not_read_as_saturated():
    # 30 requests, 1 s of arrivals, at 12% utilisation; the last inference stalls 100 ms. From the first and last
    # completions alone the run achieved ~12% less than it was offered, and failed the 5% test (CI saw 40.1 of 43.8).
    arrivals = poisson_arrivals(30.0, 30, {1: 1.0}, seed=1)
    session = StallsOnTheLastCall(base_ms=4.0, last_call=30, stall_ms=100.0)
    result = run_load(session, feeds_for, arrivals, BatcherSettings(1, 0.0), max_seconds=5)
    assert session.calls == 30 and result.e2e_ms[-1] > 100.0  # the stall happened, on the last request
    assert result.saturation() is None, result.saturation()
    assert result.achieved_rate == pytest.approx(result.offered_rate, rel=0.05)
    # Still read: an engine whose capacity is a third of the offered rate completes at that capacity (a sleep never
    # ends early: at most 1000/60 per second), and is saturated.
    over = run_load(FakeSession(base_ms=60.0), feeds_for, arrivals, BatcherSettings(1, 0.0), max_seconds=5)
    assert "achieved" in (over.saturation() or "") and over.achieved_rate < 1000 / 60 < 0.4 * over.offered_rate


def test_high_load_forms_batches_within_max_batch_and_delay():
    session = FakeSession(base_ms=5.0, per_image_ms=0.5)
    batcher = BatcherSettings(max_batch=8, max_queue_delay_ms=5.0)
    # 300 requests/s of 1-4 images: ~3x what batch-by-request could serve, well within batches of 8.
    arrivals = poisson_arrivals(300.0, 300, {1: 0.6, 2: 0.3, 4: 0.1}, seed=2)
    result = run_load(session, feeds_for, arrivals, batcher, max_seconds=5)
    s = result.summary()
    assert s["requests_completed"] == 300
    assert s["mean_batch"] > 2
    assert max(session.batches) <= 8 and result.batch.max() <= 8
    assert sum(session.batches) == sum(r.size for r in arrivals)
    # The oldest request of a batch waits at most the delay, plus the batch ahead of it still running.
    worst = first_in_batch_queue_ms(result).max()
    assert worst <= batcher.max_queue_delay_ms + session.service_ms(8) + 10.0, worst
    assert not s["saturated"], s["saturated_why"]


def test_batching_delay_counts_from_the_oldest_request():
    def at(*ms: float, size: int = 1) -> list[Request]:
        return [Request(i, t / 1e3, size) for i, t in enumerate(ms)]

    def run(arrivals: list[Request], batcher: BatcherSettings) -> tuple[list[int], np.ndarray]:
        session = FakeSession(base_ms=1.0)
        result = run_load(session, feeds_for, arrivals, batcher, max_seconds=5)
        return session.batches, result.queue_ms

    # No delay: each request leaves as soon as a worker is free, alone when nothing else is queued.
    assert run(at(0, 20, 40), BatcherSettings(8, 0.0))[0] == [1, 1, 1]
    # 15 ms delay: the request at 5 ms joins the one at 0; the batch leaves at 15 ms, before the one at 60 ms arrives.
    batches, queue_ms = run(at(0, 5, 60, 80), BatcherSettings(8, 15.0))
    # The delay counts from the oldest request (it waits the full 15 ms, the second 10 of them); the batch of two
    # left before the request at 60 ms arrived (bounds from the arrivals, not from how fast the machine is).
    assert batches[0] == 2
    assert 14.0 <= queue_ms[0] < 60.0 and 9.0 <= queue_ms[1] < 55.0
    # A full batch does not wait for the delay.
    batches, queue_ms = run(at(0, 2, 4, 6, size=2), BatcherSettings(4, 500.0))
    assert batches == [4, 4] and queue_ms.max() < 250.0


def test_overload_is_flagged_and_queueing_dominates_the_tail():
    session = FakeSession(base_ms=10.0)
    batch_one = BatcherSettings(max_batch=1, max_queue_delay_ms=0.0)
    over = run_load(session, feeds_for, poisson_arrivals(250.0, 100, {1: 1.0}, seed=0), batch_one, max_seconds=5).summary()
    assert over["saturated"] and over["achieved_rate"] < 0.95 * over["offered_rate"]
    assert over["achieved_rate"] < 105
    assert over["p99_queue_share"] > 0.8
    assert over["e2e_p99_ms"] > 5 * over["compute_p99_ms"]


def test_a_slow_engine_at_light_load_is_not_read_as_saturated():
    # 300 ms per inference of up to 8 requests, 6 requests/s (capacity ~26/s): the last request's latency must not
    # count against the achieved rate (it did, and a slow fp32 engine failed every short probe as "saturated").
    session = FakeSession(base_ms=300.0)
    result = run_load(session, feeds_for, poisson_arrivals(6.0, 20, {1: 1.0}, seed=3), BatcherSettings(8, 0.0), max_seconds=20)
    assert result.saturation() is None, result.saturation()
    assert result.achieved_rate == pytest.approx(result.offered_rate, rel=0.35)


def test_max_seconds_leaves_the_rest_unsent():
    result = run_load(FakeSession(1.0), feeds_for, poisson_arrivals(100.0, 200, {1: 1.0}, seed=0), BatcherSettings(1, 0.0), max_seconds=0.3)
    s = result.summary()
    assert 10 < s["requests_completed"] < 60 and s["requests_completed"] + s["not_sent"] == 200


def test_a_failing_engine_stops_the_load_and_leaves_no_thread():
    before = threading.active_count()
    for workers in (1, 3):
        session = FakeSession(base_ms=2.0, fail_on=3)
        arrivals = poisson_arrivals(100.0, 500, {1: 1.0}, seed=0)
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="fell over"):
            run_load(session, feeds_for, arrivals, BatcherSettings(4, 1.0, workers=workers), 10)
        # Stopped soon after the third call: not the 5 s of arrivals sent into a dead engine (a ratio to the schedule,
        # with room for a busy machine), and no batch began after it but those other workers had in hand.
        assert time.perf_counter() - t0 < 0.5 * arrivals[-1].arrival_s
        assert session.calls <= 3 + (workers - 1), (workers, session.calls)
        assert threading.active_count() == before
    run_load(FakeSession(1.0), feeds_for, poisson_arrivals(100.0, 5, {1: 1.0}, seed=0), BatcherSettings(4, 1.0, workers=3), 5)
    assert threading.active_count() == before


def test_max_rate_at_slo_lies_within_the_queueing_bound():
    session = FakeSession(base_ms=10.0)
    batch_one = BatcherSettings(max_batch=1, max_queue_delay_ms=0.0)

    def run_at(rate: float):
        return run_load(session, feeds_for, poisson_arrivals(rate, 400, {1: 1.0}, seed=11), batch_one, max_seconds=1.5, max_drain_s=0.5)

    found = max_rate_at_slo(run_at, slo_ms=50.0, lo=10.0, hi=100.0, iterations=4)
    # One server, 10 ms per request: 100/s is the hard ceiling; Poisson queueing puts p99 over 50 ms well before it.
    assert 30.0 < found["max_rate"] < 100.0, found
    assert found["p99_ms_at_max"] <= 50.0
    assert len(found["tried"]) == 2 + 4 and found["tried"][0][2] and not found["tried"][1][2]
    rates_ok = [rate for rate, _, ok in found["tried"] if ok]
    assert found["max_rate"] == max(rates_ok)

    hopeless = max_rate_at_slo(
        lambda r: run_load(session, feeds_for, poisson_arrivals(r, 5, {1: 1.0}, seed=0), batch_one, 5), slo_ms=5.0, lo=10.0, hi=100.0
    )
    assert hopeless["max_rate"] == 0 and "misses the objective" in hopeless["reason"] and len(hopeless["tried"]) == 1


class Measured:
    """A LoadResult stand-in with a fixed latency for every request: the rate search's arithmetic, exactly."""

    def __init__(self, latency_ms: float) -> None:
        self.e2e_ms = self.compute_ms = np.full(200, latency_ms)

    def saturation(self) -> None:
        return None


def test_a_rate_that_passed_by_luck_is_confirmed_or_given_up():
    # The search's arrivals say p99 = rate ms; other arrivals say 1.2 x that. Objective 50 ms.
    found = max_rate_at_slo(lambda r: Measured(r), 50.0, lo=10.0, hi=100.0, iterations=3, confirm=lambda r: Measured(1.2 * r))
    assert [r for r, _, _ in found["tried"]] == [10.0, 100.0, 55.0, 32.5, 43.75]
    # 43.75 passed once, but 52.5 ms with other arrivals: one step lower holds with both. The step is the search's last
    # bracket (43.75 to 55) as a share of the rate, 26%, at most 15%: 37.19 requests/s, 44.6 ms.
    assert [(round(r, 2), round(lat, 2), ok) for r, lat, ok in found["confirmed"]] == [(43.75, 52.5, False), (37.19, 44.62, True)]
    assert found["max_rate"] == pytest.approx(0.85 * 43.75) and "highest rate below it that held" in found["reason"]
    steady = max_rate_at_slo(lambda r: Measured(r), 50.0, lo=10.0, hi=100.0, iterations=3, confirm=lambda r: Measured(r))
    assert steady["max_rate"] == 43.75 and steady["confirmed"] == [(43.75, 43.75, True)]
    erratic = max_rate_at_slo(lambda r: Measured(r), 50.0, lo=10.0, hi=100.0, iterations=3, confirm=lambda r: Measured(99.0))
    assert erratic["max_rate"] == 10.0 and len(erratic["confirmed"]) == 4 and "erratic" in erratic["reason"]


def test_a_hi_that_passes_is_raised_before_the_bisection():
    # The engine holds up to 150 requests/s (p99 = rate / 3 ms, objective 50 ms); hi = 100 passes, 150 passes, 225 fails.
    found = max_rate_at_slo(lambda r: Measured(r / 3), 50.0, lo=10.0, hi=100.0, iterations=3)
    assert [r for r, _, _ in found["tried"]][:4] == [10.0, 100.0, 150.0, 225.0]
    assert 150.0 <= found["max_rate"] < 225.0 and "bisected" in found["reason"]


def test_an_objective_below_one_inference_is_refused_with_the_fix():
    from kiln.serving.run import check_slo_reachable

    latency = {"b1": {"p50_ms": 12.0}, "b4": {"p50_ms": 30.0}}
    check_slo_reachable(20.0, latency, {1: 0.7, 4: 0.3}, "ort")
    with pytest.raises(KilnError) as e:
        check_slo_reachable(10.0, latency, {1: 0.7, 4: 0.3}, "ort")
    assert "serving.slo_ms 10 is below targets.ort's fastest single inference" in str(e.value)
    assert "12 ms at batch 1" in str(e.value) and "Raise serving.slo_ms" in str(e.value)


def test_an_engine_with_several_profiles_gets_one_for_its_common_small_requests():
    from kiln.runtimes import runtime_info
    from kiln.runtimes.tensorrt.plan import select_profile

    latency = {1: 2.0, 2: 2.5, 4: 3.5, 8: 6.0, 16: 11.0, 32: 22.0}
    single = recommend_profile(SIZES, latency, 30.0, ShapeProfile(1, 8, 32), "ort", runtime_info("onnxruntime").profiles)
    assert "extra_profiles" not in single and "profiles_override" not in single
    trt = recommend_profile(SIZES, latency, 30.0, ShapeProfile(1, 8, 32), "trt", runtime_info("tensorrt").profiles, {"input": (3, 16, 16)})
    # 70% of requests are single images, below opt 8: a profile of their own, first; 4 (20%) too. 8 is opt already.
    assert trt["extra_profiles"] == [{"min": 1, "opt": 1, "max": 1}, {"min": 4, "opt": 4, "max": 4}]
    import json

    spelled = json.loads(trt["profiles_override"].split(": ", 1)[1])
    assert trt["profiles_override"].startswith("targets.trt.options.profiles: ") and len(spelled) == 3
    assert spelled[2]["input"] == {"min": [1, 3, 16, 16], "opt": [8, 3, 16, 16], "max": [16, 3, 16, 16]}
    # The session runs a batch on the first profile that holds it: singles on the first, 4 on the second, 8 on the main.
    assert [select_profile(spelled, {"input": (b, 3, 16, 16)}) for b in (1, 4, 8)] == [0, 1, 2]
    # A common size above opt gets its own profile too (TensorRT tunes for opt; 16 is as far from 8 as 4 is).
    above = recommend_profile({1: 0.3, 16: 0.7}, latency, 30.0, ShapeProfile(1, 8, 32), "trt", runtime_info("tensorrt").profiles)
    assert above["profile"]["opt"] != 16 and {"min": 16, "opt": 16, "max": 16} in above["extra_profiles"], above


def test_sweep_and_cost():
    session = FakeSession(base_ms=2.0)
    points = sweep(lambda r: run_load(session, feeds_for, poisson_arrivals(r, 10, {1: 1.0}, seed=0), BatcherSettings(1, 0.0), 5), [20, 50])
    assert [p["rate"] for p in points] == [20.0, 50.0] and all(p["requests_completed"] == 10 for p in points)
    assert cost_per_million(100.0, 3.6) == pytest.approx(10.0)
    assert cost_per_million(0.0, 3.6) == float("inf")


def test_recommend_profile_fits_traffic_and_objective():
    latency = {1: 2.0, 2: 2.5, 4: 3.5, 8: 6.0, 16: 11.0, 32: 22.0}
    rec = recommend_profile(SIZES, latency, slo_ms=30.0, current=ShapeProfile(1, 8, 32), target_name="ort")
    p = rec["profile"]
    assert p["min"] == 1 and p["max"] >= 8 and p["min"] <= p["opt"] <= p["max"]
    assert p == {"min": 1, "opt": 8, "max": 16}  # 16 is the largest within 15 ms; ms/image flattens at 8
    assert rec["batcher"]["max_batch"] == 16 and rec["batcher"]["max_queue_delay_ms"] == pytest.approx(9.5)
    assert "targets.ort.profile.min=1" in rec["override"] and "targets.ort.profile.max=16" in rec["override"]
    assert rec["changed"] and rec["why"]
    BatcherSettings(**rec["batcher"]).check_against(ShapeProfile(**p), SIZES, "serving.batcher")
    # A tight objective: the largest request still decides max, and the advice says it will hurt.
    tight = recommend_profile(SIZES, latency, slo_ms=8.0, current=ShapeProfile(), target_name="ort")
    assert tight["profile"]["max"] == 8 and "more than half" in tight["why"]
    with pytest.raises(KilnError):
        recommend_profile({}, latency, 30.0, ShapeProfile(), "ort")


def test_check_against_refuses_what_cannot_be_served():
    profile = ShapeProfile(1, 8, 16)
    with pytest.raises(KilnError, match="outside the target's profile"):
        BatcherSettings(32, 1.0).check_against(profile, SIZES, "serving.batcher")
    with pytest.raises(KilnError, match="largest request"):
        BatcherSettings(4, 1.0).check_against(profile, SIZES, "serving.batcher")
    with pytest.raises(KilnError, match="max_queue_delay_ms"):
        BatcherSettings(8, -1.0).check_against(profile, SIZES, "serving.batcher")
    with pytest.raises(KilnError, match="workers"):
        BatcherSettings(8, 1.0, workers=0).check_against(profile, SIZES, "serving.batcher")
    BatcherSettings(1, 0.0).check_against(profile, {1: 1.0}, "serving.batcher")
    with pytest.raises(KilnError, match="largest request"):
        BatcherSettings(1, 0.0).check_against(profile, {1: 0.9, 2: 0.1}, "serving.batcher")
    with pytest.raises(KilnError, match="max_queue_delay_ms"):
        BatcherSettings.from_params({"max_batch": 8}, "serving.batcher")
    assert BatcherSettings.from_params({"max_batch": 8, "max_queue_delay_ms": 2}, "serving.batcher") == BatcherSettings(8, 2.0)


def test_real_onnxruntime_engine_under_load(tiny_onnx, tmp_path):
    from kiln.config.views import Target
    from kiln.pipeline.engine import build_engine, load_engine
    from kiln.runtimes import BuildSource
    from kiln.serving import feeds_cache, warm_up

    path, spec, _ = tiny_onnx
    target = Target.from_params("ort", {"targets": {"ort": {"runtime": "onnxruntime", "threads": 1}}})
    build_engine(target, BuildSource(path, spec), tmp_path / "e")
    session, _ = load_engine(tmp_path / "e", target)
    batcher = BatcherSettings(max_batch=4, max_queue_delay_ms=2.0)
    batcher.check_against(target.profile, {1: 0.5, 2: 0.5}, "serving.batcher")
    feeds = feeds_cache(spec.inputs, seed=0)
    warm_up(session, feeds, batcher.max_batch)
    result = run_load(session, feeds, poisson_arrivals(20.0, 15, {1: 0.5, 2: 0.5}, seed=0), batcher, max_seconds=5)
    s = result.summary()
    assert s["requests_completed"] == 15 and s["not_sent"] == 0
    assert (result.compute_ms > 0).all() and (result.e2e_ms >= result.compute_ms).all()
    assert set(result.batch) <= {1, 2, 3, 4}


def test_contention_between_two_engines_sees_a_shared_device():
    from kiln.serving.contention import contention_between

    active = [0]  # inferences on the device now: it shares itself among them (processor sharing)
    lock = threading.Lock()

    class OnDevice(FakeSession):
        def infer(self, feeds):
            with lock:
                active[0] += 1
            try:
                done, step = 0.0, 0.5e-3
                while done < self.service_ms(len(feeds["input"])) / 1e3:
                    time.sleep(step)
                    with lock:
                        done += step / active[0]
            finally:
                with lock:
                    active[0] -= 1
            return {"output": np.zeros((len(feeds["input"]), 2), np.float32)}

    a, b = OnDevice(base_ms=4.0), OnDevice(base_ms=4.0)
    result = contention_between(a, b, feeds_for(1), feeds_for(1), seconds=0.3, min_runs=5)
    for key in ("a", "b"):
        r = result[key]
        # A sleep never returns early, so alone it takes at least its 4 ms (how much more depends on the machine: a
        # busy one stretched 8 sleeps of 0.5 ms to 6 ms); the slow-down below is a ratio measured in the same run.
        assert r["alone_p50_ms"] >= 4.0 and r["runs"] >= 5
        # Sharing the device, each inference takes about twice as long: ~2x.
        assert 1.5 < r["slowdown"] < 3.0, result
    apart = contention_between(FakeSession(base_ms=4.0), FakeSession(base_ms=4.0), feeds_for(1), feeds_for(1), seconds=0.3)
    assert all(apart[k]["slowdown"] < 1.5 for k in ("a", "b")), apart


def test_a_search_where_only_the_lowest_probe_held_says_so_and_is_not_settled():
    # p99 = 60 ms above 10 requests/s, 5 ms at it: every bisection fails, and no confirmation has anything to try.
    found = max_rate_at_slo(lambda r: Measured(5.0 if r <= 10.0 else 60.0), 50.0, lo=10.0, hi=100.0, iterations=3, confirm=Measured)
    assert found["max_rate"] == 10.0 and found["settled"] is False and found["confirmed"] == []
    assert "only the lowest probe (10 requests/s) met the objective" in found["reason"] and "the lowest at 21.25" in found["reason"]
    assert "erratic" not in found["reason"] and "failed with other arrivals" not in found["reason"]  # it said so before
    steady = max_rate_at_slo(lambda r: Measured(r), 50.0, lo=10.0, hi=100.0, iterations=3, confirm=lambda r: Measured(r))
    assert steady["settled"] is True


def test_a_hi_that_still_passes_is_confirmed_too():
    held = max_rate_at_slo(lambda r: Measured(1.0), 50.0, lo=10.0, hi=100.0, iterations=3, confirm=lambda r: Measured(1.0))
    assert held["max_rate"] == 225.0 and held["confirmed"] == [(225.0, 1.0, True)] and held["settled"]
    lucky = max_rate_at_slo(lambda r: Measured(1.0), 50.0, lo=10.0, hi=100.0, iterations=3, confirm=lambda r: Measured(r))
    assert lucky["confirmed"] == [(225.0, 225.0, False)] and not lucky["settled"] and lucky["max_rate"] == 150.0


def test_a_raised_hi_that_held_is_confirmed_not_called_the_lowest_probe():
    # Holds up to 105 requests/s: hi = 100 passes and is raised (150 fails), and no bisection above 100 holds. 100 is a
    # measured rate, not the sanity probe: it is confirmed with other arrivals (it was called erratic, none tried).
    steady = max_rate_at_slo(
        lambda r: Measured(5.0 if r <= 105 else 90.0),
        50.0,
        lo=10.0,
        hi=100.0,
        iterations=2,
        confirm=lambda r: Measured(5.0 if r <= 105 else 90.0),
    )
    assert steady["max_rate"] == 100.0 and steady["settled"] and "only the lowest probe" not in steady["reason"]
    assert steady["confirmed"] == [(100.0, 5.0, True)]
