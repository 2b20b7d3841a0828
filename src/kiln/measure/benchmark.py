"""Latency and accuracy of one engine, through the runtime protocol only.

Method (after trtexec and benchmark_app): warm-up iterations, then at least
`min_iters` iterations and at least `min_time_s` seconds; every iteration's time is
kept; percentiles per batch size; per-image figures derived from the median.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kiln.config.views import InputSpec, ShapeProfile
from kiln.core.errors import KilnError
from kiln.data.inputs import make_inputs
from kiln.runtimes import DeviceTimedSession, Session, ThroughputSession

log = logging.getLogger(__name__)


DEFAULT_MAX_CV = 0.1
# Iterations the keep-going decision looks back on: enough for quartiles to mean something, few
# enough that a machine that has quietened down is noticed within a fraction of a second.
NOISE_WINDOW = 30
# The interquartile range of a normal distribution is 1.349 standard deviations: scaled by it,
# robust_cv reads like std/mean on Gaussian noise, so one max_cv serves both.
IQR_PER_SIGMA = 1.349


@dataclass(frozen=True)
class BenchmarkSettings:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup_iters: int = 5
    min_iters: int = 20
    min_time_s: float = 2.0
    max_iters: int = 10000
    # Noise: a batch size whose iteration times spread more than this (std/mean; robust_cv for the
    # keep-going decision) is timed longer, and its stats say `noisy`.
    max_cv: float = DEFAULT_MAX_CV
    # ...but never past this many seconds of timing in all for the batch size (min_time_s included).
    noisy_max_time_s: float = 6.0
    seed: int = 7
    accuracy_budget: dict[str, Any] = field(default_factory=dict)
    fail_on_budget: bool = True
    serve: dict[Any, float] | None = None  # default served distribution; parsed per target (Target.serve)
    served_requests: int = 200  # at least this many requests drawn from it (and min_time_s)
    load_sample_s: float = 0.5  # other processes' CPU use sampled this long before and after the timing (machine_load)

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None) -> "BenchmarkSettings":
        from kiln.core.settings import parse

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
            or not self.load_sample_s > 0
        ):
            raise KilnError(
                f"{where}.min_iters and served_requests must be >= 1, warmup_iters and min_time_s >= 0, max_iters >= min_iters, "
                "load_sample_s > 0"
            )
        if not self.max_cv > 0:  # NaN too
            raise KilnError(
                f"{where}.max_cv must be > 0 (the largest spread of iteration times, std/mean, that counts as steady; "
                f"e.g. 0.1), got {self.max_cv}"
            )
        if not self.noisy_max_time_s >= self.min_time_s:
            raise KilnError(
                f"{where}.noisy_max_time_s ({self.noisy_max_time_s}) must be >= min_time_s ({self.min_time_s}): "
                f"it caps the whole timing of a batch size, min_time_s included"
            )

    def to_params(self) -> dict[str, Any]:
        from kiln.core.settings import to_params

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
    """Per-iteration times in ms, after warm-up.

    At least `min_iters` iterations and `min_time_s` seconds; then, if the times so far are noisy
    (robust_cv above `max_cv`), more iterations until the last NOISE_WINDOW of them are steady, or
    `noisy_max_time_s` seconds of timing in all, or `max_iters`. Every time is kept: the extra samples
    are what makes the median of a noisy run trustworthy, and the stats still report the spread."""
    for _ in range(settings.warmup_iters):
        session.infer(feeds)
    timed = _timer(session)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < settings.max_iters:
        times.append(timed(feeds))
        if len(times) >= settings.min_iters and time.perf_counter() - start >= settings.min_time_s:
            break
    noisy = robust_cv(times) > settings.max_cv
    while noisy and len(times) < settings.max_iters and time.perf_counter() - start < settings.noisy_max_time_s:
        times.append(timed(feeds))
        noisy = robust_cv(times[-NOISE_WINDOW:]) > settings.max_cv
    if noisy:
        log.debug(
            "still noisy after %d iterations (robust cv %.3f > max_cv %s)", len(times), robust_cv(times[-NOISE_WINDOW:]), settings.max_cv
        )
    return times


def robust_cv(times_ms: Sequence[float]) -> float:
    """Spread of the middle half of the times relative to their median: (p75 - p25) / (1.349 * p50).

    This, not std/mean, decides whether to keep timing. std/mean is dragged up by a single slow
    iteration (a GC pause, a page fault): one in a window would send the run on to the cap, although
    it does not move the median. The quartiles ignore up to a quarter of the window on either side,
    yet a second mode holding more than a quarter of the iterations (contention, frequency changes,
    alternating fast and slow calls) moves them: that is the noise that can carry the median from one
    mode to the other between runs, and more iterations are the cure. (The MAD would ignore even a 40%
    slow mode; p90 - p10 would react to a few outliers.)"""
    if len(times_ms) < 2:
        return 0.0
    p25, p50, p75 = np.percentile(np.asarray(times_ms, dtype=float), [25, 50, 75])
    return float((p75 - p25) / (IQR_PER_SIGMA * p50)) if p50 > 0 else 0.0


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


def latency_stats(times_ms: list[float], batch: int, max_cv: float = DEFAULT_MAX_CV) -> dict[str, float]:
    """Percentiles, per-image figures and the spread of one batch size's iteration times.

    cv is std/mean (population std: defined for one iteration too), p99_over_p50 the tail; `noisy` is the
    same rule time_infer keeps timing by (robust_cv above max_cv): a few outliers show in cv and the tail,
    but only a spread in the bulk of the times makes the median itself uncertain."""
    arr = np.asarray(times_ms, dtype=float)
    p50 = float(np.percentile(arr, 50))
    p99 = float(np.percentile(arr, 99))
    mean = float(arr.mean())
    cv = float(arr.std() / mean)
    return {
        "p50_ms": p50,
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": p99,
        "mean_ms": mean,
        "ms_per_image": p50 / batch,
        "images_per_s": 1e3 * batch / p50,
        "iterations": int(arr.size),
        "cv": cv,
        "p99_over_p50": p99 / p50,
        "robust_cv": robust_cv(times_ms),
        "noisy": robust_cv(times_ms) > max_cv,
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
        stats[key] = latency_stats(times, batch, settings.max_cv)
        raw[key] = [round(t, 4) for t in times]
        if progress:
            s = stats[key]
            log.info(
                "batch %3d: p50 %.3f ms, p99 %.3f ms, %.3f ms/image, %.1f images/s (%d iterations)%s",
                batch,
                s["p50_ms"],
                s["p99_ms"],
                s["ms_per_image"],
                s["images_per_s"],
                s["iterations"],
                f", noisy: cv {s['cv']:.2f}" if s["noisy"] else "",
            )
    return stats, raw, notes


def benchmark_throughput(session: Session, inputs: tuple[InputSpec, ...], batch: int, settings: BenchmarkSettings) -> dict[str, Any]:
    """images/s with several requests in flight, through the session's own concurrent API (ThroughputSession),
    at `batch` for min_time_s (at least min_iters runs): MLPerf's Offline scenario. A session without one says so."""
    if not isinstance(session, ThroughputSession):
        return {"batch": batch, "images_per_s": None, "why": "the runtime offers no concurrent mode: synchronous latency only"}
    result = session.throughput(make_inputs(inputs, batch, settings.seed + batch), max(settings.min_time_s, 0.2), settings.min_iters)
    log.info(
        "throughput mode at batch %d: %.1f images/s with %s requests in flight", batch, result["images_per_s"], result["requests_in_flight"]
    )
    return {"batch": batch, **result}


# The metrics file holds the few figures `dvc exp show` and `dvc metrics diff` should show per target;
# every batch size, percentile and error statistic is in reports/runs/<target>.json.
def headline_accuracy(accuracy: Mapping[str, Any]) -> tuple[str, ...]:
    """The accuracy figures of the model's task that `dvc metrics diff` shows (raw outputs: cosine and SQNR)."""
    from kiln.accuracy.tasks import task_classes

    cls = task_classes().get(accuracy.get("task") or "classification")
    return cls.headline if cls and cls.headline else ("cosine", "sqnr_db")


def significant(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant figures: a fixed number of decimals would flatten a small model's
    0.0123 and 0.0118 ms/image into one value, and print a big one's float noise."""
    if value == 0 or not np.isfinite(value):
        return float(value)
    return round(float(value), digits - 1 - int(np.floor(np.log10(abs(value)))))


def headline_metrics(
    batch: int,
    main_stats: Mapping[str, float],
    accuracy: Mapping[str, Any],
    served: Mapping[str, float] | None,
    throughput: Mapping[str, Any] | None = None,
    costs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics file of one target: latency and throughput at the main batch, accuracy, served traffic,
    rounded so that `dvc metrics diff` shows differences that mean something."""
    metrics: dict[str, Any] = {
        "batch": batch,
        "ms_per_image": significant(main_stats["ms_per_image"]),
        "images_per_s": significant(main_stats["images_per_s"]),
        **_spread(main_stats),
        **{k: round(accuracy[k], 4) for k in headline_accuracy(accuracy) if isinstance(accuracy.get(k), float)},
    }
    if accuracy.get("reference_degenerate"):
        metrics["reference_degenerate"] = True  # the accuracy figures above prove little
    if served:
        metrics.update(served_images_per_s=significant(served["images_per_s"]), served_p99_ms=significant(served["p99_ms"]))
    if throughput and throughput.get("images_per_s"):
        metrics["throughput_images_per_s"] = significant(throughput["images_per_s"])
    for key in COST_METRICS:
        if (costs or {}).get(key) is not None:
            metrics[key] = significant(costs[key], 3)  # type: ignore[index]
    return metrics


def _spread(main_stats: Mapping[str, Any]) -> dict[str, float]:
    """`ms_per_image_spread_pct`: the spread of the main batch's timed iterations (robust cv, in percent), so that a
    comparison of two runs can tell a change from noise (kiln.report.changes)."""
    spread = main_stats.get("robust_cv", main_stats.get("cv"))
    if not isinstance(spread, (int, float)) or not np.isfinite(spread):
        return {}
    return {"ms_per_image_spread_pct": significant(100.0 * float(spread), 2)}


# What an engine costs, in the metrics file: memory, disk, cold start, build (kiln.measure.costs; the run record says how).
COST_METRICS = ("peak_rss_mb", "engine_mb", "load_s", "first_infer_ms", "build_s")


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
    throughput: Mapping[str, Any] | None = None,
    costs: Mapping[str, Any] | None = None,
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
        "tuning": manifest.get("tuning"),
        "throughput": throughput,
        "costs": costs,
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
