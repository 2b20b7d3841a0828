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
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..runtimes import Session

CONTENTION_DIR = Path("reports") / "contention"


def timed(session: Session, feeds: Mapping[str, np.ndarray], seconds: float, min_runs: int = 5) -> list[float]:
    """Per-inference ms from the benchmark's own timing loop: at least `min_runs` inferences and `seconds`, not
    extended for noise (a neighbour's load is the point here)."""
    from ..benchmark import BenchmarkSettings, time_infer

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
