"""Two engines on one device at once: how much each slows the other (the seed's contention question).

`python -m kiln.serving.contention <target-a> <target-b>` loads both built engines of this project, times
each alone at its main batch, then both at once (each in its own thread, looping until the other's timing is
done), and prints each one's median latency alone and beside the other, and the slow-down. It is on demand,
not a pipeline stage: which engines share a device is a deployment decision, and measuring every pair
would multiply the benchmark's time. (The benchmark's `serving.contention: true` measures the simpler case,
a second copy of the same engine, inside the pipeline.) Results go to reports/contention/<a>+<b>.json.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..runtimes import Session

CONTENTION_DIR = Path("reports") / "contention"


def _timed_loop(
    session: Session, feeds: Mapping[str, np.ndarray], seconds: float, min_runs: int, stop: threading.Event | None
) -> list[float]:
    """Per-inference ms for at least `seconds` and `min_runs`; then, with `stop`, on until it is set (keeping the
    other engine loaded for its whole timing), without recording the extra runs."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.infer(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    while stop is not None and not stop.is_set():
        session.infer(feeds)
    return times


def contention_between(
    a: Session, b: Session, feeds_a: Mapping[str, np.ndarray], feeds_b: Mapping[str, np.ndarray], seconds: float = 3.0, min_runs: int = 10
) -> dict[str, Any]:
    """Median ms per inference of `a` and `b` alone, then at once; slowdown = beside / alone. Threads are joined."""
    for s, f in ((a, feeds_a), (b, feeds_b)):
        s.infer(f)  # warm-up
    alone = {"a": _timed_loop(a, feeds_a, seconds, min_runs, None), "b": _timed_loop(b, feeds_b, seconds, min_runs, None)}
    done = {"a": threading.Event(), "b": threading.Event()}
    beside: dict[str, list[float]] = {}
    errors: list[BaseException] = []

    def run(key: str, session: Session, feeds: Mapping[str, np.ndarray], other: str) -> None:
        try:
            times = _timed_loop(session, feeds, seconds, min_runs, None)
            beside[key] = times
            done[key].set()
            _timed_loop(session, feeds, 0.0, 0, done[other])  # keep the device busy until the other has its figures
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


def main(argv: list[str] | None = None) -> int:
    from .. import paths
    from ..atomic import write_json
    from ..config import Target, engine_spec, load_params
    from ..engine import load_engine
    from ..errors import KilnError
    from ..inputs import make_inputs
    from ..stage import run_stage
    from ..tuning import tuned_target

    parser = argparse.ArgumentParser(prog="python -m kiln.serving.contention", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="a target whose engine is built (artifacts/engines/<a>)")
    parser.add_argument("b", help="the target run beside it")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per engine, alone and beside (default 3)")
    args = parser.parse_args(argv)

    def run() -> None:
        if not args.seconds > 0:
            raise KilnError(f"--seconds must be > 0, got {args.seconds}")
        params = load_params()
        spec = engine_spec(params)
        loaded = {}
        for key, name in (("a", args.a), ("b", args.b)):
            target = Target.from_params(name, params)
            if not (paths.ENGINES / name / "manifest.json").is_file():
                raise KilnError(f"no engine for target '{name}': run `dvc repro build@{name}` first")
            session, manifest = load_engine(paths.ENGINES / name, target)
            target = tuned_target(target, manifest)
            loaded[key] = (name, target, session, make_inputs(spec.inputs, target.main_batch, 0))
        (na, ta, sa, fa), (nb, tb, sb, fb) = loaded["a"], loaded["b"]
        result = contention_between(sa, sb, fa, fb, args.seconds)
        record = {
            na: {**result["a"], "batch": ta.main_batch, "threads": ta.effective_threads},
            nb: {**result["b"], "batch": tb.main_batch, "threads": tb.effective_threads},
        }
        write_json(CONTENTION_DIR / f"{na}+{nb}.json", record)
        for name, r in record.items():
            print(
                f"{name} (batch {r['batch']}, {r['threads']} threads): {r['alone_p50_ms']:.2f} ms alone, "
                f"{r['beside_p50_ms']:.2f} ms beside the other: {r['slowdown']:.2f}x"
            )

    run_stage(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
