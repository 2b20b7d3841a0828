"""Latency and accuracy of one engine, through the runtime protocol only.

Method (after trtexec and benchmark_app): warm-up iterations, then at least
`min_iters` iterations and at least `min_time_s` seconds; every iteration's time is
kept; percentiles per batch size; per-image figures derived from the median.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .compare import compare_outputs, summarize
from .config import InputSpec, ShapeProfile
from .errors import KilnError
from .inputs import make_inputs
from .runtimes import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkSettings:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup_iters: int = 5
    min_iters: int = 20
    min_time_s: float = 2.0
    max_iters: int = 10000
    seed: int = 7

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None) -> "BenchmarkSettings":
        raw = dict(raw or {})
        known = {"batch_sizes", "warmup_iters", "min_iters", "min_time_s", "max_iters", "seed"}
        unknown = set(raw) - known
        if unknown:
            raise KilnError(f"benchmark has unknown keys {sorted(unknown)}; known: {', '.join(sorted(known))}")
        s = cls(**{k: (tuple(v) if k == "batch_sizes" else v) for k, v in raw.items()})
        if not s.batch_sizes or any(not isinstance(b, int) or b < 1 for b in s.batch_sizes):
            raise KilnError(f"benchmark.batch_sizes must be a non-empty list of positive integers, got {list(s.batch_sizes)}")
        if s.min_iters < 1 or s.warmup_iters < 0 or s.min_time_s < 0:
            raise KilnError("benchmark.min_iters must be >= 1, warmup_iters and min_time_s >= 0")
        return s


def time_infer(session: Session, feeds: Mapping[str, np.ndarray], settings: BenchmarkSettings) -> list[float]:
    """Per-iteration wall times in ms, after warm-up."""
    for _ in range(settings.warmup_iters):
        session.infer(feeds)
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    while len(times) < settings.max_iters:
        t0 = clock()
        session.infer(feeds)
        t1 = clock()
        times.append((t1 - t0) * 1e3)
        if len(times) >= settings.min_iters and t1 - start >= settings.min_time_s:
            break
    return times


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
    for batch in settings.batch_sizes:
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
            log.info("batch %3d: p50 %.3f ms, p99 %.3f ms, %.3f ms/image, %.1f images/s (%d iterations)",
                     batch, s["p50_ms"], s["p99_ms"], s["ms_per_image"], s["images_per_s"], s["iterations"])
    return stats, raw, notes


def accuracy_against_reference(
    session: Session, inputs: tuple[InputSpec, ...], reference: Mapping[str, np.ndarray], seed: int, chunk: int
) -> dict[str, Any]:
    """The engine's outputs on the reference inputs, compared with the eager fp32 outputs."""
    samples = next(iter(reference.values())).shape[0]
    feeds = make_inputs(inputs, samples, seed)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in reference}
    for start in range(0, samples, chunk):
        out = session.infer({k: v[start : start + chunk] for k, v in feeds.items()})
        for n in reference:
            parts[n].append(np.asarray(out[n], dtype=np.float32))
    got = {n: np.concatenate(v) for n, v in parts.items()}
    comparisons = compare_outputs(reference, got)
    return {**summarize(comparisons), "samples": samples, "outputs": {c.name: c.to_dict() for c in comparisons}}
