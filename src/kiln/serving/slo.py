"""What request rate an engine sustains within a latency objective, and what that rate costs.

`run_at(rate) -> LoadResult` is the caller's experiment at one offered rate: typically
`lambda r: run_load(session, feeds_for, poisson_arrivals(r, requests, sizes, seed), batcher, max_seconds)`.
Keep the seed fixed: every rate then gets the same traffic pattern scaled in time, so p99 rises with the rate
instead of jumping with the draw, and the search below converges on the engine, not on the noise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from kiln.core.errors import KilnError
from kiln.serving.early_stop import Decision, decide_latencies
from kiln.serving.load import LoadResult

RunAt = Callable[[float], LoadResult]
# An inference that takes at most this share of the objective cannot be why the lowest rate fails it.
FAR_BELOW = 0.25


def sweep(run_at: RunAt, rates: Sequence[float]) -> list[dict[str, Any]]:
    """Each rate's summary, in the order given: the points of a latency-throughput curve."""
    return [{"rate": float(rate), **run_at(float(rate)).summary()} for rate in rates]


def _check(slo_ms: float, lo: float, hi: float, iterations: int, percentile: float) -> None:
    if not math.isfinite(slo_ms) or slo_ms <= 0:
        raise KilnError(f"the latency objective must be a positive number of milliseconds, got {slo_ms!r}")
    if not (0 < lo < hi) or not math.isfinite(hi):
        raise KilnError(f"the rate search needs 0 < lo < hi requests/s, got lo={lo!r} hi={hi!r}")
    if iterations < 0:
        raise KilnError(f"iterations must be >= 0, got {iterations!r}")
    if not 0 < percentile <= 100:
        raise KilnError(f"percentile must be in (0, 100], got {percentile!r}")


def max_rate_at_slo(
    run_at: RunAt,
    slo_ms: float,
    lo: float,
    hi: float,
    iterations: int = 6,
    percentile: float = 99,
    confirm: RunAt | None = None,
    confidence: float | None = None,
    min_requests: int = 0,
    start: float | None = None,
    expected: Callable[[float], float] | None = None,
) -> dict[str, Any]:
    """The highest offered rate whose `percentile` end-to-end latency is within `slo_ms` and that is not saturated.

    MLPerf's Server search: `lo` must pass and `hi` fail (a passing hi is raised 1.5x, twice at most), then
    `iterations` bisections narrow the gap to (hi - lo) / 2**iterations. Pick them so:

    - hi: an upper bound on what the engine can serve, e.g. its best images/s (closed loop at the profile's
      max, or throughput mode) divided by the mean request size (`arrivals.mean_size`). No batching can beat it;
      if hi still passes, the result says so and the true maximum is higher.
    - lo: a rate that surely passes, e.g. hi / 20: each request then mostly finds the engine idle. If lo
      fails the objective is out of reach at any rate (a single inference, or the batching delay, is
      already too slow), and max_rate is 0 with the reason.

    - confirm: the same experiment with other arrivals (another seed). A p99 of a few hundred requests rests on
      its two or three slowest ones, so a rate can pass by luck; the found rate must pass `confirm` too, else
      three steps below it are tried with `confirm`, so the answer errs low, not high. A step is the search's last
      bracket (high - low) as a share of the rate found, within 5% and 15%: finer would be noise, coarser throws away
      what the search found.

    - start: a rate near the expected answer (kiln.serving.queue_model), probed right after lo: where it holds the
      bisection starts from it, where it fails hi is not needed (start is the failing bound), so the bisections
      narrow a bracket of the answer's own size instead of one from lo to hi.

    - confidence: with it, a probe's requests (at least `min_requests`, its warm-up left out) decide the percentile
      within or over the objective at that confidence (kiln.serving.early_stop: LoadGen's early-stopping rule). A
      probe they do not decide is listed as undecided and steers the search by its point percentile, and an answer
      no decided probe backs is not settled ("undecided"). Without it every probe is judged by its point percentile.
    - expected: the percentile a model predicts at a rate (kiln.serving.queue_model). An undecided probe then passes
      only where both its point percentile and the model's are within the objective: a short probe starts from an
      empty queue and rarely sees its tail, so near saturation its point percentile passes by luck, and a search
      steered by it climbs to rates no longer probe holds.

    Returns {"max_rate", "p99_ms_at_max" (at `percentile`), "percentile", "tried": [(rate, latency, ok)...],
    "confirmed": [(rate, latency, ok)...], "undecided": [rate...], "confidence", "reason", "settled", "unsettled"}:
    settled is False where the answer is not a measured maximum, and unsettled then says why in one word:
    "lowest-only" (only the lowest probe held), "undecided" (the probes above it could not be decided in their
    time), "erratic" (the confirmations with other arrivals failed) or "too-short" (the lowest probe failed with an
    inference far below the objective).
    """
    _check(slo_ms, lo, hi, iterations, percentile)
    tried: list[tuple[float, float, bool]] = []

    confirmed: list[tuple[float, float, bool]] = []
    undecided: list[float] = []

    decided: set[float] = set()  # rates whose requests (in the search or a confirmation) decided "within"

    def answer(rate: float, latency: float, reason: str, unsettled: str | None = None) -> dict[str, Any]:
        if unsettled is None and confidence is not None and rate > 0 and rate not in decided:
            unsettled = "undecided"
            reason += (
                f"; its p{percentile:g} is an estimate: the requests at {rate:.4g} requests/s did not decide it at "
                f"{confidence:.0%} confidence in the time allowed (raise serving.max_seconds_per_rate; study=deep probes longer)"
            )
        return search_result(rate, latency, percentile, reason, unsettled, tried, confirmed, undecided, confidence)

    def measure(run: RunAt, rate: float, sanity: bool = False) -> tuple[bool, float, LoadResult]:
        result = run(rate)
        e2e = result.e2e_ms
        latency = float(np.percentile(e2e, percentile)) if len(e2e) else math.inf
        point = latency <= slo_ms and result.saturation() is None
        if confidence is None:
            return point, latency, result
        decision = probe_decision(result, slo_ms, percentile, confidence, min_requests)
        if decision == "undecided":  # the point percentile steers the search; the rate is not claimed as decided
            if not sanity:
                undecided.append(rate)
            if expected is not None and not sanity:
                point = point and expected(rate) <= slo_ms
            return point, latency, result
        if decision == "within":
            decided.add(rate)
        return decision == "within", latency, result

    def probe(rate: float, sanity: bool = False) -> tuple[bool, float, LoadResult]:
        ok, latency, result = measure(run_at, rate, sanity)
        tried.append((rate, latency, ok))
        return ok, latency, result

    floor = lo  # the sanity probe: a rate far below the answer, never claimed as a measured maximum
    ok, latency, result = probe(lo, sanity=True)
    if not ok:
        compute = float(np.median(result.compute_ms)) if len(result.compute_ms) else math.nan
        why = result.saturation() or f"p{percentile:g} is {latency:.4g} ms > {slo_ms:g} ms"
        missed = (
            f"even the lowest rate tried ({lo:.4g} requests/s) misses the objective: {why}; "
            f"an inference alone takes {compute:.4g} ms (median)"
        )
        if compute <= FAR_BELOW * slo_ms:  # the engine is not what is slow: its own time leaves most of the objective
            return answer(
                0.0,
                math.nan,
                f"{missed}, far below the {slo_ms:g} ms objective, so the engine is not the cause: the probes were too short "
                "to settle (raise serving.seconds_per_rate or serving.min_requests) or the machine was busy with other work "
                "(run again on a quiet machine)",
                "too-short",
            )
        return answer(0.0, math.nan, f"{missed}: a faster engine, a smaller batch or less batching delay, or a looser objective")
    best, best_latency = lo, latency
    if start is not None and lo < start < hi:
        ok, latency, _ = probe(start)
        if ok:
            lo, best, best_latency = start, start, latency
            ok, latency, _ = probe(hi)
        else:
            hi = start  # failed: the bracket is [lo, start]
    else:
        ok, latency, _ = probe(hi)
    for _ in range(2):  # hi passed (its bound came from a noisy figure): raise it, twice at most
        if not ok:
            break
        lo, best, best_latency, hi = hi, hi, latency, 1.5 * hi
        ok, latency, _ = probe(hi)
    if ok:
        reason = f"hi ({hi:.4g} requests/s) still meets the objective: the maximum is at least that; raise hi"
        if confirm is None:
            return answer(hi, latency, reason)
        held, again, _ = measure(confirm, hi)
        confirmed.append((hi, again, held))
        if held:
            return answer(hi, latency, f"{reason} (confirmed with other arrivals)")
        return answer(
            lo, best_latency, f"{reason}, but it failed with other arrivals ({again:.4g} ms): only {lo:.4g} is claimed", "erratic"
        )
    low, high = lo, hi
    for _ in range(iterations):
        mid = (low + high) / 2
        ok, latency, _ = probe(mid)
        if ok:
            low, best, best_latency = mid, mid, latency
        else:
            high = mid
    reason = f"bisected between {lo:.4g} and {hi:.4g} requests/s to within {high - low:.3g}"
    if best == floor:  # no probe above the lowest held: the maximum lies below the lowest failing rate, unmeasured
        return answer(
            floor,
            best_latency,
            f"{reason}: only the lowest probe ({floor:.4g} requests/s) met the objective and every rate tried above it failed, "
            f"the lowest at {high:.4g}; the maximum lies between them (a longer search with more bisections, study=deep, "
            "narrows it)",
            "lowest-only",
        )
    if confirm is None:
        return answer(best, best_latency, reason)
    # Step down from the rate found until one holds with other arrivals too (four tries), by the search's own resolution,
    # then the two highest rates below those that held in the search (a search raised by short probes' luck lands far
    # above the answer, and the steps do not reach back to where it was).
    step = min(0.15, max(0.05, (high - low) / best))
    steps = [best, (1 - step) * best, (1 - 2 * step) * best, (1 - 3 * step) * best]
    held_below = sorted({r for r, _, ok in tried if ok and floor < r < steps[-1]}, reverse=True)[:2]
    for rate in steps + held_below:
        if rate <= floor:
            break
        ok, latency, _ = measure(confirm, rate)
        confirmed.append((rate, latency, ok))
        if ok:
            fallback = "" if rate == best else f"; {best:.4g} requests/s failed with other arrivals, so the highest rate below it that held"
            return answer(rate, latency, f"{reason}, confirmed with other arrivals{fallback}")
    failed = ", ".join(f"{r:.4g}" for r, _, _ in confirmed)
    return answer(
        floor,
        dict((r, lat) for r, lat, _ in tried)[floor],
        f"{reason}; with other arrivals {failed} requests/s failed (the rate found, steps of {step:.0%} below it and the rates "
        f"below those that held in the search), so only the lowest probe ({floor:.4g} requests/s) is claimed: latency at "
        "these rates is erratic (a noisy machine?)",
        "erratic",
    )


def out_of_reach(sizes: dict[int, float], alone_ms: dict[int, float], slo_ms: float, percentile: float = 99) -> dict[str, Any] | None:
    """The answer without a probe where the requests whose own inference (`alone_ms`, the median of their size) takes
    longer than the objective are more than the share the percentile may leave over it: no rate meets it, however low
    (a short probe at a low rate can still pass, by not drawing one of them)."""
    slow = {b: ms for b, ms in alone_ms.items() if sizes.get(b, 0) > 0 and ms > slo_ms}
    share = sum(sizes[b] for b in slow)
    if share <= 1 - percentile / 100:
        return None
    listed = ", ".join(f"{b} images ({sizes[b]:.0%} of requests) take {ms:.4g} ms" for b, ms in sorted(slow.items()))
    return search_result(
        0.0,
        math.nan,
        percentile,
        f"no rate meets a p{percentile:g} of {slo_ms:g} ms: requests of {listed} in a single inference (median, closed "
        f"loop), {share:.0%} of all requests against the {100 - percentile:g}% a p{percentile:g} may leave over the "
        "objective; a faster engine, a looser objective, or smaller requests",
    )


def search_result(
    rate: float,
    latency: float,
    percentile: float,
    reason: str,
    unsettled: str | None = None,
    tried: list[tuple[float, float, bool]] | None = None,
    confirmed: list[tuple[float, float, bool]] | None = None,
    undecided: list[float] | None = None,
    confidence: float | None = None,
) -> dict[str, Any]:
    """The rate search's answer, in the shape max_rate_at_slo documents (settled: no `unsettled` reason)."""
    return {
        "max_rate": rate,
        "p99_ms_at_max": latency,
        "percentile": percentile,
        "tried": tried if tried is not None else [],
        "confirmed": confirmed if confirmed is not None else [],
        "undecided": undecided if undecided is not None else [],
        "confidence": confidence,
        "reason": reason,
        "settled": unsettled is None,
        "unsettled": unsettled,
    }


def probe_decision(result: LoadResult, slo_ms: float, percentile: float, confidence: float, min_requests: int = 0) -> Decision:
    """A probe's verdict on the objective: over when the engine could not keep up (saturated); else, from at least
    `min_requests` completed requests, what they decide at `confidence`; undecided otherwise."""
    if result.saturation() is not None:
        return "over"
    if len(result.e2e_ms) < max(1, min_requests):
        return "undecided"
    return decide_latencies(result.e2e_ms, slo_ms, percentile, confidence)


def cost_per_million(rate_per_s: float, cost_per_hour: float) -> float:
    """What a million requests cost on a machine billed `cost_per_hour` that serves `rate_per_s`; inf when it serves none."""
    if not math.isfinite(cost_per_hour) or cost_per_hour < 0:
        raise KilnError(f"the cost per hour must be a number >= 0, got {cost_per_hour!r}")
    if rate_per_s <= 0:
        return math.inf
    return cost_per_hour / (rate_per_s * 3600.0) * 1e6
