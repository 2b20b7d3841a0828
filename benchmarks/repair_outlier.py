"""`kiln debug <target> --repair` on a trained network with one outlier activation channel (tests/outlier.py), both int8
runtimes: builds used, seconds, what won (a remedy, or the layers in float) and the three speeds side by side (int8,
repaired, the same runtime's fp32 engine). Prints a markdown table.

    python benchmarks/repair_outlier.py [--width 64] [--size 32] [--epochs 6] [--max-builds 12]

The digits CNN (tests/digits.py, trained here on scikit-learn's digits scaled up to --size pixels) at --width channels:
the default is big enough for int8 to pay on a CPU (the tests' 16-channel, 16-pixel one is overhead-bound, and there
ONNX Runtime int8 is slower than fp32). One thread per engine, timed in interleaved rounds: quote the ratios of one run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from digits import train, write_digits
    from outlier import INT8, build_outlier_project

    from kiln.config.views import Target
    from kiln.diagnose.debug import debug_engines, describe, eval_feeds
    from kiln.diagnose.repair import repair_target
    from kiln.runtimes.fingerprint import collect, describe_hardware

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--max-builds", type=int, default=12)
    ap.add_argument("--targets", nargs="+", default=list(INT8))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    print(f"machine: {describe_hardware(collect()['hardware'])}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = write_digits(root / "data")
        model = train(dirs["train"], epochs=args.epochs, width=args.width, size=args.size)
        project = build_outlier_project(root, model, dirs, width=args.width, size=args.size)
        os.chdir(project["root"])
        artifacts = project["root"] / "artifacts"
        for name in args.targets:
            target = Target.from_params(name, project["params"])
            found = debug_engines(
                artifacts / "model.onnx", eval_feeds(project["reference"], 16), None, (artifacts / "engines" / name, target)
            )
            print(f"{name}: {describe(found)}", flush=True)
            result = repair_target(target, project["params"], found, max_builds=args.max_builds)
            print("\n".join(result["lines"]), flush=True)
            rows.append((name, result))
    print(f"\nTinyCNN width {args.width} at {args.size}x{args.size}, budget top-1 agreement >= 0.98, --max-builds {args.max_builds}\n")
    print("| target | status | builds | s | in float | agreement before -> after | int8 ms/img | repaired | fp32 | fp32 / repaired |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---:|")
    for name, r in rows:
        speed = r.get("speed") or {}
        int8, repaired, fp32 = (speed.get(k) for k in ("int8_ms_per_image", "repaired_ms_per_image", "fp32_ms_per_image"))
        kept = r.get("remedy") or ", ".join(r.get("float_layers") or []) or "-"
        after = (r.get("after") or {}).get("agreement")
        print(
            f"| {name} | {r['status'][:60]} | {r['builds']} | {r['seconds']} | {kept} | "
            f"{r['before'].get('agreement')} -> {after} | {int8} | {repaired} | {fp32} | "
            f"{(fp32 / repaired) if fp32 and repaired else float('nan'):.2f} |"
        )


if __name__ == "__main__":
    main()
