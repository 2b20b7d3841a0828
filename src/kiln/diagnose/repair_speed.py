"""The speed side of a repair (kiln.diagnose.repair): the same runtime's fp32 engine it must beat, and int8, the repaired
engine and fp32 timed side by side in interleaved rounds, with each float layer's price where the search built it."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

log = logging.getLogger(__name__)


def interleaved_ms_per_image(sessions: list[Any], feeds: Mapping[str, np.ndarray], rounds: int = 7, per_round: int = 5) -> list[float]:
    """Median ms/image of each session, timed in turns (round r times every session once, order alternating)."""
    batch = next(iter(feeds.values())).shape[0]
    for s in sessions:
        s.infer(feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            start = time.perf_counter()
            for _ in range(per_round):
                sessions[i].infer(feeds)
            times[i].append((time.perf_counter() - start) * 1e3 / per_round / batch)
    return [float(np.median(t)) for t in times]


def fp32_engine(target: Any, spec: Any, folder: Path, sessions: dict, max_builds: int) -> Any:
    """The same runtime's fp32 engine of the model (one build, counted), for the speed the repaired engine must beat."""
    from kiln.core import paths
    from kiln.pipeline.engine import build_engine, load_engine
    from kiln.runtimes import BuildSource

    if len(sessions) >= max_builds:
        return None
    t = replace(target, precision="fp32", tune=False, calibration={})
    log.info("repair: build %d of at most %d: the fp32 engine, for the speed to beat", len(sessions) + 1, max_builds)
    build_engine(t, BuildSource(paths.ONNX, spec, None), folder)
    sessions[("fp32",)], _ = load_engine(folder, t)
    return sessions[("fp32",)]


def speed_cost(
    engine_for: Callable[[tuple[str, ...]], Any],
    chosen: list[str],
    feeds: Mapping[str, np.ndarray],
    built: set[tuple[str, ...]] | None = None,
    fp32: Any = None,
    repaired: Any = None,
) -> dict[str, Any]:
    """ms/image of int8, the repaired engine (`repaired`, or the one with `chosen` in float) and fp32 (where built), side
    by side in interleaved rounds, and the price
    of each layer in float where the engine with the layers before it was built by the search (`built`; no build is
    made for the prices: every build counts against --max-builds)."""
    prefixes = [tuple(chosen[:i]) for i in range(len(chosen) + 1)]
    timed = [p for p in prefixes if built is None or p in built or p in ((), tuple(chosen))]
    if repaired is not None:  # repaired another way (a calibration remedy), no layer in float: int8 against it
        timed = [()]
    sessions = [engine_for(p) for p in timed] + ([repaired] if repaired is not None else []) + ([fp32] if fp32 is not None else [])
    ms = interleaved_ms_per_image(sessions, feeds)
    by_prefix = dict(zip(timed, ms))
    return {
        "batch": int(next(iter(feeds.values())).shape[0]),
        "int8_ms_per_image": round(by_prefix[()], 4),
        "repaired_ms_per_image": round(ms[len(timed)] if repaired is not None else by_prefix[tuple(chosen)], 4),
        "fp32_ms_per_image": round(ms[-1], 4) if fp32 is not None else None,
        "layers": [
            {"layer": chosen[i], "added_ms_per_image": round(by_prefix[prefixes[i + 1]] - by_prefix[prefixes[i]], 4)}
            for i in range(len(chosen))
            if prefixes[i] in by_prefix and prefixes[i + 1] in by_prefix
        ],
    }
