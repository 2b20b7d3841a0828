"""`kiln contention`: two built engines on one device, each one's slow-down beside the other (kiln.serving.contention)."""

from __future__ import annotations

import argparse

from kiln.serving.contention import CONTENTION_DIR, contention_between


def main(argv: list[str] | None = None) -> int:
    from kiln.config.views import Target, load_params
    from kiln.core import paths
    from kiln.core.atomic import write_json
    from kiln.core.errors import KilnError
    from kiln.data.engine_input import engine_spec
    from kiln.data.inputs import make_inputs
    from kiln.measure.tuning import tuned_target
    from kiln.pipeline.engine import load_engine
    from kiln.pipeline.stage import run_stage

    parser = argparse.ArgumentParser(prog="kiln contention", description=__doc__.split("\n\n")[0])
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
