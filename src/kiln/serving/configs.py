"""The serving configuration worth shipping: engine instances x the batcher's max batch x its queue delay, searched
the way Triton's model_analyzer does (its quick mode: hill climbing from a start, within a time budget).

Each configuration is judged by the highest rate it holds within the objective (the rate search of
`kiln.serving.slo`, with the same probe settings for every configuration, so they compare); a move to a
neighbour (one axis one step along its list) is taken only when it holds at least MIN_GAIN more, since a
smaller gain is within the search's own noise. The configurations tried are reported as a Pareto front of rate
against p99 at that rate, and the best within the objective is the one with the highest rate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from kiln.serving.batcher import BatcherSettings

log = logging.getLogger(__name__)

MIN_GAIN = 0.05  # a neighbour must hold 5% more requests/s to be moved to


@dataclass(frozen=True, order=True)
class ServingConfig:
    workers: int
    max_batch: int
    max_queue_delay_ms: float

    @classmethod
    def of(cls, batcher: BatcherSettings) -> "ServingConfig":
        return cls(batcher.workers, batcher.max_batch, float(batcher.max_queue_delay_ms))

    def batcher(self) -> BatcherSettings:
        return BatcherSettings(self.max_batch, self.max_queue_delay_ms, self.workers)

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "max_batch": self.max_batch, "max_queue_delay_ms": self.max_queue_delay_ms}

    def label(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}, max batch {self.max_batch}, delay {self.max_queue_delay_ms:g} ms"


# A configuration's result: at least "max_rate" and "p99_ms_at_max" (the search's), anything else is kept.
Evaluate = Callable[[ServingConfig], Mapping[str, Any]]


@dataclass(frozen=True)
class Axes:
    """The values each axis may take, each list sorted; the start's own values are added where missing."""

    workers: tuple[int, ...]
    max_batch: tuple[int, ...]
    max_queue_delay_ms: tuple[float, ...]

    @classmethod
    def around(cls, start: ServingConfig, workers: Sequence[int], batches: Sequence[int], delays: Sequence[float]) -> "Axes":
        return cls(
            tuple(sorted({*workers, start.workers})),
            tuple(sorted({*batches, start.max_batch})),
            tuple(sorted({*(float(d) for d in delays), start.max_queue_delay_ms})),
        )

    def neighbours(self, config: ServingConfig) -> list[ServingConfig]:
        """The configurations one step away along one axis, in the order the search tries them."""
        out = []
        for axis in ("max_batch", "workers", "max_queue_delay_ms"):
            values: tuple[Any, ...] = getattr(self, axis)
            i = values.index(getattr(config, axis))
            for j in (i + 1, i - 1):  # larger first: more batching or instances is where a busy engine gains
                if 0 <= j < len(values):
                    out.append(ServingConfig(**{**config.to_dict(), axis: values[j]}))
        return out


def pareto_front(points: Mapping[ServingConfig, Mapping[str, Any]]) -> list[ServingConfig]:
    """The configurations no other beats on both rate (higher) and p99 at that rate (lower), by rate, highest first."""
    held = {c: p for c, p in points.items() if (p.get("max_rate") or 0) > 0}

    def dominated(c: ServingConfig) -> bool:
        rate, p99 = held[c]["max_rate"], held[c]["p99_ms_at_max"]
        return any(
            (o["max_rate"] >= rate and o["p99_ms_at_max"] <= p99) and (o["max_rate"] > rate or o["p99_ms_at_max"] < p99)
            for d, o in held.items()
            if d != c
        )

    return sorted((c for c in held if not dominated(c)), key=lambda c: -held[c]["max_rate"])


def best_config(points: Mapping[ServingConfig, Mapping[str, Any]]) -> ServingConfig | None:
    """The highest rate within the objective; a tie goes to the lower p99, then to fewer workers and smaller batches."""
    held = [c for c, p in points.items() if (p.get("max_rate") or 0) > 0]
    if not held:
        return None
    return min(held, key=lambda c: (-points[c]["max_rate"], points[c]["p99_ms_at_max"], c))


def hill_climb(
    evaluate: Evaluate,
    start: ServingConfig,
    axes: Axes,
    budget_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Evaluate `start`, then its unvisited neighbours, and move to the best of them while it gains MIN_GAIN; stop when
    none does ("converged") or when the next evaluation would end past `budget_s` at the pace so far ("budget")."""
    began = clock()
    points: dict[ServingConfig, Mapping[str, Any]] = {start: evaluate(start)}
    current, stopped = start, "converged"
    while True:
        for config in axes.neighbours(current):
            if config in points:
                continue
            elapsed = clock() - began
            if elapsed + elapsed / len(points) > budget_s:
                stopped = "budget"
                break
            points[config] = evaluate(config)
            log.info(
                "configuration %d (%s): %.4g requests/s within the objective; %.0f of %.0f s spent",
                len(points),
                config.label(),
                points[config].get("max_rate") or 0.0,
                clock() - began,
                budget_s,
            )
        rate = points[current].get("max_rate") or 0.0
        better = [c for c in axes.neighbours(current) if c in points and (points[c].get("max_rate") or 0.0) > rate * (1 + MIN_GAIN)]
        if stopped == "budget" or not better:
            break
        current = max(better, key=lambda c: points[c]["max_rate"])
    front = pareto_front(points)
    chosen = best_config(points)
    return {
        "start": start.to_dict(),
        "chosen": chosen.to_dict() if chosen else None,
        "stopped": stopped,
        "seconds": round(clock() - began, 1),
        "budget_s": budget_s,
        "points": [
            {**c.to_dict(), **dict(p), "pareto": c in front, "chosen": c == chosen} for c, p in sorted(points.items(), key=lambda kv: kv[0])
        ],
    }
