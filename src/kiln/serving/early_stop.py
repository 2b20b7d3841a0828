"""Whether a probe's requests decide its p99, at a stated confidence: MLPerf LoadGen's early-stopping rule.

A probe's p99 of a few hundred requests rests on its two or three slowest ones, so "p99 within the objective"
is a claim about the engine only when enough requests back it. Count the requests over the objective (t of
n). If the engine's true share of requests over it were the allowed 1% (for p99), seeing as few as t would
happen with probability P(Bin(n, 0.01) <= t); when that is at most 1 - confidence, the p99 is within the
objective at that confidence. Symmetrically, P(Bin(n, 0.01) >= t) at most 1 - confidence says it is over.
Until one of the two holds the probe is undecided: it runs on (LoadGen's "run more queries"), and a probe
that reaches its time cap undecided says so instead of giving a verdict.

For p99 at 99% confidence, a probe with no request over the objective decides after 459 requests; each
request over it raises what is needed (`requests_to_decide`). The requests counted are those after a probe's
first third (WARM_UP): the probe starts with an empty queue. Latencies under load are correlated (a queue
builds and drains), which the binomial rule does not model; the warm-up and the search's confirmation with
other arrivals are what keep a short probe near saturation from passing by luck. Stdlib only (no scipy).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Decision = Literal["within", "over", "undecided"]


def _log_pmf(k: int, n: int, p: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, math.fsum(math.exp(_log_pmf(i, n, p)) for i in range(k + 1)))


def decide(over: int, n: int, percentile: float = 99.0, confidence: float = 0.99) -> Decision:
    """`over` of `n` requests took longer than the objective: is the `percentile` latency within it, over it, or
    not yet known at `confidence`?"""
    if n <= 0:
        return "undecided"
    allowed = 1.0 - percentile / 100.0  # the share of requests the percentile lets exceed the objective
    if allowed <= 0:  # p100: one request over decides it, none decides nothing
        return "over" if over else "undecided"
    alpha = 1.0 - confidence
    if binom_cdf(over, n, allowed) <= alpha:
        return "within"
    if 1.0 - binom_cdf(over - 1, n, allowed) <= alpha:
        return "over"
    return "undecided"


# The share of a probe's first requests (in arrival order) its decision leaves out: a probe starts with an empty
# queue, so its first requests wait less than the rate's steady state would make them (near saturation by far).
WARM_UP = 1 / 3


def steady_part(e2e_ms: np.ndarray) -> np.ndarray:
    """The requests a decision counts: all but the first WARM_UP of them (`e2e_ms` in arrival order)."""
    e2e = np.asarray(e2e_ms)
    return e2e[int(len(e2e) * WARM_UP) :]


def decide_latencies(e2e_ms: np.ndarray, objective_ms: float, percentile: float = 99.0, confidence: float = 0.99) -> Decision:
    """`decide` on a probe's end-to-end latencies (in arrival order), its warm-up left out (`steady_part`)."""
    e2e = steady_part(e2e_ms)
    return decide(int(np.count_nonzero(e2e > objective_ms)), len(e2e), percentile, confidence)


def requests_to_decide(over: int = 0, percentile: float = 99.0, confidence: float = 0.99) -> int:
    """The fewest requests with `over` of them over the objective that decide the percentile within it."""
    allowed = 1.0 - percentile / 100.0
    if allowed <= 0:
        return math.inf  # type: ignore[return-value]
    n = over + 1
    while binom_cdf(over, n, allowed) > 1.0 - confidence:
        n = max(n + 1, int(n * 1.05))
    lo = max(over + 1, int(n / 1.05) - 1)  # back down to the exact least n
    while lo < n and binom_cdf(over, lo, allowed) > 1.0 - confidence:
        lo += 1
    return lo
