"""What an engine costs besides latency: memory while it runs, bytes on disk, time to start.

Peak memory is the process's resident set (RSS) at its highest during a span of work. On Linux the
kernel keeps that high-water mark as VmHWM and lets a process reset it (writing "5" to
/proc/self/clear_refs, Linux >= 4.0), so the peak covers the span alone. VmHWM is per address space,
not per thread: what a runtime's own thread pools allocate counts too (child processes do not).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

S = TypeVar("S")

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
# After a reset VmHWM equals VmRSS; they may part by what another thread allocated and freed between
# the write and the read, so "about" is a few MiB, not zero.
RESET_SLACK_KIB = 4096
SPAN_METHOD = "VmHWM after resetting it via /proc/self/clear_refs"
LIFETIME_METHOD = (
    "the process's lifetime peak (getrusage ru_maxrss; /proc/self/clear_refs could not reset VmHWM): "
    "peak_rss_mb may predate the span, added_mb is how far the lifetime peak rose (0 when an earlier peak was higher)"
)

_active: list[MemoryWatch] = []  # open watches: a reset by an inner one must not hide the outer ones' peak


def _status_kib() -> dict[str, int] | None:
    """VmRSS and VmHWM in KiB, or None without /proc (macOS, Windows)."""
    try:
        text = STATUS.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM") and rest.split():
            out[key] = int(rest.split()[0])  # "VmRSS:\t  123456 kB"
    return out if len(out) == 2 else None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; True only when the reset demonstrably took."""
    try:
        with CLEAR_REFS.open("w", encoding="ascii") as f:
            f.write("5")
    except OSError:  # no /proc, kernel < 4.0 (EINVAL), or a sandbox that forbids it
        return False
    now = _status_kib()
    # Some sandboxes accept the write and do nothing: believe the reset only if VmHWM came down to VmRSS.
    return now is not None and now["VmHWM"] - now["VmRSS"] <= RESET_SLACK_KIB


def _maxrss_kib() -> int:
    import resource  # Unix only; imported here so the module loads anywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


class MemoryWatch:
    """`with MemoryWatch() as watch: ...` then `watch.result()`: the peak RSS of this process during the block."""

    def __init__(self) -> None:
        self._before_kib: int | None = None
        self._maxrss_before_kib = 0
        self._peak_kib = 0  # highest VmHWM seen while resets (ours or nested watches') were under way
        self._span = False
        self._result: dict[str, Any] | None = None

    def _note_peak(self) -> None:
        status = _status_kib()
        if status:
            self._peak_kib = max(self._peak_kib, status["VmHWM"])

    def __enter__(self) -> MemoryWatch:
        # Garbage from before the span (a model or session in a reference cycle) would otherwise be freed by a collection
        # inside it: RSS falls by that much, and the span's own peak hides beneath its starting figure.
        gc.collect()
        for outer in _active:  # about to reset the mark: keep what the outer watches have seen so far
            outer._note_peak()
        status = _status_kib()
        self._before_kib = status["VmRSS"] if status else None
        self._maxrss_before_kib = _maxrss_kib()
        self._span = _reset_peak()
        _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _active.remove(self)
        status = _status_kib()
        if self._span and status:
            peak = max(self._peak_kib, status["VmHWM"])
            added = peak - (self._before_kib or 0)
        else:
            peak = _maxrss_kib()
            added = peak - self._maxrss_before_kib
        mb = 1024.0
        self._result = {
            "rss_before_mb": round(self._before_kib / mb, 1) if self._before_kib is not None else None,
            "peak_rss_mb": round(peak / mb, 1),
            "added_mb": round(max(added, 0) / mb, 1),
            "span_peak": bool(self._span and status),  # False: the figures are the lifetime peak's (see method)
            "method": SPAN_METHOD if self._span and status else LIFETIME_METHOD,
        }

    def result(self) -> dict[str, Any]:
        if self._result is None:
            raise RuntimeError("MemoryWatch.result() is only known after the `with` block")
        return dict(self._result)


def engine_size_bytes(engine_dir: Path, exclude: tuple[str, ...] = ("manifest.json",)) -> int:
    """Bytes of every file under `engine_dir` (what shipping the engine costs), minus `exclude` (relative paths)."""
    root = Path(engine_dir)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in exclude)


def cold_start(load: Callable[[], S], first: Callable[[S], Any]) -> tuple[S, dict[str, float]]:
    """(the loaded object, {load_s, first_infer_ms}): loading and the first call timed apart, since
    runtimes defer work (graph optimisation, kernel selection, JIT) from load to the first inference."""
    t0 = time.perf_counter()
    loaded = load()
    t1 = time.perf_counter()
    first(loaded)
    t2 = time.perf_counter()
    return loaded, {"load_s": t1 - t0, "first_infer_ms": (t2 - t1) * 1e3}


def engine_costs(
    engine_dir: Path,
    manifest: Mapping[str, Any],
    cold: Mapping[str, float],
    load: Mapping[str, Any],
    run: Mapping[str, Any],
    throughput: Mapping[str, Any],
) -> dict[str, Any]:
    """Memory, disk, cold start and build time of one engine, for the run record and the metrics file: `load`,
    `run` and `throughput` are MemoryWatch results of the load, the timed runs and the throughput run."""
    tuning = manifest.get("tuning") or {}
    peak = max(load["peak_rss_mb"], run["peak_rss_mb"])
    return {
        "peak_rss_mb": round(peak, 1),
        "added_mb": round(peak - (load["rss_before_mb"] or 0.0), 1),
        "rss_before_load_mb": load["rss_before_mb"],
        "throughput_peak_rss_mb": round(throughput["peak_rss_mb"], 1),
        "memory_method": load["method"],
        "engine_mb": round(engine_size_bytes(engine_dir) / 1e6, 3),
        "load_s": round(cold["load_s"], 3),
        "first_infer_ms": round(cold["first_infer_ms"], 2),
        "build_s": manifest.get("build_seconds"),
        "tuning_s": tuning.get("seconds"),
    }
