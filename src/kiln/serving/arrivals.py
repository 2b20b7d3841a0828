"""Open-loop request arrivals: a seeded Poisson process (MLPerf's Server scenario, perf_analyzer's
`--request-distribution poisson`) with request sizes drawn from a served batch-size distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from kiln.core.errors import KilnError


@dataclass(frozen=True)
class Request:
    """One request: its position in the sequence, when it arrives (seconds after the run starts) and its batch size."""

    index: int
    arrival_s: float
    size: int


def check_sizes(sizes: Mapping[int, float], where: str = "served distribution") -> dict[int, float]:
    """`sizes` ({batch size: share of requests}) checked, sorted by size, as plain ints and floats."""
    if not isinstance(sizes, Mapping) or not sizes:
        raise KilnError(f"{where} is empty: give the batch sizes requests carry and each one's share, e.g. {{1: 0.7, 4: 0.2, 8: 0.1}}")
    dist: dict[int, float] = {}
    for size, share in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise KilnError(f"{where}: {size!r} is not a request size (a positive integer batch size)")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share < 0:
            raise KilnError(f"{where}.{size}: the share of requests must be a number >= 0, got {share!r}")
        dist[int(size)] = float(share)
    total = sum(dist.values())
    if abs(total - 1.0) > 1e-6:
        raise KilnError(f"{where}: the shares of requests sum to {total:g}, not 1 ({dict(sorted(dist.items()))})")
    return dict(sorted(dist.items()))


def mean_size(sizes: Mapping[int, float]) -> float:
    """Images per request on average: what turns an images/s capacity into a request rate."""
    return sum(b * p for b, p in check_sizes(sizes).items())


def poisson_arrivals(rate_per_s: float, requests: int, sizes: Mapping[int, float], seed: int) -> list[Request]:
    """`requests` arrivals at `rate_per_s` on average, exponential gaps, the first at 0 s.

    The gaps and the sizes come from two streams of the same seed, and a gap is a standard exponential
    divided by the rate: the same seed gives the same sizes at every rate and the same arrivals scaled
    in time, so two engines (or two rates of a search) are offered the same traffic pattern."""
    if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float)) or not math.isfinite(rate_per_s) or rate_per_s <= 0:
        raise KilnError(f"the request rate must be a positive number of requests per second, got {rate_per_s!r}")
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
        raise KilnError(f"the number of requests must be a positive integer, got {requests!r}")
    dist = check_sizes(sizes)
    gap_seed, size_seed = np.random.SeedSequence(seed).spawn(2)
    gaps = np.random.default_rng(gap_seed).standard_exponential(requests) / float(rate_per_s)
    gaps[0] = 0.0  # the run starts with a request instead of idling for one gap
    times = np.cumsum(gaps)
    drawn = np.random.default_rng(size_seed).choice(list(dist), size=requests, p=np.array(list(dist.values())) / sum(dist.values()))
    return [Request(i, float(t), int(b)) for i, (t, b) in enumerate(zip(times, drawn))]
