"""Latency and accuracy of one engine, through the runtime protocol only.

Method (after trtexec and benchmark_app): warm-up iterations, then at least
`min_iters` iterations and at least `min_time_s` seconds; every iteration's time is
kept; percentiles per batch size; per-image figures derived from the median.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .config import InputSpec, ShapeProfile
from .errors import KilnError
from .inputs import make_inputs
from .runtimes import DeviceTimedSession, Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkSettings:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup_iters: int = 5
    min_iters: int = 20
    min_time_s: float = 2.0
    max_iters: int = 10000
    seed: int = 7
    accuracy_budget: dict[str, Any] = field(default_factory=dict)
    fail_on_budget: bool = True
    serve: dict[Any, float] | None = None  # default served distribution; parsed per target (Target.serve)
    served_requests: int = 200  # at least this many requests drawn from it (and min_time_s)

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None) -> "BenchmarkSettings":
        from .settings import parse

        return parse(cls, raw, "benchmark")

    def check(self, where: str) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise KilnError(f"{where}.batch_sizes must be a non-empty list of positive integers, got {list(self.batch_sizes)}")
        if (
            self.min_iters < 1
            or self.warmup_iters < 0
            or self.min_time_s < 0
            or self.served_requests < 1
            or self.max_iters < self.min_iters
        ):
            raise KilnError(f"{where}.min_iters and served_requests must be >= 1, warmup_iters and min_time_s >= 0, max_iters >= min_iters")

    def to_params(self) -> dict[str, Any]:
        from .settings import to_params

        return to_params(self)


def _timer(session: Session) -> Callable[[Mapping[str, np.ndarray]], float]:
    """One inference's time in ms: on the device where the session can say (CUDA events), else the host clock."""
    if isinstance(session, DeviceTimedSession):
        return session.time_ms
    clock = time.perf_counter

    def host_time(feeds: Mapping[str, np.ndarray]) -> float:
        t0 = clock()
        session.infer(feeds)
        return (clock() - t0) * 1e3

    return host_time


def time_infer(session: Session, feeds: Mapping[str, np.ndarray], settings: BenchmarkSettings) -> list[float]:
    """Per-iteration times in ms, after warm-up."""
    for _ in range(settings.warmup_iters):
        session.infer(feeds)
    timed = _timer(session)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < settings.max_iters:
        times.append(timed(feeds))
        if len(times) >= settings.min_iters and time.perf_counter() - start >= settings.min_time_s:
            break
    return times


def benchmark_served(
    session: Session, inputs: tuple[InputSpec, ...], serve: Mapping[int, float], settings: BenchmarkSettings
) -> tuple[dict[str, Any], list[list[float]]]:
    """Requests whose batch sizes are drawn from `serve`, one after another, as a server would see them.

    Returns (stats, [[batch, ms], ...]): per-request latency percentiles, and images/s and ms/image over
    the whole run, which is what the served traffic gets (not what the best batch size gets)."""
    batches = sorted(serve)
    feeds = {b: make_inputs(inputs, b, settings.seed + b) for b in batches}
    for b in batches:  # warm every shape: the first call at a new shape can cost a re-plan or a re-compile
        for _ in range(max(1, settings.warmup_iters)):
            session.infer(feeds[b])
    rng = np.random.default_rng(settings.seed)
    probs = np.array([serve[b] for b in batches])
    timed = _timer(session)
    requests: list[list[float]] = []
    start = time.perf_counter()
    while len(requests) < settings.max_iters:
        for b in rng.choice(batches, size=32, p=probs):
            requests.append([int(b), timed(feeds[int(b)])])
        if len(requests) >= settings.served_requests and time.perf_counter() - start >= settings.min_time_s:
            break
    ms = np.array([r[1] for r in requests])
    images = sum(int(r[0]) for r in requests)
    drawn = {str(b): round(sum(1 for r in requests if r[0] == b) / len(requests), 4) for b in batches}
    stats = {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "ms_per_image": float(ms.sum()) / images,
        "images_per_s": 1e3 * images / float(ms.sum()),
        "requests": len(requests),
        "images": images,
        "mean_batch": images / len(requests),
        "drawn": drawn,
    }
    return stats, [[int(b), round(float(t), 4)] for b, t in requests]


def profile_mismatch(profile: ShapeProfile, serve: Mapping[int, float]) -> str | None:
    """A line for the report when the batch the engine is tuned for is not what it will mostly serve.

    The optimum counts as near when most requests (>= 50%) have a batch within a factor of two of it."""
    near = sum(share for b, share in serve.items() if profile.opt / 2 <= b <= profile.opt * 2)
    if near >= 0.5:
        return None
    mean = sum(b * share for b, share in serve.items())
    top = max(serve, key=lambda b: serve[b])
    return (
        f"profile optimum is batch {profile.opt}, but only {near:.0%} of served requests are within 2x of it "
        f"(most common batch {top} at {serve[top]:.0%}, mean {mean:.2g}): the batch-{profile.opt} figures are not what serving gets"
    )


def latency_stats(times_ms: list[float], batch: int) -> dict[str, float]:
    arr = np.asarray(times_ms)
    p50 = float(np.percentile(arr, 50))
    return {
        "p50_ms": p50,
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "ms_per_image": p50 / batch,
        "images_per_s": 1e3 * batch / p50,
        "iterations": int(arr.size),
    }


def benchmark_latency(
    session: Session, inputs: tuple[InputSpec, ...], profile: ShapeProfile, settings: BenchmarkSettings, progress: bool = True
) -> tuple[dict[str, dict[str, float]], dict[str, list[float]], list[str]]:
    """Latency per batch size: (stats keyed 'bB', raw times keyed 'bB', notes about skipped sizes)."""
    stats: dict[str, dict[str, float]] = {}
    raw: dict[str, list[float]] = {}
    notes: list[str] = []
    # The profile's min, opt and max are always measured: a figure only at a shape nobody serves proves little.
    for batch in sorted(set(settings.batch_sizes) | {profile.min, profile.opt, profile.max}):
        if not profile.contains(batch):
            notes.append(f"batch {batch} skipped: outside the target's profile [{profile.min}, {profile.max}]")
            continue
        feeds = make_inputs(inputs, batch, settings.seed + batch)
        times = time_infer(session, feeds, settings)
        key = f"b{batch}"
        stats[key] = latency_stats(times, batch)
        raw[key] = [round(t, 4) for t in times]
        if progress:
            s = stats[key]
            log.info(
                "batch %3d: p50 %.3f ms, p99 %.3f ms, %.3f ms/image, %.1f images/s (%d iterations)",
                batch,
                s["p50_ms"],
                s["p99_ms"],
                s["ms_per_image"],
                s["images_per_s"],
                s["iterations"],
            )
    return stats, raw, notes


# The metrics file holds the few figures `dvc exp show` and `dvc metrics diff` should show per target;
# every batch size, percentile and error statistic is in reports/runs/<target>.json.
def headline_accuracy(accuracy: Mapping[str, Any]) -> tuple[str, ...]:
    """The accuracy figures of the model's task that `dvc metrics diff` shows (raw outputs: cosine and SQNR)."""
    from .tasks import task_classes

    cls = task_classes().get(accuracy.get("task") or "classification")
    return cls.headline if cls and cls.headline else ("cosine", "sqnr_db")


def significant(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant figures: a fixed number of decimals would flatten a small model's
    0.0123 and 0.0118 ms/image into one value, and print a big one's float noise."""
    if value == 0 or not np.isfinite(value):
        return float(value)
    return round(float(value), digits - 1 - int(np.floor(np.log10(abs(value)))))


def headline_metrics(
    batch: int, main_stats: Mapping[str, float], accuracy: Mapping[str, Any], served: Mapping[str, float] | None
) -> dict[str, Any]:
    """The metrics file of one target: latency and throughput at the main batch, accuracy, served traffic,
    rounded so that `dvc metrics diff` shows differences that mean something."""
    metrics: dict[str, Any] = {
        "batch": batch,
        "ms_per_image": significant(main_stats["ms_per_image"]),
        "images_per_s": significant(main_stats["images_per_s"]),
        **{k: round(accuracy[k], 4) for k in headline_accuracy(accuracy) if isinstance(accuracy.get(k), float)},
    }
    if accuracy.get("reference_degenerate"):
        metrics["reference_degenerate"] = True  # the accuracy figures above prove little
    if served:
        metrics.update(served_images_per_s=significant(served["images_per_s"]), served_p99_ms=significant(served["p99_ms"]))
    return metrics


def run_record(
    target: Any,
    manifest: Mapping[str, Any],
    machine_description: str,
    settings: BenchmarkSettings,
    stats: Mapping[str, Any],
    raw: Mapping[str, Any],
    served: Mapping[str, Any] | None,
    requests: list[Any],
    accuracy: Mapping[str, Any],
    budget: Mapping[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    """Everything one benchmark measured, for reports/runs/<target>.json and the report."""
    return {
        "target": target.name,
        "runtime": target.runtime,
        "precision": manifest["precision"],
        "device": target.device,
        "threads": target.effective_threads,
        "profile": target.profile.to_params(),
        "machine": machine_description,
        "versions": manifest["versions"],
        "settings": settings.to_params(),
        "main_batch": target.main_batch,
        "latency": stats,
        "times_ms": raw,
        "served": {
            "distribution": {str(b): p for b, p in target.serve.items()},
            **served,
            "requests_ms": requests,
            "profile_warning": profile_mismatch(target.profile, target.serve),
        }
        if served and target.serve
        else None,
        "compiler": {k: manifest[k] for k in ("build_seconds", "compile_seconds", "graph", "mode") if k in manifest},
        "accuracy": accuracy,
        "budget": budget,
        "calibration": manifest.get("calibration"),
        "notes": notes,
    }


def skipped_record(target: Any, reason: str) -> dict[str, Any]:
    return {
        "target": target.name,
        "runtime": target.runtime,
        "skipped": reason,
        "precision": {"requested": target.precision, "executed": None},
    }
