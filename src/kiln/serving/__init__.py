"""Serving under load: what latency a request rate gets, and the highest rate that meets a latency objective.

The closed-loop benchmark sends one request after another, so it never sees a queue. A server's users do not
wait for each other: requests arrive at their own times (open loop) and queue when the engine is busy. This
package is MLPerf's Server scenario and Triton perf_analyzer's request-rate mode on kiln's own Session:

    arrivals (seeded Poisson times, sizes from the served distribution)    arrivals.poisson_arrivals
      -> one FIFO queue                                                     batcher.DynamicBatcher
      -> dynamic batcher: the oldest request plus those behind it, up to
         max_batch images, waiting at most max_queue_delay_ms for company   batcher.BatcherSettings
      -> `workers` threads, each running Session.infer on one batch         load.run_load -> LoadResult
      -> per request: queue, compute and end-to-end ms, the batch it rode in

On top of that: a latency-throughput sweep and the binary search for the highest rate within an objective
(slo.sweep, slo.max_rate_at_slo), its cost per million requests (slo.cost_per_million), and a shape profile
and batcher settings to suit the traffic (recommend.recommend_profile).

Nothing here knows what runs the inference: pointing the same load at a real serving endpoint (Triton,
TorchServe, a cloud endpoint) is a Session whose `infer` posts the batch and waits for the answer, with
`workers` as the number of connections in flight.
"""

from __future__ import annotations

from kiln.serving.arrivals import Request, check_sizes, mean_size, poisson_arrivals
from kiln.serving.batcher import BatcherSettings, DynamicBatcher
from kiln.serving.load import LoadResult, feeds_cache, run_load, warm_up
from kiln.serving.recommend import latency_at, recommend_profile
from kiln.serving.slo import cost_per_million, max_rate_at_slo, sweep

__all__ = [
    "BatcherSettings",
    "DynamicBatcher",
    "LoadResult",
    "Request",
    "check_sizes",
    "cost_per_million",
    "feeds_cache",
    "latency_at",
    "max_rate_at_slo",
    "mean_size",
    "poisson_arrivals",
    "recommend_profile",
    "run_load",
    "sweep",
    "warm_up",
]
