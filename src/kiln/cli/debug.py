"""`kiln debug <target>` and `kiln compare <a> <b>`: the debugger's command line.

Apart from the library (kiln.diagnose.debug) so that what a stage imports never reaches the repair search.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kiln.config.views import Target, load_params
from kiln.core import paths
from kiln.core.errors import KilnError
from kiln.data.reference import load_reference
from kiln.diagnose.debug import DEBUG_CSV, PLOT_COMMAND, THRESHOLD_DB, debug_engines, describe, eval_feeds, render_text, write_debug
from kiln.diagnose.repair import repair_target
from kiln.pipeline.stage import run_stage

log = logging.getLogger("kiln.diagnose.debug")


def main(argv: list[str] | None = None, compare_mode: bool = False) -> int:
    parser = argparse.ArgumentParser(
        prog="kiln compare" if compare_mode else "kiln debug",
        description="Compare two engines boundary by boundary" if compare_mode else "Where an engine first departs from the fp32 graph",
    )
    if compare_mode:
        parser.add_argument("a", help="the engine taken as the reference (a target name)")
        parser.add_argument("b", help="the engine compared with it")
    else:
        parser.add_argument("target")
        parser.add_argument("--against", default=None, help="another target's engine instead of the fp32 graph")
        parser.add_argument(
            "--repair", action="store_true", help="return layers to float until the accuracy budget holds (kiln.diagnose.repair)"
        )
        parser.add_argument("--max-builds", type=int, default=12, help="repair: at most this many calibrate+build rounds")
        parser.add_argument(
            "--no-remedies",
            action="store_true",
            help="repair: skip the runtime's outlier-aware remedies (OpenVINO's SmoothQuant) and go straight to layers in float",
        )
        parser.add_argument(
            "--budget",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="repair: a budget key over the target's (e.g. min_top1_agreement=0.95), to see what a looser or tighter budget costs",
        )
    parser.add_argument("--samples", type=int, default=16, help="eval images to run (from artifacts/reference.npz)")
    parser.add_argument("--threshold-db", type=float, default=THRESHOLD_DB, help="SQNR below which a boundary counts as divergent")
    args = parser.parse_args(argv)
    a_name = args.a if compare_mode else args.against
    b_name = args.b if compare_mode else args.target

    def run() -> None:
        params = load_params()
        if args.samples < 1:
            raise KilnError(f"--samples must be at least 1, got {args.samples}")

        def engine(name: str) -> tuple[Path, Target]:
            target = Target.from_params(name, params)
            folder = paths.ENGINES / name
            if not (folder / "manifest.json").is_file():
                raise KilnError(f"no engine for target '{name}' at {folder}: run `dvc repro build@{name}` first")
            return folder, target

        b = engine(b_name)
        a = engine(a_name) if a_name else None
        reference = load_reference(paths.REFERENCE)
        feeds = eval_feeds(reference, args.samples)
        result = debug_engines(paths.ONNX, feeds, a, b, args.threshold_db)
        against = a_name or "fp32"
        log.info("%s against %s (%s): %s", b_name, against, result["engine"]["mode"], describe(result))
        if not compare_mode and args.repair:
            overrides = {}
            for item in args.budget:
                key, sep, value = item.partition("=")
                try:
                    overrides[key.strip()] = float(value)
                except ValueError:
                    sep = ""
                if not sep:
                    raise KilnError(f"--budget takes KEY=NUMBER (e.g. min_top1_agreement=0.95), got {item!r}")
            result["repair"] = repair_target(
                b[1], params, result, max_builds=args.max_builds, budget_overrides=overrides, remedies=not args.no_remedies
            )
        path = write_debug(b_name, against, result)
        print(render_text(b_name, against, result))
        log.info("written %s and %s; the SQNR along the graph: %s", path, DEBUG_CSV, PLOT_COMMAND)

    run_stage(run)
    return 0


def compare(argv: list[str] | None = None) -> int:
    """`kiln compare <a> <b>` (and `kiln compare`): two engines, boundary by boundary."""
    return main(argv, compare_mode=True)
