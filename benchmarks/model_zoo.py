"""Model families through the CPU runtimes: export path, validation error, the task's agreement, int8's
drop where labels exist, ms/image at batch 8. Prints a markdown table (the closing notes quote it).

    python benchmarks/model_zoo.py [--models ssdlite320 deeplabv3 ...] [--targets onnxruntime openvino-int8 ...]

Models are conf/model/<name>.yaml files; random weights with demo_weights (offline), so agreement is
against a meaningful fp32 reference but there are no labels: real mAP/top-1 drops come from
tests/test_model_zoo.py's trained detector. Figures are medians of a short run on this machine: quote
ratios between targets measured in one run, not absolute times across machines.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

# A conf/model file, optionally with overrides after commas: "ssdlite320,model.name=fasterrcnn_mobilenet_v3_large_320_fpn".
MODELS = [
    "ssdlite320",
    "ssdlite320,model.name=fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet",
    "deeplabv3",
    "lraspp",
    "vit_b_16",
    "timm_vit_small",
    "mobilenet_v3_small",
    "efficientnet_b0",
]
TARGETS = ["torch-eager", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8"]


def main() -> None:
    from kiln.config.params import compose
    from kiln.data.images import make_sample_images, photograph
    from kiln.pipeline.quickrun import prepare, run_target
    from kiln.runtimes.fingerprint import collect, describe_hardware

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--targets", nargs="+", default=TARGETS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    print(f"machine: {describe_hardware(collect()['hardware'])}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_sample_images(root / "calibration", [photograph(n) for n in ("astronaut", "chelsea", "rocket")], 32, 1, 400)
        make_sample_images(root / "eval", [photograph(n) for n in ("coffee", "china")], 16, 2, 400)
        for entry in args.models:
            file, *overrides = entry.split(",")
            model = overrides[-1].split("=", 1)[1] if overrides else file
            params = compose([f"model={file}", *overrides], config_dir=ROOT / "conf")
            params["data"].update(calibration_dir=str(root / "calibration"), eval_dir=str(root / "eval"), eval_limit=16)
            params["calibration"].update(subset_size=32)
            params["targets"] = {k: v for k, v in params["targets"].items() if k in args.targets}
            (root / model).mkdir()
            start = time.perf_counter()
            try:
                prepared = prepare(params, root / model)
            except Exception as e:  # a model that cannot be exported is a row too
                print(f"{model}: {e}", flush=True)
                rows.append(f"| {model} | all | failed: {str(e).splitlines()[0][:160]} | | | | |")
                continue
            exp, val = prepared["export"], prepared["validate"]
            path = exp["exporter"] + (" + kiln NMS" if (exp.get("export_path") or {}).get("model_wrapper") else "")
            err = max(o["max_abs_err"] for o in val["outputs"].values())
            print(f"{model}: prepared in {time.perf_counter() - start:.0f} s ({exp['task']}, {path})", flush=True)
            for name in args.targets:
                r = run_target(prepared, name, batch=args.batch, iterations=args.iterations)
                if r.get("skipped"):
                    rows.append(f"| {model} | {name} | skipped: {r['skipped'][:80]} | | | | |")
                    continue
                acc = r["accuracy"]
                metric = acc.get("agreement_metric") or "cosine"
                mark = " †" if acc.get("reference_degenerate") else ""
                drop = next((f"{acc[k]:.2f}" for k in ("top1_drop", "map_drop", "miou_drop") if acc.get(k) is not None), "n/a (no labels)")
                rows.append(
                    f"| {model} | {name} | {path} | {err:.2e} | {metric} {acc.get('agreement', float('nan')):.4f}{mark} | {drop} "
                    f"| {r['ms_per_image']:.2f} |"
                )
                print(rows[-1], flush=True)
    print()
    print(f"| model | target | export path | validation max abs err | agreement with fp32 | int8 drop | ms/image at batch {args.batch} |")
    print("|---|---|---|---:|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
