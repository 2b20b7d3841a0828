"""What keeping YOLO's box decoding (DFL) in float is worth at int8: a tiny YOLOv8 trained on the synthetic shapes
(tests/detection_data.py, Ultralytics' own loss), every int8 CPU target built twice from the same export, once as
kiln builds it (the DFL softmax and 1x1 convolution in float) and once with the DFL quantized too. Prints mAP@0.5:0.95
against the shapes' labels, its drop from fp32, detection F1 against the fp32 reference, mean IoU of matched boxes
and ms/image, as a markdown table.

    python benchmarks/yolo_dfl.py [--steps 150] [--size 128] [--targets onnxruntime-int8 openvino-int8]

Needs the yolo extra (pip install -e '.[yolo]'). A trained model, so the mAP means something; tiny, so the run takes
a few minutes on two cores. Quote the differences between rows of one run, not absolute times across machines.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def strip_float_nodes(onnx_path: Path, out: Path) -> None:
    """A copy of the export without kiln's float-nodes metadata: int8 then quantizes the DFL like any layer."""
    import onnx

    from kiln.export.graphs import FLOAT_NODES_KEY

    model = onnx.load(str(onnx_path))
    kept = [p for p in model.metadata_props if p.key != FLOAT_NODES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(out))


def main() -> None:
    import detection_data
    from test_model_zoo import cpu_params

    from kiln.pipeline.quickrun import prepare, run_target
    from kiln.runtimes.fingerprint import collect, describe_hardware

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--targets", nargs="+", default=["onnxruntime-int8", "openvino-int8"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    print(f"machine: {describe_hardware(collect()['hardware'])}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = detection_data.make_shapes_dataset(root / "train", 128, seed=1, size=args.size)
        model = detection_data.train_yolo(detection_data.tiny_yolo(), root / "train", train, steps=args.steps, seed=0)
        checkpoint = detection_data.save_checkpoint(model, root / "yolo.pt")
        detection_data.make_shapes_dataset(root / "calibration", 32, seed=2, size=args.size)
        detection_data.make_shapes_dataset(root / "eval", 32, seed=3, size=args.size)
        params = cpu_params(
            entrypoint="detection_data:tiny_yolo_factory",
            checkpoint=str(checkpoint),
            inputs={"images": {"shape": [3, args.size, args.size]}},
            task="detection",
            detection={"max_detections": 50, "score_thresh": 0.01},
        )
        params["data"].update(calibration_dir=str(root / "calibration"), eval_dir=str(root / "eval"), eval_limit=32)
        params["data"]["preprocess"].update(resize=args.size, crop=args.size, mean=[0.0] * 3, std=[1.0] * 3)
        prepared = prepare(params, root / "work")
        kept = prepared["export"]["export_path"].get("kept_in_float_at_int8") or []
        print(f"DFL nodes kept in float by kiln: {len(kept)} ({', '.join(kept)})\n")
        plain = root / "plain" / "model.onnx"
        plain.parent.mkdir()
        strip_float_nodes(prepared["onnx"], plain)
        rows = []
        fp32 = run_target(prepared, "onnxruntime", iterations=5)
        rows.append(("onnxruntime", "fp32", fp32))
        for name in args.targets:
            rows.append((name, "DFL in float (kiln)", run_target(prepared, name, iterations=5)))
            variant = {**prepared, "onnx": plain, "workdir": root / "plain" / name}
            shutil.rmtree(variant["workdir"], ignore_errors=True)
            rows.append((name, "DFL quantized", run_target(variant, name, iterations=5)))
        print("| target | DFL | mAP@.5:.95 | mAP drop (points) | F1 vs fp32 | mean IoU | ms/image |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, how, r in rows:
            a = r["accuracy"]
            print(
                f"| {name} | {how} | {a.get('map', a.get('map_fp32')):.3f} | {a.get('map_drop', 0.0):.2f} | "
                f"{a['detection_f1']:.3f} | {a['detection_mean_iou']:.4f} | {r['ms_per_image']:.2f} |"
            )


if __name__ == "__main__":
    main()
