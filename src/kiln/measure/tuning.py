"""Per-target tuning: search a runtime's knobs on this machine and keep a winner only when it beats the default
by more than the measurement's own spread.

Each runtime declares its knobs next to its options dataclass (`TunableRuntime.knobs(target)`): a field of
the options, or the target's `threads`, with the values worth trying. The tuner knows no runtime by name:

- Coordinate descent, knobs in the order the runtime declares them: each value is tried against the best
  settings so far, and the better one goes on. A load-time knob reloads the engine with the new settings; a
  build-time knob (`rebuild`) builds a candidate engine beside it.
- Every comparison is paired and interleaved: `rounds` rounds, each timing both sessions for `round_s`
  (the order alternating), at the profile's opt batch. The candidate's time is the median of its per-round
  ratios to the incumbent; it wins when that ratio is below 1 - max(min_gain, spread), the spread being
  half the range of the per-round ratios. On a machine whose load moves timings, the spread grows and
  nothing wins: noise cannot pick a setting.
- The winner is measured once more against the default; if it no longer wins, the default stays.
- The search stops when the next trial would overrun `budget_s` (estimated from the trials so far, and
  from the build time for a rebuild), and says so.

The outcome goes into the engine's manifest (`tuning`); loading applies its `changed` settings
(`tuned_target`), so the benchmark measures the engine as tuned.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from kiln.config.views import Target
from kiln.core.errors import KilnError, first_line
from kiln.data.inputs import make_inputs
from kiln.runtimes import BuildSource, Knob, Runtime, Session, runtime_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuningSettings:
    """Params block `tuning`: how long and how carefully each target with `tune: true` is tuned."""

    budget_s: float = 30.0  # wall seconds per target, builds of candidates included
    rounds: int = 5  # interleaved rounds per comparison
    round_s: float = 0.15  # seconds each session is timed per round (at least 3 inferences)
    warmup_iters: int = 3  # per newly loaded candidate, before its first round
    min_gain: float = 0.03  # a candidate must be at least this much faster, and more than the spread
    batch: int | None = None  # null: the target profile's opt
    seed: int = 7

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None) -> "TuningSettings":
        from kiln.core.settings import parse

        return parse(cls, raw, "tuning")

    def check(self, where: str) -> None:
        if self.budget_s <= 0 or self.rounds < 2 or self.round_s <= 0 or self.min_gain < 0 or self.warmup_iters < 0:
            raise KilnError(f"{where}: budget_s and round_s must be > 0, rounds >= 2, min_gain and warmup_iters >= 0")
        if self.batch is not None and self.batch < 1:
            raise KilnError(f"{where}.batch must be a positive integer or null (the profile's opt), got {self.batch}")


def with_settings(target: Target, changed: Mapping[str, Any]) -> Target:
    """`target` with knob values applied: `threads` on the target, everything else in its options."""
    options = {**target.options, **{k: v for k, v in changed.items() if k != "threads"}}
    return dataclasses.replace(target, options=options, threads=changed.get("threads", target.threads))


def tuned_target(target: Target, manifest: Mapping[str, Any]) -> Target:
    """The target as its engine was tuned: what a session must be loaded with to run the winning settings."""
    changed = (manifest.get("tuning") or {}).get("changed") or {}
    return with_settings(target, changed) if changed else target


def current_value(target: Target, knob: Knob, runtime: Runtime) -> Any:
    if knob.name == "threads":
        return target.effective_threads
    return getattr(runtime_options(runtime, target), knob.name)


@dataclass
class _Candidate:
    changed: dict[str, Any]
    target: Target
    engine_dir: Path
    extra: dict[str, Any]
    session: Session | None = None
    warm: bool = False


class _Timer:
    """Paired, interleaved timing of two sessions on the same inputs."""

    def __init__(self, feeds: Mapping[str, np.ndarray], batch: int, settings: TuningSettings):
        self.feeds, self.batch, self.settings = feeds, batch, settings

    def _round(self, c: _Candidate) -> float:
        assert c.session is not None
        if not c.warm:
            for _ in range(self.settings.warmup_iters):
                c.session.infer(self.feeds)
            c.warm = True
        # Not kiln.measure.benchmark.time_infer: the build stage reaches this module, and importing the benchmark here
        # would put it (and the tasks it reaches) into every build's code digest, re-building all engines
        # whenever the benchmark changes.
        times = []
        start = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < self.settings.round_s:
            t0 = time.perf_counter()
            c.session.infer(self.feeds)
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e3

    def compare(self, incumbent: _Candidate, candidate: _Candidate) -> dict[str, float]:
        """Per-round medians of both, and the candidate's median ratio to the incumbent with its spread."""
        ours, theirs = [], []
        for r in range(self.settings.rounds):
            pair = (incumbent, candidate) if r % 2 == 0 else (candidate, incumbent)
            ms = {id(c): self._round(c) for c in pair}
            ours.append(ms[id(incumbent)])
            theirs.append(ms[id(candidate)])
        ratios = np.array(theirs) / np.array(ours)
        return {
            "incumbent_ms": float(np.median(ours)),
            "candidate_ms": float(np.median(theirs)),
            "ratio": float(np.median(ratios)),
            "spread": float((ratios.max() - ratios.min()) / 2),
        }

    def wins(self, result: Mapping[str, float]) -> bool:
        return result["ratio"] < 1 - max(self.settings.min_gain, result["spread"])


def tune_engine(
    runtime: Runtime,
    target: Target,
    source: BuildSource,
    engine_dir: Path,
    extra: dict[str, Any],
    settings: TuningSettings,
    manifest_of: Callable[[Target, dict[str, Any]], dict[str, Any]],
) -> tuple[dict[str, Any], Path | None, dict[str, Any] | None]:
    """Tune the engine just built in `engine_dir` for `target`.

    Returns (the manifest's `tuning` record, the folder of a rebuilt winner to use instead of `engine_dir`
    or None, that winner's build fields or None). `manifest_of(target, extra)` makes the manifest a
    runtime's `load` reads, for an engine not yet finished."""
    from kiln.runtimes import TunableRuntime

    if not isinstance(runtime, TunableRuntime):
        raise KilnError(f"targets.{target.name}.tune: runtime '{runtime.name}' declares no knobs to tune; set tune: false")
    start = time.perf_counter()
    batch = settings.batch or target.main_batch
    if not target.profile.contains(batch):
        raise KilnError(f"tuning.batch {batch} is outside targets.{target.name}.profile [{target.profile.min}, {target.profile.max}]")
    timer = _Timer(make_inputs(source.model.inputs, batch, settings.seed + batch), batch, settings)
    scratch = Path(tempfile.mkdtemp(prefix=f".{engine_dir.name}.tune-", dir=engine_dir.parent))

    def load(c: _Candidate) -> None:
        t0 = time.perf_counter()
        c.session = runtime.load(c.engine_dir, manifest_of(c.target, c.extra), c.target)
        c.extra.setdefault("_load_s", time.perf_counter() - t0)

    default = _Candidate({}, target, engine_dir, dict(extra))
    trials: list[dict[str, Any]] = []
    stopped = None
    try:
        load(default)
        best = default
        trial_s: list[float] = []
        knobs = runtime.knobs(target)
        for knob in knobs:
            here = current_value(best.target, knob, runtime)
            for value in knob.values:
                if value == here or (knob.name in best.changed and best.changed[knob.name] == value):
                    continue
                changed = {**best.changed, knob.name: value}
                candidate_target = with_settings(target, changed)
                try:
                    runtime_options(runtime, candidate_target)
                except KilnError as e:
                    trials.append({"set": {knob.name: value}, "skipped": first_line(e)})
                    continue
                elapsed = time.perf_counter() - start
                estimate = float(np.mean(trial_s)) if trial_s else 0.0
                if knob.rebuild:
                    estimate += float(extra.get("compile_seconds") or extra.get("_build_s") or 0.0)
                if elapsed + estimate > settings.budget_s:
                    stopped = f"budget of {settings.budget_s:g} s reached after {len(trial_s)} trials ({elapsed:.1f} s)"
                    break
                t0 = time.perf_counter()
                folder, cand_extra = best.engine_dir, dict(best.extra)
                try:
                    if knob.rebuild:
                        folder = scratch / f"trial-{len(trials)}"
                        folder.mkdir()
                        b0 = time.perf_counter()
                        cand_extra = runtime.build(candidate_target, source, folder)
                        cand_extra["_build_s"] = time.perf_counter() - b0
                    candidate = _Candidate(changed, candidate_target, folder, cand_extra)
                    load(candidate)
                    result = timer.compare(best, candidate)
                except Exception as e:  # a setting this machine or runtime refuses is a losing trial, not a failed build
                    trials.append({"set": {knob.name: value}, "failed": f"{type(e).__name__}: {first_line(e)}"})
                    trial_s.append(time.perf_counter() - t0)
                    continue
                won = timer.wins(result)
                trials.append({"set": {knob.name: value}, "against": dict(best.changed), **_rounded(result, batch), "won": won})
                trial_s.append(time.perf_counter() - t0)
                log.info(
                    "%s: trial %d, %s=%s %.3f vs %.3f ms/batch (ratio %.3f, spread %.3f)%s; %.0f s of the %g s budget left",
                    target.name,
                    len(trial_s),
                    knob.name,
                    value,
                    result["candidate_ms"],
                    result["incumbent_ms"],
                    result["ratio"],
                    result["spread"],
                    ": better" if won else "",
                    max(0.0, settings.budget_s - (time.perf_counter() - start)),
                    settings.budget_s,
                )
                if won:
                    if best is not default:
                        best.session = None
                    best = candidate
                else:
                    candidate.session = None
                gc.collect()
            if stopped:
                break
        record: dict[str, Any] = {
            "batch": batch,
            "budget_s": settings.budget_s,
            "knobs": {k.name: list(dict.fromkeys([current_value(target, k, runtime), *k.values])) for k in knobs},
            "rebuild_knobs": [k.name for k in knobs if k.rebuild],
            "trials": trials,
            "stopped": stopped,
        }
        final = best
        if best is not default:
            check = timer.compare(default, best)
            record["final_check"] = _rounded(check, batch)
            if not timer.wins(check):
                record["kept_default"] = (
                    f"the winner {best.changed} was {check['ratio']:.3f}x the default's time against it, within the spread "
                    f"{check['spread']:.3f} (or the minimum gain {settings.min_gain:g})"
                )
                final = default
            default_ms = check["incumbent_ms"]
            tuned_ms = check["candidate_ms"] if final is best else default_ms
        else:
            default_ms = tuned_ms = next((t["incumbent_ms_per_image"] * batch for t in trials if "incumbent_ms_per_image" in t), None)
        record.update(
            changed=dict(final.changed),
            default_ms_per_image=None if default_ms is None else round(default_ms / batch, 5),
            tuned_ms_per_image=None if tuned_ms is None else round(tuned_ms / batch, 5),
            speedup=round(default_ms / tuned_ms, 4) if default_ms and tuned_ms else 1.0,
            seconds=round(time.perf_counter() - start, 2),
        )
        rebuilt = final.engine_dir if final.engine_dir != engine_dir else None
        if rebuilt is not None:
            keep = engine_dir.parent / f".{engine_dir.name}.tuned-{time.time_ns()}"
            shutil.move(str(rebuilt), keep)  # out of scratch, which goes now
            rebuilt = keep
        winner_extra = {k: v for k, v in final.extra.items() if not k.startswith("_")} if rebuilt else None
        return record, rebuilt, winner_extra
    finally:
        default.session = None
        gc.collect()
        shutil.rmtree(scratch, ignore_errors=True)


def _rounded(result: Mapping[str, float], batch: int) -> dict[str, float]:
    return {
        "incumbent_ms_per_image": round(result["incumbent_ms"] / batch, 5),
        "candidate_ms_per_image": round(result["candidate_ms"] / batch, 5),
        "ratio": round(result["ratio"], 4),
        "spread": round(result["spread"], 4),
    }
