"""Open-loop load on a Session: arrivals released on schedule into the batcher, worker threads running inferences.

Open loop means a request arrives at its time whether or not earlier ones finished, as users of a server do;
the closed-loop benchmark (one request after another) never sees a queue, so it cannot say what latency a
given request rate gets. Latency counts from the request's *scheduled* arrival, so a late load generator
cannot hide queueing (coordinated omission); how late it released requests is reported as generator lag.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from kiln.config.views import InputSpec
from kiln.core.errors import KilnError
from kiln.data.inputs import make_inputs
from kiln.runtimes import Session, concurrency_limit
from kiln.serving.arrivals import Request
from kiln.serving.batcher import BatcherSettings, DynamicBatcher, Queued

FeedsFor = Callable[[int], Mapping[str, np.ndarray]]
# A request's own inputs (its position in the arrivals -> feeds of its size), for runs that check answers.
RequestFeeds = Callable[[int], Mapping[str, np.ndarray]]
# Whether the requests completed so far (their end-to-end ms) settle the question the run asks: it may stop early.
Settled = Callable[[np.ndarray], bool]
SETTLE_EVERY = 16  # releases between two looks at `settled`
GROWTH_QUARTER = 10  # the queue-growth test compares the first and last quarter of at least this many requests each


def feeds_cache(inputs: Iterable[InputSpec], seed: int) -> FeedsFor:
    """`feeds_for` for run_load: one seeded feeds dict per batch size, made once (workers share it)."""
    specs, lock = tuple(inputs), threading.Lock()
    cache: dict[int, Mapping[str, np.ndarray]] = {}

    def feeds_for(batch: int) -> Mapping[str, np.ndarray]:
        with lock:
            if batch not in cache:
                cache[batch] = make_inputs(specs, batch, seed + batch)
            return cache[batch]

    return feeds_for


def warm_up(session: Session, feeds_for: FeedsFor, max_batch: int) -> None:
    """One inference at every batch size the batcher can form: a first call at a new shape may re-plan or re-compile."""
    for batch in range(1, max_batch + 1):
        session.infer(feeds_for(batch))


def fitted_rate(times_s: np.ndarray) -> float:
    """Events per second: the inverse of the least-squares slope of the sorted event times against their rank.

    From the first and last event alone, one late event at either end moved the rate by its whole delay (a 61 ms
    stall at the end of a 0.66-s run read as 9% short, and an engine at 12% utilisation as saturated); in the
    fit it moves the slope by about 6 * delay / (n * span), 1.8% there. An engine that falls behind completes at its
    capacity throughout, which the slope reads as well as the end points did.
    """
    t = np.sort(np.asarray(times_s, dtype=np.float64))
    if len(t) < 2:
        return float("nan")
    rank = np.arange(len(t), dtype=np.float64)
    rank -= rank.mean()
    slope = float(np.dot(rank, t - t.mean()) / np.dot(rank, rank))
    return 1.0 / slope if slope > 0 else float("nan")


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


@dataclass
class LoadResult:
    """One run's requests (completed ones, in arrival order) and its rates. Times are seconds after the run started."""

    offered_rate: float  # requests/s the released arrivals planned (fitted_rate of their arrival times)
    # completions per second (fitted_rate of the completion times): comparable with offered_rate whatever the latency
    # (counting from the first arrival adds one request's latency, which made a slow engine read as overloaded)
    achieved_rate: float
    images_per_s: float
    wall_s: float
    index: np.ndarray  # Request.index of each completed request
    size: np.ndarray
    arrival_s: np.ndarray
    start_s: np.ndarray  # start of the inference of the batch the request rode in
    end_s: np.ndarray
    batch: np.ndarray  # images in that batch
    inferences: int
    not_sent: int  # arrivals after max_seconds, never released
    abandoned: int  # released but still queued when max_drain_s ran out
    lag_ms: np.ndarray  # how late the generator released each sent request
    stopped_early: bool = False  # `settled` said the requests so far answer the question before max_seconds
    # With request_feeds: each completed request's own outputs (its rows of the batch's), by its position in the arrivals.
    outputs: dict[int, dict[str, np.ndarray]] | None = None

    @property
    def queue_ms(self) -> np.ndarray:
        return (self.start_s - self.arrival_s) * 1e3

    @property
    def compute_ms(self) -> np.ndarray:
        return (self.end_s - self.start_s) * 1e3

    @property
    def e2e_ms(self) -> np.ndarray:
        return (self.end_s - self.arrival_s) * 1e3

    def saturation(self) -> str | None:
        """Why the engine could not keep up with the offered rate, or None."""
        if self.abandoned:
            return f"{self.abandoned} requests were still queued when the drain time ran out"
        if not len(self.e2e_ms):
            return "no request completed"
        if self.achieved_rate < 0.95 * self.offered_rate:
            return f"achieved {self.achieved_rate:.4g} requests/s of the {self.offered_rate:.4g} offered"
        queue, quarter = self.queue_ms, len(self.queue_ms) // 4
        if quarter < GROWTH_QUARTER:  # a few requests' waits are mostly the draw's bursts, not a trend
            return None
        first, last = float(queue[:quarter].mean()), float(queue[-quarter:].mean())
        # The floor (two median service times) keeps a burst at the end of a run from reading as growth.
        if last > 3 * first and last > 2 * float(np.median(self.compute_ms)):
            return f"the queue kept growing: {first:.3g} ms wait in the first quarter of requests, {last:.3g} ms in the last"
        return None

    def summary(self) -> dict[str, Any]:
        e2e, queue, compute = self.e2e_ms, self.queue_ms, self.compute_ms
        out: dict[str, Any] = {}
        for name, values in (("e2e", e2e), ("queue", queue), ("compute", compute)):
            for q in (50, 90, 99):
                out[f"{name}_p{q}_ms"] = _pct(values, q)
        tail = e2e >= out["e2e_p99_ms"] if len(e2e) else np.zeros(0, bool)
        reason = self.saturation()
        out.update(
            offered_rate=self.offered_rate,
            achieved_rate=self.achieved_rate,
            images_per_s=self.images_per_s,
            mean_batch=float(self.size.sum()) / self.inferences if self.inferences else 0.0,
            requests_completed=int(len(e2e)),
            inferences=self.inferences,
            not_sent=self.not_sent,
            abandoned=self.abandoned,
            # How much of the worst latency is waiting rather than computing: near 1 means add capacity or lower the rate.
            p99_queue_share=float(queue[tail].mean() / e2e[tail].mean()) if tail.any() and e2e[tail].mean() > 0 else float("nan"),
            generator_lag_p99_ms=_pct(self.lag_ms, 99),
            saturated=reason is not None,
            saturated_why=reason,
        )
        return out


def check_workers(session: Session, workers: int) -> None:
    """Refuse more workers than the session can run at once (its `max_concurrent`, see kiln.runtimes)."""
    limit = concurrency_limit(session)
    if limit is not None and workers > limit:
        raise KilnError(
            f"serving.workers is {workers}, but this engine ({type(session).__name__}) runs at most {limit} "
            f"inference{'s' if limit > 1 else ''} at once safely: set serving.workers: {limit} "
            "(or serve it from several processes, each loading its own copy)"
        )


def run_load(
    session: Session,
    feeds_for: FeedsFor,
    arrivals: list[Request],
    batcher: BatcherSettings,
    max_seconds: float,
    max_drain_s: float | None = None,
    request_feeds: RequestFeeds | None = None,
    settled: Settled | None = None,
    min_seconds: float = 0.0,
) -> LoadResult:
    """Release `arrivals` on schedule for up to `max_seconds`, let `batcher.workers` threads serve them, drain, join.

    `max_drain_s` bounds the wait after the last release (None: drain everything); requests still queued then
    are abandoned and the run reads as saturated. The first exception a worker raised is re-raised after
    every thread has been joined.

    `settled`: once `min_seconds` of arrivals were released, the generator asks it every few releases with the
    end-to-end ms of the requests completed so far, and stops releasing (drains and returns) when it says yes:
    a probe runs until it can decide or until `max_seconds`.

    `request_feeds`: each request's own inputs (by its position in `arrivals`); a batch is then the requests'
    inputs concatenated, and each request's rows of the outputs are kept in `LoadResult.outputs`, to check
    that every answer is the right one (several workers on one engine). Without it a batch is one cached tensor
    of its size (`feeds_for`): the engine's time, not numpy's copies."""
    check_workers(session, batcher.workers)
    if not arrivals:
        raise KilnError("no requests to send: draw some with poisson_arrivals(rate, requests, sizes, seed)")
    if any(b.arrival_s < a.arrival_s for a, b in zip(arrivals, arrivals[1:])):
        raise KilnError("arrivals must be in time order (as poisson_arrivals returns them)")
    n = len(arrivals)
    start, end, formed = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    lag = np.full(n, np.nan)
    queue = DynamicBatcher(batcher)
    errors: list[BaseException] = []
    inferences = [0]
    outputs: dict[int, dict[str, np.ndarray]] = {}
    count_lock = threading.Lock()
    failed = threading.Event()  # wakes the generator from its sleep when a worker fails

    def work() -> None:
        try:
            while (items := queue.next_batch()) is not None:
                images = sum(item.size for item in items)
                if request_feeds is None:
                    # The engine's cost depends on the batch size only, so one cached tensor per size stands in for
                    # the concatenated requests: copying real inputs would time numpy, not the engine.
                    feeds = feeds_for(images)
                else:
                    own = [request_feeds(item.index) for item in items]
                    feeds = {name: np.concatenate([f[name] for f in own]) for name in own[0]}
                t0 = time.perf_counter()
                result = session.infer(feeds)
                t1 = time.perf_counter()
                if request_feeds is not None:
                    row = 0
                    for item in items:
                        outputs[item.index] = {name: np.array(out[row : row + item.size]) for name, out in result.items()}
                        row += item.size
                for item in items:  # each index is written by one worker only: no lock needed
                    start[item.index], end[item.index], formed[item.index] = t0, t1, images
                with count_lock:
                    inferences[0] += 1
        except BaseException as e:  # handed to the caller once every thread is joined
            errors.append(e)
            queue.abort()
            failed.set()

    workers = [threading.Thread(target=work, name=f"kiln-serving-worker-{i}", daemon=True) for i in range(batcher.workers)]
    for t in workers:
        t.start()
    sent = 0
    stopped_early = False
    arrival = np.array([r.arrival_s for r in arrivals])
    t_zero = time.perf_counter()
    try:
        for position, request in enumerate(arrivals):  # positions, not Request.index, address the arrays
            if request.arrival_s > max_seconds or failed.is_set():
                break
            if settled is not None and request.arrival_s >= min_seconds and position % SETTLE_EVERY == 0:
                done_so_far = np.flatnonzero(~np.isnan(end[:position]))  # workers write end[] last for a request
                e2e_so_far = (end[done_so_far] - t_zero - arrival[done_so_far]) * 1e3
                if settled(e2e_so_far):
                    stopped_early = True
                    break
            due = t_zero + request.arrival_s
            left = due - time.perf_counter()
            if left > 0:
                failed.wait(left)  # sleep, not spin: the engine needs the cores
            if failed.is_set():
                break
            lag[position] = (time.perf_counter() - due) * 1e3
            queue.put(Queued(position, due, request.size))
            sent += 1
        queue.close()
        if max_drain_s is not None:
            deadline = time.perf_counter() + max_drain_s
            for t in workers:
                t.join(max(0.0, deadline - time.perf_counter()))
            if any(t.is_alive() for t in workers):
                queue.abort()  # workers finish the inference in hand and stop
    except BaseException:  # Ctrl-C while releasing: do not drain a queue nobody will read
        queue.abort()
        raise
    finally:
        queue.close()
        for t in workers:
            t.join()
    if errors:
        raise errors[0]
    done = ~np.isnan(end)
    idx = np.flatnonzero(done)
    rel_start, rel_end = start[idx] - t_zero, end[idx] - t_zero
    sizes = np.array([r.size for r in arrivals], dtype=np.int64)
    sent_arrivals = arrival[:sent]
    wall = float(rel_end.max() - arrival[idx].min()) if len(idx) else 0.0
    achieved = fitted_rate(rel_end)
    return LoadResult(
        offered_rate=fitted_rate(sent_arrivals),
        achieved_rate=0.0 if np.isnan(achieved) else achieved,
        images_per_s=float(sizes[idx].sum()) / wall if wall > 0 else 0.0,
        wall_s=wall,
        index=np.array([r.index for r in arrivals], dtype=np.int64)[idx],
        size=sizes[idx],
        arrival_s=arrival[idx],
        start_s=rel_start,
        end_s=rel_end,
        batch=formed[idx],
        inferences=inferences[0],
        not_sent=n - sent,
        abandoned=sent - len(idx),
        lag_ms=lag[:sent],
        stopped_early=stopped_early,
        outputs=outputs if request_feeds is not None else None,
    )
