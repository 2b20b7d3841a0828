"""Ultralytics YOLO through kiln (kiln.export.detection_yolo): a tiny YOLOv8 trained here on the synthetic shapes with
Ultralytics' own loss, exported with a dynamic batch and kiln's NMS in the graph, through every non-Inductor CPU target
judged by its detections (F1 against the fp32 reference, mAP against the shapes' labels), its DFL box decoding kept in
float at int8; and the name routes (an Ultralytics model YAML, a .pt checkpoint)."""

from __future__ import annotations

import contextlib

import pytest
from conftest import require_module
from test_model_zoo import cpu_params, every_target, fp32

SIZE = 128


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    require_module("ultralytics", "the yolo extra is not installed: pip install -e '.[yolo]' (the test extra includes it)")
    import detection_data
    import torch

    root = tmp_path_factory.mktemp("yolo")
    train = detection_data.make_shapes_dataset(root / "train", 128, seed=1, size=SIZE)
    torch.manual_seed(0)
    model = detection_data.train_yolo(detection_data.tiny_yolo(), root / "train", train, steps=150, seed=0)
    checkpoint = detection_data.save_checkpoint(model, root / "yolo.pt")
    detection_data.make_shapes_dataset(root / "calibration", 32, seed=2, size=SIZE)
    held_out = detection_data.make_shapes_dataset(root / "eval", 32, seed=3, size=SIZE)  # with annotations.json: real mAP
    return root, model, checkpoint, held_out


@pytest.fixture(scope="module")
def yolo(trained):
    from kiln.pipeline.quickrun import prepare, run_targets

    root, _, checkpoint, _ = trained
    params = cpu_params(
        entrypoint="detection_data:tiny_yolo_factory",
        checkpoint=str(checkpoint),
        # No range: the gate's N(0, 1) noise gives this shapes detector a few sure boxes to compare; on uniform 0..1
        # noise it detects nothing at this cut, and at 0.001 only near-ties that a 1e-4 score error reorders (both tried)
        inputs={"images": {"shape": [3, SIZE, SIZE]}},
        task="auto",
        # The gate feeds noise, where a detector trained on shapes is rarely sure: a low cut (Ultralytics' val uses 0.001)
        # gives it detections to compare, and mAP its ranked list.
        detection={"max_detections": 50, "score_thresh": 0.01},
    )
    params["data"].update(calibration_dir=str(root / "calibration"), eval_dir=str(root / "eval"), eval_limit=32)
    params["data"]["preprocess"].update(resize=SIZE, crop=SIZE, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])  # YOLO takes 0..1
    cwd = root / "cwd"  # what the build leaves in its working directory (a DVC stage's is the user's repo root)
    cwd.mkdir()
    with contextlib.chdir(cwd):
        prepared = prepare(params, root / "work")
        results = run_targets(prepared, every_target(params), iterations=3)
    return prepared, results, sorted(p.name for p in cwd.iterdir())


def test_kiln_nms_finds_what_ultralytics_own_finds_on_held_out_shapes(trained):
    import torch
    from detection_data import load_images

    from kiln.accuracy.tasks.detection import agreement, unpad
    from kiln.export.detection import DetectionSettings
    from kiln.export.detection_yolo import YoloDetections

    root, model, _, held_out = trained
    wrapper = YoloDetections(model, SIZE, SIZE, DetectionSettings()).eval()
    images = load_images(root / "eval", held_out)
    with torch.no_grad():
        ours = unpad({k: v.numpy() for k, v in wrapper(images).items()})
        theirs = [{k: v.numpy() for k, v in d.items()} for d in wrapper.reference_detections(images)]
    agreed = agreement(theirs, ours)
    assert agreed["detections_ref"] >= len(held_out)  # the trained model finds the shapes
    assert agreed["detection_f1"] == pytest.approx(1.0) and agreed["detection_mean_iou"] > 0.999, agreed


def test_yolo_exports_whole_with_a_dynamic_batch_and_its_box_decoding_marked_float(yolo):
    import onnx

    from kiln.export.graphs import declared_float_nodes

    prepared, _, _ = yolo
    manifest = prepared["export"]
    wrapper = manifest["export_path"]["model_wrapper"]
    assert manifest["exporter"] == "dynamo" and wrapper["family"] == "yolo" and wrapper["head"] == "Detect"
    assert manifest["inputs"]["images"]["shape"][0] == "batch"  # the head computes its anchors from the input
    assert set(manifest["outputs"]) == {"boxes", "scores", "labels", "num_detections"}
    assert manifest["task"] == "detection" and prepared["reference"]["degenerate"] is None
    kept = manifest["export_path"]["kept_in_float_at_int8"]
    assert kept == declared_float_nodes(prepared["onnx"])
    ops = {n.name: n.op_type for n in onnx.load(str(prepared["onnx"])).graph.node}
    assert {"Softmax", "Conv"} <= {ops[n] for n in kept}  # DFL: a softmax over 16 bins and a fixed 1x1 convolution


def test_yolo_through_every_cpu_target_judged_by_detections(yolo):
    prepared, results, _ = yolo
    built = {n: r for n, r in results.items() if not r.get("skipped")}
    assert {"onnxruntime", "openvino", "onnxruntime-int8", "openvino-int8", "torch-eager"} <= set(built)
    for name, r in built.items():
        acc = r["accuracy"]
        assert acc["task"] == "detection" and acc["agreement_metric"] == "detection_f1", name
        assert acc["map_fp32"] > 0.5, "the trained YOLO should find the shapes"
        if fp32(name):
            assert acc["detection_f1"] > 0.98 and abs(acc["map_drop"]) < 1.0, (name, acc)
        else:  # int8 moves scores and boxes a little: the drop is measured, whatever it is
            assert acc["map"] > 0.0 and 0.0 <= acc["detection_f1"] <= 1.0, (name, acc)


def test_int8_keeps_the_dfl_in_float_on_onnx_runtime(yolo):
    import onnx

    prepared, _, litter = yolo
    # ORT's symbolic shape inference fails on this graph and dumps its partial model where it runs: not in the user's folder
    assert litter == []
    kept = set(prepared["export"]["export_path"]["kept_in_float_at_int8"])
    qdq = onnx.load(str(prepared["workdir"] / "calibration-onnxruntime-int8" / "model.qdq.onnx")).graph
    made_by = {out: n.op_type for n in qdq.node for out in n.output}
    dfl = [n for n in qdq.node if n.name in kept and n.op_type == "Conv"]
    assert dfl and all(made_by.get(n.input[0]) != "DequantizeLinear" for n in dfl)  # its input not quantized
    convs = [n for n in qdq.node if n.op_type == "Conv" and n.name not in kept]
    assert sum(made_by.get(n.input[0]) == "DequantizeLinear" for n in convs) > len(convs) // 2  # the rest is int8


def test_an_ultralytics_yaml_name_and_a_pt_checkpoint_build_the_wrapped_detector(trained, tmp_path):
    import torch
    from detection_data import load_images

    from kiln.config.views import ModelSpec
    from kiln.export.detection_yolo import YoloDetections
    from kiln.export.models import build_model

    inputs = {"images": {"shape": [3, SIZE, SIZE]}}
    by_yaml = build_model(ModelSpec.from_params({"name": "yolov8n.yaml", "kwargs": {"nc": 5}, "inputs": inputs}))
    assert isinstance(by_yaml, YoloDetections) and by_yaml.classes == 5
    assert ModelSpec.from_params({"name": "yolov8n.yaml", "inputs": inputs}).trained_weights()[0] is False

    root, model, _, held_out = trained
    pt = tmp_path / "best.pt"
    torch.save({"model": model, "train_args": {}}, pt)  # what an Ultralytics training run saves
    spec = ModelSpec.from_params({"name": str(pt), "inputs": inputs})
    assert spec.trained_weights()[0] is True
    loaded = build_model(spec)
    images = load_images(root / "eval", held_out)[:4]
    with torch.no_grad():
        a, b = loaded(images), YoloDetections(model, SIZE, SIZE, loaded_settings(loaded)).eval()(images)
    assert int(a["num_detections"].sum()) > 0 and torch.equal(a["num_detections"], b["num_detections"])
    torch.testing.assert_close(a["boxes"], b["boxes"])


def loaded_settings(wrapper):
    from kiln.export.detection import DetectionSettings

    return DetectionSettings(max_detections=wrapper.max_detections)


def test_a_pt_name_is_a_file_the_cache_digests_and_a_missing_one_fails_configure(tmp_path):
    from kiln.core.errors import KilnError
    from kiln.export.model_files import model_files
    from kiln.pipeline.checks import check_paths

    (tmp_path / "best.pt").write_bytes(b"weights v1")
    first = model_files({"name": "best.pt"}, tmp_path)["name"]["sha256"]
    (tmp_path / "best.pt").write_bytes(b"weights v2")  # retrained into the same path: a new digest re-runs export
    assert model_files({"name": "best.pt"}, tmp_path)["name"]["sha256"] != first
    assert "name" not in model_files({"name": "yolov8n.yaml"}, tmp_path)  # Ultralytics' own config, not a file of the user's
    with pytest.raises(KilnError, match="model.name: checkpoint 'missing.pt' not found"):
        check_paths({"model": {"name": "missing.pt"}})


def test_an_unreadable_image_still_gets_kilns_error_after_ultralytics_is_imported(tmp_path):
    # Importing ultralytics patches PIL.Image.open process-wide: an unreadable file then raised ModuleNotFoundError
    # (its pi-heif fallback) instead of PIL's own error, which kiln turns into one line naming the file.
    import ultralytics.utils.patches  # noqa: F401 - applies the patch, as any import of ultralytics does

    from kiln.config.views import ModelSpec
    from kiln.core.errors import KilnError
    from kiln.data.images import Preprocess
    from kiln.export.models import build_model

    build_model(ModelSpec.from_params({"name": "yolov8n.yaml", "kwargs": {"nc": 2}, "inputs": {"images": {"shape": [3, 64, 64]}}}))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(KilnError, match="cannot read image .*broken.jpg"):
        Preprocess(resize=64, crop=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).decode(broken)
