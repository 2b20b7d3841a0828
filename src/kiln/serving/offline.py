"""How much of the engine's offline throughput its served traffic gets: MLPerf's Server/Offline ratio, and what eats
the rest.

MLPerf CPU submissions serve about 0.76-0.78x of their Offline images/s under the Server scenario's p99 bound. A
search that stops far below that, where the engine is nowhere near busy, is measuring itself, not the engine. The
ratio splits into three factors kiln measured, each of them at most about 1, whose product is the ratio:

- instances: one request in flight at a time (the closed-loop images/s at the offline batch) against the
  throughput mode's several in flight: what more engine instances (workers, streams) could win back;
- batching: the closed-loop images/s at the mean batch the batcher formed at the max rate against the offline
  batch: what larger batches (more delay, a larger max_batch) could win back;
- busy: the served images/s against the closed-loop images/s at that mean batch, the share of the time the
  engine computes at the max rate: the rest is idle time the p99 objective needs (queueing).

Preprocessing is not in this loop (requests arrive as tensors); its cost per frame is beside the ratio, as a
server would pay it on top. Where the objective cannot hold one batch of the offline size with room to queue
(its closed-loop latency above half the objective), no batcher reaches the offline figure and the ratio is
bounded by the objective, not by the serving.
"""

from __future__ import annotations

from typing import Any, Mapping

from kiln.serving.arrivals import mean_size
from kiln.serving.recommend import latency_at

MLPERF_SERVER_SHARE = 0.75  # CPU Server runs reach 0.76-0.78x of Offline under their p99 bound
FACTORS = ("instances", "batching", "busy")
EATEN_BY = {
    "instances": "instances: one request in flight at a time, where the throughput mode keeps several (more workers or streams)",
    "batching": "batching: the batches formed at the max rate are smaller than the offline batch (a larger max_batch or delay)",
    "busy": "queueing: the engine sits idle part of the time so that the p99 holds (the objective, or bursts in the arrivals)",
}


def served_vs_offline(
    open_loop: Mapping[str, Any], latency: Mapping[str, Mapping[str, float]], throughput: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The ratio of served images/s at the max rate to the engine's offline images/s, its factors, and the one that
    eats most; None where no rate held. `latency` is the closed-loop stats per batch ('bN'); `throughput` the
    throughput mode's record (images_per_s None where the runtime has none: the best closed-loop figure stands in)."""
    rate = open_loop.get("max_rate_at_slo") or 0.0
    if rate <= 0:
        return None
    sync_ms = {int(k[1:]): s["p50_ms"] for k, s in latency.items()}
    if throughput and throughput.get("images_per_s"):
        offline_batch = int(throughput["batch"])
        offline = float(throughput["images_per_s"])
        offline_what = f"throughput mode, batch {offline_batch}, {throughput.get('requests_in_flight')} requests in flight"
    else:
        offline_batch = max(sync_ms, key=lambda b: b / sync_ms[b])
        offline = 1e3 * offline_batch / sync_ms[offline_batch]
        offline_what = f"closed loop, batch {offline_batch} (the runtime has no throughput mode)"
    mean_request = mean_size({int(b): p for b, p in open_loop["sizes"].items()})
    served = rate * mean_request
    mean_batch = float((open_loop.get("at_max") or {}).get("mean_batch") or 0.0) or mean_request
    sync_offline = 1e3 * offline_batch / latency_at(sync_ms, offline_batch)
    sync_mean = 1e3 * mean_batch / latency_at(sync_ms, mean_batch)
    factors = {"instances": sync_offline / offline, "batching": sync_mean / sync_offline, "busy": served / sync_mean}
    ratio = served / offline
    # One batch of the offline size must fit in half the objective, leaving the other half for queueing.
    objective_allows = 2 * latency_at(sync_ms, offline_batch) <= float(open_loop["slo_ms"])
    out: dict[str, Any] = {
        "served_images_per_s": served,
        "offline_images_per_s": offline,
        "offline": offline_what,
        "ratio": ratio,
        "mean_batch_at_max": mean_batch,
        "factors": factors,
        "objective_allows": objective_allows,
        "eaten_by": None,
    }
    if ratio < MLPERF_SERVER_SHARE:
        worst = min(FACTORS, key=lambda f: factors[f])
        out["eaten_by"] = worst
        out["why"] = f"{ratio:.2f}x of offline: most is lost to {EATEN_BY[worst]} ({factors[worst]:.2f}x)" + (
            ""
            if objective_allows
            else f"; the objective ({open_loop['slo_ms']:g} ms) cannot hold a batch of {offline_batch} with room to queue, "
            "so no batcher reaches the offline figure"
        )
    return out
