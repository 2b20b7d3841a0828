"""The rate an engine would serve within the objective if serving cost nothing but the engine's own time.

The dynamic batcher (kiln.serving.batcher) and its workers are simulated on the seeded Poisson arrivals the search
offers (kiln.serving.arrivals), each batch taking the engine's closed-loop median for its size (interpolated as
kiln.serving.recommend.latency_at does). No threads, no clock: the same inputs give the same answer, in well under a
second (0.15 s for 16 rates of 10,000 requests on an AVX2 EPYC core; 0.75 s when each rate drew its own arrivals).

Two uses:
- the search's bracket: the measured search starts around this rate instead of halving its way down from an upper
  bound, so the same bisections land finer (a 25% step of the bound is 40-50% of the answer);
- a hardware-relative goal: the measured max rate against this one says what the serving stack itself costs
  (threads, Python, the engine's variance beyond its median): near 1 the engine is the limit.

The model is optimistic by construction (every inference at its median, nothing else on the machine), so it is a
bound to compare with, never reported as the engine's rate.
"""

from __future__ import annotations

import functools
import heapq
import math
from typing import Any, Mapping

import numpy as np

from kiln.serving.arrivals import mean_size, poisson_arrivals
from kiln.serving.batcher import BatcherSettings
from kiln.serving.recommend import latency_at

REQUESTS = 10_000  # simulated arrivals per rate: their p99 rests on 100 requests over it
ITERATIONS = 16  # bisections of the rate: 1/65536 of the ceiling, far finer than any measurement


def simulate(
    rate: float,
    sizes: Mapping[int, float],
    service_ms: Mapping[int, float],
    batcher: BatcherSettings,
    requests: int = REQUESTS,
    seed: int = 0,
) -> np.ndarray:
    """End-to-end milliseconds of each of `requests` Poisson arrivals at `rate` through the batcher, in arrival order.

    The batcher's rule: one worker at a time forms a batch from the head of the FIFO queue, taking requests in order
    while they fit in max_batch images, and leaves when it is full (or the next request does not fit), or
    max_queue_delay_ms after the head arrived; the batch then runs for the median of its size on that worker."""
    unit_times, size = _traffic(requests, tuple(sorted(sizes.items())), seed)
    at = unit_times / rate  # the same arrivals at every rate, scaled in time (kiln.serving.arrivals)
    t = at.tolist()  # Python floats: the loop below reads them one at a time, where numpy's scalars cost 3x as much
    delay = batcher.max_queue_delay_ms / 1e3
    cost = {n: latency_at(service_ms, n) / 1e3 for n in range(1, batcher.max_batch + 1)}
    free = [0.0] * batcher.workers  # when each worker is next idle (a heap)
    finish: list[float] = []  # when each request's batch is done, in arrival order
    largest = batcher.max_batch
    formed = 0.0  # the last batch left the batcher then: the next one is formed after it
    i = 0
    while i < requests:
        start = max(heapq.heappop(free), formed, t[i])  # a free worker takes the head
        images, j = 0, i
        while j < requests and images + size[j] <= largest and t[j] <= start:
            images, j = images + size[j], j + 1
        leave = start
        full = images >= largest or (j < requests and t[j] <= start)
        if not full:  # wait for company until the head's delay is up, the batch is full, or one does not fit
            deadline = max(start, t[i] + delay)
            while j < requests and t[j] <= deadline:
                if images + size[j] > largest:
                    leave = t[j]
                    break
                images, j = images + size[j], j + 1
                leave = t[j - 1]
                if images >= largest:
                    break
            else:
                leave = deadline
        done = leave + cost[images]
        finish.extend([done] * (j - i))
        formed = leave
        heapq.heappush(free, done)
        i = j
    return (np.array(finish) - at) * 1e3


@functools.lru_cache(maxsize=8)
def _traffic(requests: int, sizes: tuple[tuple[int, float], ...], seed: int) -> tuple[np.ndarray, list[int]]:
    """The seeded arrivals at 1 request/s (their times) and their sizes: drawn once for a bisection's 16 rates."""
    arrivals = poisson_arrivals(1.0, requests, dict(sizes), seed)
    return np.array([r.arrival_s for r in arrivals]), [r.size for r in arrivals]


def model_max_rate(
    sizes: Mapping[int, float],
    service_ms: Mapping[int, float],
    batcher: BatcherSettings,
    slo_ms: float,
    percentile: float = 99,
    seed: int = 0,
) -> dict[str, Any]:
    """{"max_rate", "p99_ms", "utilisation"}: the highest rate whose simulated `percentile` is within `slo_ms`
    (bisected), its percentile, and the share of the engine's time it keeps busy (images/s against the best the
    batcher's largest batch allows, times the workers)."""
    images_per_s = max(n / cost_ms * 1e3 for n, cost_ms in service_ms.items() if n <= batcher.max_batch)
    ceiling = images_per_s * batcher.workers / mean_size(sizes)  # no batching serves more
    low, high = 0.0, ceiling
    p_low = math.nan
    for _ in range(ITERATIONS):
        mid = (low + high) / 2
        p = float(np.percentile(simulate(mid, sizes, service_ms, batcher, seed=seed), percentile))
        if p <= slo_ms:
            low, p_low = mid, p
        else:
            high = mid
    return {"max_rate": low, "p99_ms": p_low, "utilisation": low / ceiling if ceiling else math.nan}
