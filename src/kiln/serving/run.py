"""The benchmark's open-loop step for one target: the highest request rate within the SLO, the latency at half
and nine tenths of it, the latency-throughput curve, and the same again with the recommended batcher.

Settings are the params block `serving` (conf/serving/); the served sizes are the target's `serve`
distribution. Every target gets the same seeded arrivals (scaled to each rate), so targets compare.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from kiln.config.views import InputSpec, Target
from kiln.core.errors import KilnError
from kiln.runtimes import Session, concurrency_limit, runtime_info
from kiln.serving.arrivals import mean_size, poisson_arrivals
from kiln.serving.batcher import BatcherSettings
from kiln.serving.configs import Axes, ServingConfig, hill_climb
from kiln.serving.early_stop import decide_latencies
from kiln.serving.load import LoadResult, feeds_cache, run_load, warm_up
from kiln.serving.offline import served_vs_offline
from kiln.serving.queue_model import model_max_rate, simulate
from kiln.serving.recommend import latency_at, recommend_profile
from kiln.serving.slo import cost_per_million, max_rate_at_slo, out_of_reach, probe_decision, sweep
from kiln.serving.steady import SteadyCheck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingSettings:
    """Params block `serving`."""

    enabled: bool = True
    slo_ms: float = 250.0  # p99 end-to-end latency a request may take, queueing included
    cost_per_hour: float | None = None  # the machine's price: cost per million requests at max_rate_at_slo
    max_batch: int | None = None  # the dynamic batcher's largest batch; null: the target profile's opt
    max_queue_delay_ms: float = 5.0  # how long the oldest request may wait for company
    workers: int = 1  # inferences in flight
    seconds_per_rate: float = 3.0  # each offered rate is sent at least this long (and drained for at most as long)...
    min_requests: int = 150  # ...and until this many requests completed: a p99 needs a tail
    confidence: float = 0.99  # a probe runs until its requests decide its p99 at this confidence (LoadGen's early stopping)...
    max_seconds_per_rate: float = 20.0  # ...or this long, and is then undecided (counted as failing: the answer errs low)
    search_iterations: int = 4  # bisections of the rate search after its lowest and highest probe
    curve_rates: int = 0  # extra evenly spaced rates for the latency-throughput curve (the full sweep: e.g. 8)
    contention: bool = False  # also time the engine while a second copy of it runs beside it (doubles that time)
    contention_s: float = 1.0  # ...alone, then beside it, this long each (at least benchmark.min_time_s)
    steady_check_s: float = 0.5  # the engine's closed-loop median timed this long just before and just after the search
    measure_recommended: bool = False  # search again with the recommended batcher (the deep study): offered only when better
    # model_analyzer's search: workers x max batch (the profile's measured batches) x queue delay, hill-climbed from the
    # batcher above within config_budget_s, each configuration's rate searched with short probes (ranking_settings)
    search_configs: bool = False
    config_budget_s: float = 120.0
    config_workers: tuple[int, ...] = (1, 2)
    config_delays_ms: tuple[float, ...] = (1.0, 5.0, 20.0)
    seed: int = 7

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None) -> "ServingSettings":
        from kiln.core.settings import parse

        return parse(cls, raw, "serving")

    def check(self, where: str) -> None:
        if not self.slo_ms > 0:
            raise KilnError(f"{where}.slo_ms must be a positive number of milliseconds, got {self.slo_ms}")
        if self.cost_per_hour is not None and not self.cost_per_hour >= 0:
            raise KilnError(f"{where}.cost_per_hour must be >= 0 (the machine's price per hour) or null, got {self.cost_per_hour}")
        if not self.seconds_per_rate > 0 or self.search_iterations < 0 or self.curve_rates < 0 or self.min_requests < 1:
            raise KilnError(f"{where}: seconds_per_rate must be > 0, min_requests >= 1, search_iterations and curve_rates >= 0")
        if not self.contention_s > 0 or not self.steady_check_s > 0:
            raise KilnError(f"{where}: contention_s and steady_check_s must be > 0 seconds, got {self.contention_s}, {self.steady_check_s}")
        if not 0.5 <= self.confidence < 1:
            raise KilnError(f"{where}.confidence must be at least 0.5 and below 1 (e.g. 0.99), got {self.confidence}")
        if not self.config_budget_s > 0 or not self.config_workers or min(self.config_workers) < 1:
            raise KilnError(f"{where}: config_budget_s must be > 0 and config_workers a non-empty list of counts >= 1")
        if not self.config_delays_ms or min(self.config_delays_ms) < 0:
            raise KilnError(f"{where}.config_delays_ms must be a non-empty list of delays >= 0 ms, got {list(self.config_delays_ms)}")
        if not self.max_seconds_per_rate >= self.seconds_per_rate:
            raise KilnError(
                f"{where}.max_seconds_per_rate ({self.max_seconds_per_rate}) must be at least seconds_per_rate ({self.seconds_per_rate})"
            )

    def batcher(self, target: Target) -> BatcherSettings:
        return BatcherSettings(self.max_batch or target.profile.opt, self.max_queue_delay_ms, self.workers)

    def ranking_settings(self) -> "ServingSettings":
        """The probes that compare serving configurations: every one the same, and short (a few seconds each, at most
        three bisections), so that a budget of minutes tries several; their rates rank, they are not the study's answer."""
        return replace(
            self,
            max_seconds_per_rate=max(self.seconds_per_rate, min(self.max_seconds_per_rate, 3.0)),
            search_iterations=min(self.search_iterations, 3),
        )


def check_serving(settings: ServingSettings, target: Target) -> None:
    """What configure can refuse before anything runs: a batcher the target's profile or traffic cannot take."""
    if settings.enabled and target.serve:
        try:
            settings.batcher(target).check_against(target.profile, target.serve, "serving")
        except KilnError as e:
            raise KilnError(f"targets.{target.name}: {e}") from e


def _window(rate: float, settings: ServingSettings, sanity: bool = False) -> tuple[float, float]:
    """(least, most) seconds to offer `rate`: at least seconds_per_rate and long enough for min_requests, then on
    until the requests decide the p99 (early stopping), max_seconds_per_rate at most. The search's lowest probe
    only shows the objective can be met at all (a rate far below the answer, never claimed): seconds_per_rate."""
    if sanity:
        return settings.seconds_per_rate, settings.seconds_per_rate
    least = min(max(settings.seconds_per_rate, settings.min_requests / rate), settings.max_seconds_per_rate)
    return least, settings.max_seconds_per_rate


def _requests(rate: float, seconds: float) -> int:
    return max(20, math.ceil(rate * seconds * 1.1))


def expected_probes(settings: ServingSettings) -> int:
    """Probes a search usually takes: lo, hi, the bisections, one confirmation, and the 50% and 90% points; the
    recommended batcher's search as many again where it is measured."""
    one = 3 + settings.search_iterations + 1  # lo, the model's bracket (0.8x), hi, the bisections, the confirmation
    return one + 2 + (one if settings.measure_recommended else 0)


class ProbeProgress:
    """One line per probe, with a rough time left: a search takes minutes on a slow engine."""

    def __init__(self, name: str, settings: ServingSettings) -> None:
        self.name, self.settings, self.done, self.start = name, settings, 0, time.perf_counter()

    def probe(self, rate: float, result: LoadResult, decision: str) -> None:
        self.done += 1
        expected = max(expected_probes(self.settings), self.done)
        p99 = result.summary()["e2e_p99_ms"]
        left = (time.perf_counter() - self.start) / self.done * (expected - self.done)
        verdict = {"within": "within the objective", "over": "over the objective", "undecided": "undecided"}[decision]
        log.info(
            "%s: open-loop probe %d of about %d: %.3g requests/s, %d requests in %.1f s, p99 %.4g ms (%s%s); about %.0f s left",
            self.name,
            self.done,
            expected,
            rate,
            len(result.e2e_ms),
            result.wall_s,
            p99,
            verdict,
            f" at {self.settings.confidence:.0%} confidence" if decision != "undecided" else "",
            left,
        )


def check_slo_reachable(slo_ms: float, latency: Mapping[str, Mapping[str, float]], sizes: Mapping[int, float], name: str) -> None:
    """An objective below one inference of the smallest served request cannot be met at any rate: a config error."""
    smallest = min(b for b, share in sizes.items() if share > 0)
    fastest = min((s["p50_ms"], int(k[1:])) for k, s in latency.items() if int(k[1:]) >= smallest)
    if fastest[0] > slo_ms:
        raise KilnError(
            f"serving.slo_ms {slo_ms:g} is below targets.{name}'s fastest single inference for its smallest served request "
            f"({fastest[0]:.4g} ms at batch {fastest[1]}, closed loop, median): no request rate can meet it. Raise serving.slo_ms "
            f"above {fastest[0]:.3g} ms (a few times that leaves room for queueing), make the engine faster, or set "
            f"serving.enabled: false"
        )


def serve_under_load(
    session: Session,
    inputs: tuple[InputSpec, ...],
    target: Target,
    latency: Mapping[str, Mapping[str, float]],
    settings: ServingSettings,
    throughput: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Open-loop load for `target`'s served sizes; `latency` is the closed-loop stats per batch ('bN' keys), and
    `throughput` the throughput mode's record (the offline figure the served images/s are compared with)."""
    assert target.serve
    start = time.perf_counter()
    sizes = dict(target.serve)
    feeds_for = feeds_cache(inputs, settings.seed)
    current = settings.batcher(target)
    check_slo_reachable(settings.slo_ms, latency, sizes, target.name)
    by_batch = {int(k[1:]): s["p50_ms"] for k, s in latency.items()}
    profiles = runtime_info(target.runtime).profiles
    shapes = {i.name: i.shape for i in inputs}
    recommended = recommend_profile(sizes, by_batch, settings.slo_ms, target.profile, target.name, profiles, shapes)
    progress = ProbeProgress(target.name, settings)
    steady = SteadyCheck(session, feeds_for(target.main_batch), settings.steady_check_s)

    def search(batcher: BatcherSettings, s: ServingSettings = settings, watch: bool = True) -> tuple[dict[str, Any], Any]:
        unreachable = out_of_reach(sizes, {b: latency_at(by_batch, b) for b in sizes}, s.slo_ms)
        if unreachable is not None:  # known from the closed-loop figures: no probe could earn a rate, nor a modelled one
            log.warning("%s: %s", target.name, unreachable["reason"])
            unreachable.update(at_max=None, model={"max_rate": 0.0, "p99_ms": math.nan, "utilisation": 0.0, "vs_measured": math.nan})
            return unreachable, None
        warm_up(session, feeds_for, batcher.max_batch)
        # No batching beats the best closed-loop images/s at a batch the batcher can form: hi fails by construction
        # (20% over it, for the noise in that figure; a tighter bracket leaves the bisections finer steps).
        best = max(st["images_per_s"] for b, st in ((int(k[1:]), st) for k, st in latency.items()) if b <= batcher.max_batch)
        hi = 1.2 * best * batcher.workers / mean_size(sizes)
        lo = hi / 20
        # The rate the engine's own medians allow (kiln.serving.queue_model): the bracket starts around it, 0.8x to
        # 1.25x; an answer outside it costs the probes it did before (a failed 0.8x bisects below it, a passing
        # 1.25x is raised).
        model = model_max_rate(sizes, by_batch, batcher, s.slo_ms, seed=s.seed)
        guess = model["max_rate"]
        if guess > 0:
            lo = min(lo, guess / 4)  # the sanity probe far below the answer, also where the model puts it low
        start = 0.8 * guess if lo < 0.8 * guess < hi else None
        if start is not None:
            hi = min(hi, max(1.25 * guess, 1.1 * start))

        def expected(rate: float) -> float:  # the model's p99 at `rate`: what steers a probe too short to decide
            return float(np.percentile(simulate(rate, sizes, by_batch, batcher, seed=s.seed), 99))

        last: dict[float, dict[str, Any]] = {}  # each rate's latest probe summary: the answer's, for its mean batch

        def decided(e2e: Any) -> bool:  # early stopping: the requests so far decide the p99 either way
            return len(e2e) >= s.min_requests and decide_latencies(e2e, s.slo_ms, 99, s.confidence) != "undecided"

        def run_with(seed: int) -> Any:
            def run_at(rate: float) -> LoadResult:
                sanity = rate <= lo * 1.0001
                least, most = _window(rate, s, sanity)
                arrivals = poisson_arrivals(rate, _requests(rate, most), sizes, seed)
                result = run_load(
                    session,
                    feeds_for,
                    arrivals,
                    batcher,
                    most,
                    max_drain_s=s.seconds_per_rate,
                    settled=None if sanity else decided,
                    min_seconds=least,
                )
                last[rate] = result.summary()
                if watch:  # the configuration search's other worker counts change single-image times by design
                    steady.probe(rate, result.batch, result.compute_ms)
                progress.probe(rate, result, probe_decision(result, s.slo_ms, 99, s.confidence, s.min_requests))
                return result

            return run_at

        run_at = run_with(s.seed)
        result = max_rate_at_slo(
            run_at,
            s.slo_ms,
            lo,
            hi,
            s.search_iterations,
            confirm=run_with(s.seed + 1),
            confidence=s.confidence,
            min_requests=s.min_requests,
            start=start,
            expected=expected,
        )
        result["at_max"] = _at_max(last.get(result["max_rate"]))
        result["model"] = {**model, "vs_measured": result["max_rate"] / guess if guess > 0 else math.nan}
        return result, run_at

    found, run_at = search(current)
    rate = found["max_rate"]
    record: dict[str, Any] = {
        "slo_ms": settings.slo_ms,
        "sizes": {str(b): p for b, p in sizes.items()},
        "batcher": {"max_batch": current.max_batch, "max_queue_delay_ms": current.max_queue_delay_ms, "workers": current.workers},
        "max_rate_at_slo": rate,
        "p99_ms_at_max": found["p99_ms_at_max"],
        "at_max": found["at_max"],
        # the batcher on the engine's closed-loop medians alone (kiln.serving.queue_model): what serving costs beyond them
        "model": found["model"],
        "search": {
            "tried": [[r, lat, ok] for r, lat, ok in found["tried"]],
            "confirmed": [[r, lat, ok] for r, lat, ok in found["confirmed"]],
            "undecided": found["undecided"],
            "confidence": found["confidence"],
            "reason": found["reason"],
            "settled": found["settled"],
            "unsettled": found["unsettled"],
        },
    }
    if rate > 0:
        at = sweep(run_at, [0.5 * rate, 0.9 * rate])
        record["at_50pct"], record["at_90pct"] = at
    if settings.curve_rates and rate > 0:
        record["curve"] = sweep(run_at, [rate * 1.5 * (i + 1) / settings.curve_rates for i in range(settings.curve_rates)])
    if settings.cost_per_hour is not None:
        record["cost_per_million"] = cost_per_million(rate, settings.cost_per_hour)
    record["vs_offline"] = served_vs_offline(record, latency, throughput)
    # The recommended batcher on this engine, when the engine accepts its batches (a new profile needs a rebuild).
    rec = recommended["batcher"]
    record["recommended"] = recommended
    rec_batcher = BatcherSettings(rec["max_batch"], rec["max_queue_delay_ms"], current.workers)
    if rec_batcher == current:
        record["recommended_max_rate_at_slo"] = rate
    elif not settings.measure_recommended:
        record["recommended_note"] = "not measured: serving.measure_recommended is off (study=deep measures it)"
    elif target.profile.contains(rec_batcher.max_batch):
        again, _ = search(rec_batcher)
        record["recommended_max_rate_at_slo"] = again["max_rate"]
        record["recommended_p99_ms_at_max"] = again["p99_ms_at_max"]
    else:
        record["recommended_note"] = (
            f"the recommended max_batch {rec_batcher.max_batch} is outside this engine's profile "
            f"[{target.profile.min}, {target.profile.max}]: rebuild with `{recommended['override']}` to measure it"
        )
    if settings.search_configs:
        record["configs"] = search_configs(session, target, latency, settings, throughput, record, search)
    record["steady"] = steady.after()
    if not record["steady"]["steady"]:
        log.warning("%s: %s", target.name, record["steady"]["why"])
        if record["search"]["settled"]:  # a maximum measured on a machine that changed speed is not this engine's
            record["search"].update(settled=False, unsettled="unsteady", reason=f"{record['search']['reason']}; {record['steady']['why']}")
    record["seconds"] = round(time.perf_counter() - start, 1)
    again_rate = record.get("recommended_max_rate_at_slo")
    log.info(
        "open loop, p99 within %g ms: %.1f requests/s, %.2fx the queue model's %.1f (batcher max %d, %g ms); recommended batcher: "
        "%s requests/s (%.0f s)",
        settings.slo_ms,
        rate,
        record["model"]["vs_measured"],
        record["model"]["max_rate"],
        current.max_batch,
        current.max_queue_delay_ms,
        "n/a" if again_rate is None else f"{again_rate:.1f}",
        record["seconds"],
    )
    return record


def _at_max(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    keys = ("mean_batch", "images_per_s", "e2e_p99_ms", "p99_queue_share", "requests_completed")
    return {k: summary[k] for k in keys} if summary else None


def search_configs(
    session: Session,
    target: Target,
    latency: Mapping[str, Mapping[str, float]],
    settings: ServingSettings,
    throughput: Mapping[str, Any] | None,
    record: Mapping[str, Any],
    search: Any,
) -> dict[str, Any]:
    """model_analyzer's search on this engine (kiln.serving.configs): configurations from the current batcher, each
    rate searched with the ranking probes; the best's served images/s against offline."""
    ranking = settings.ranking_settings()
    limit = concurrency_limit(session)
    workers = [w for w in settings.config_workers if limit is None or w <= limit]
    largest = max(b for b, share in dict(target.serve or {1: 1.0}).items() if share > 0)  # a request is never split
    batches = [b for b in sorted(int(k[1:]) for k in latency) if max(target.profile.min, largest) <= b <= target.profile.max]
    start = ServingConfig.of(settings.batcher(target))
    axes = Axes.around(start, workers or [start.workers], batches, settings.config_delays_ms)

    def evaluate(config: ServingConfig) -> dict[str, Any]:
        t0 = time.perf_counter()
        found, _ = search(config.batcher(), ranking, watch=False)
        return {
            "max_rate": found["max_rate"],
            "p99_ms_at_max": found["p99_ms_at_max"],
            "unsettled": found["unsettled"],
            "at_max": found["at_max"],
            "seconds": round(time.perf_counter() - t0, 1),
        }

    log.info(
        "%s: searching serving configurations (workers %s, max batch %s, delay %s ms) for at most %.0f s",
        target.name,
        list(axes.workers),
        list(axes.max_batch),
        list(axes.max_queue_delay_ms),
        settings.config_budget_s,
    )
    result = hill_climb(evaluate, start, axes, settings.config_budget_s)
    result["probes"] = (
        f"every configuration searched alike: probes of {ranking.seconds_per_rate:g}-{ranking.max_seconds_per_rate:g} s, "
        f"{ranking.search_iterations} bisections (rates that rank, a little below the study's own search)"
    )
    chosen = next((p for p in result["points"] if p["chosen"]), None)
    if chosen:
        at_chosen = {**record, "max_rate_at_slo": chosen["max_rate"], "at_max": chosen["at_max"]}
        result["vs_offline"] = served_vs_offline(at_chosen, latency, throughput)
    return result


def preprocessing_cost(preprocess: Any, images: int = 15) -> dict[str, Any]:
    """ms per image of kiln's own preprocessing (`data.preprocess`; with fold_preprocess only the decode, resize
    and crop the graph does not do) on a 640x480 JPEG of a sample photograph, the size a phone upload is
    scaled to: what each frame costs before the engine sees it."""
    import tempfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from kiln.data.images import photograph

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frame.jpg"
        Image.fromarray(photograph("astronaut")).convert("RGB").resize((640, 480)).save(path, quality=90)
        preprocess(path)  # first call: imports and PIL's decoder set-up
        times = []
        for _ in range(images):
            t0 = time.perf_counter()
            preprocess(path)
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "ms_per_image": float(np.median(times)),
        "what": "decode + resize + crop" + ("" if preprocess.dtype == "uint8" else " + normalise") + " of a 640x480 JPEG",
        "images": images,
    }
