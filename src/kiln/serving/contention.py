"""Two engines on one device at once: how much each slows the other (the seed's contention question).

`kiln contention <target-a> <target-b>` loads both built engines of this project, times
each alone at its main batch, then both at once (each in its own thread, looping until the other's timing is
done), and prints each one's median latency alone and beside the other, and the slow-down. It is on demand,
not a pipeline stage: which engines share a device is a deployment decision, and measuring every pair
would multiply the benchmark's time. (The benchmark's `serving.contention: true` measures the simpler case,
a second copy of the same engine, inside the pipeline.) Results go to reports/contention/<a>+<b>.json.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

from kiln.core.paths import CONTENTION
from kiln.runtimes import Session

CONTENTION_DIR = CONTENTION


def timed(session: Session, feeds: Mapping[str, np.ndarray], seconds: float, min_runs: int = 5) -> list[float]:
    """Per-inference ms from the benchmark's own timing loop: at least `min_runs` inferences and `seconds`, not
    extended for noise (a neighbour's load is the point here)."""
    from kiln.measure.benchmark import BenchmarkSettings, time_infer

    settings = BenchmarkSettings(warmup_iters=0, min_iters=min_runs, min_time_s=seconds, max_iters=10**9, noisy_max_time_s=seconds)
    return time_infer(session, feeds, settings)


def contention_between(
    a: Session, b: Session, feeds_a: Mapping[str, np.ndarray], feeds_b: Mapping[str, np.ndarray], seconds: float = 3.0, min_runs: int = 10
) -> dict[str, Any]:
    """Median ms per inference of `a` and `b` alone, then at once; slowdown = beside / alone. Threads are joined."""
    for s, f in ((a, feeds_a), (b, feeds_b)):
        s.infer(f)  # warm-up
    alone = {"a": timed(a, feeds_a, seconds, min_runs), "b": timed(b, feeds_b, seconds, min_runs)}
    done = {"a": threading.Event(), "b": threading.Event()}
    beside: dict[str, list[float]] = {}
    errors: list[BaseException] = []

    def run(key: str, session: Session, feeds: Mapping[str, np.ndarray], other: str) -> None:
        try:
            beside[key] = timed(session, feeds, seconds, min_runs)
            done[key].set()
            while not done[other].is_set():  # keep the device busy until the other has its figures
                session.infer(feeds)
        except BaseException as e:  # surfaced after the join
            errors.append(e)
            done[key].set()

    threads = [
        threading.Thread(target=run, args=("a", a, feeds_a, "b"), name="kiln-contention-a", daemon=True),
        threading.Thread(target=run, args=("b", b, feeds_b, "a"), name="kiln-contention-b", daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    out: dict[str, Any] = {}
    for key in ("a", "b"):
        alone_ms, beside_ms = float(np.median(alone[key])), float(np.median(beside[key]))
        out[key] = {"alone_p50_ms": alone_ms, "beside_p50_ms": beside_ms, "slowdown": beside_ms / alone_ms, "runs": len(beside[key])}
    return out


def contention_slowdown(session: Session, second: Session, feeds: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """Median latency of `session` alone, then while `second` (another engine on the same device) runs in a loop
    beside it: the slow-down a co-located model causes. Both threads are joined before returning."""
    alone = timed(session, feeds, seconds)
    stop = threading.Event()
    errors: list[BaseException] = []

    def neighbour() -> None:
        try:
            while not stop.is_set():
                second.infer(feeds)
        except BaseException as e:  # surfaced after the join
            errors.append(e)

    thread = threading.Thread(target=neighbour, name="kiln-serving-neighbour", daemon=True)
    thread.start()
    try:
        beside = timed(session, feeds, seconds)
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
    return {
        "alone_p50_ms": float(np.median(alone)),
        "beside_p50_ms": float(np.median(beside)),
        "slowdown": float(np.median(beside) / np.median(alone)),
        "with": "a second copy of the same engine, in a loop, in the same process",
    }
