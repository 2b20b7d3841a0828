"""Every model family through every CPU target: a detector, a segmentation net, a ViT and a two-input model.

Tiny members, each exported, validated and judged the way its task says (kiln.accuracy.tasks), through the same
library calls the DVC stages make (kiln.pipeline.quickrun). The detector really learned (a torchvision FCOS trained
here on coloured shapes, tests/detection_data.py), so its mAP and int8's drop mean something.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from conftest import ROOT

from kiln.config.params import compose
from kiln.pipeline.quickrun import prepare, run_targets

# Enough to judge, few enough to keep four families within a few minutes.
QUICK = {"subset_size": 32, "batch": 8}
# Inductor's fixed cost is about a minute per build on two cores, so each family compiles with Inductor once:
# the detector (NMS in the graph, through torch.export) with AOTInductor, the ViT (attention) with
# torch.compile, in fp32 only; the segmentation and two-input models through every other target (test_torch_compile
# covers both compilers on their own, bf16 autocast included). On a CPU with native bf16 (AMX) the bf16 builds doubled
# the detector's and the ViT's Inductor time.
INDUCTOR = ("torch-compile", "torch-aoti")


def every_target(params: dict, inductor: str | None = None) -> list[str]:
    """Every CPU target but the Inductor ones, and the fp32 target of the one compiler named."""
    return [n for n in params["targets"] if not n.startswith(INDUCTOR) or n == inductor]


def cpu_params(**model: object) -> dict:
    # The deep study's CPU set: the default one and the PyTorch compilers, untuned (kiln.measure.tuning has its own tests).
    params = compose(["targets=cpu_deep"], config_dir=ROOT / "conf")
    for target in params["targets"].values():
        target["tune"] = False
    # Entrypoints without a checkpoint return random weights here: say so (kiln takes them as trained otherwise).
    trained = "auto" if model.get("checkpoint") else False
    params["model"] = {
        "name": None,
        "entrypoint": None,
        "checkpoint": None,
        "weights": None,
        "kwargs": {},
        "seed": 0,
        "trained": trained,
        **model,
    }
    params["calibration"].update(QUICK)
    params["validate"]["reference_samples"] = 16
    return params


def fp32(name: str) -> bool:
    return "int8" not in name and "bf16" not in name and "fp16" not in name


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    import detection_data

    root = tmp_path_factory.mktemp("detector")
    train = detection_data.make_shapes_dataset(root / "train", 128, seed=1)
    model = detection_data.train_detector(detection_data.tiny_detector(), root / "train", train, steps=150, seed=0)
    checkpoint = detection_data.save_checkpoint(model, root / "fcos.pt")
    detection_data.make_shapes_dataset(root / "calibration", 32, seed=2)
    detection_data.make_shapes_dataset(root / "eval", 32, seed=3)  # with annotations.json: real mAP
    params = cpu_params(
        entrypoint="detection_data:tiny_detector_factory",
        checkpoint=str(checkpoint),
        inputs={"images": {"shape": [3, 128, 128]}},
        task="auto",
        detection={"candidates": 200, "max_detections": 50},
    )
    params["data"].update(calibration_dir=str(root / "calibration"), eval_dir=str(root / "eval"), eval_limit=32)
    params["data"]["preprocess"].update(resize=128, crop=128)
    prepared = prepare(params, root / "work")
    return prepared, run_targets(prepared, every_target(params, "torch-aoti"), iterations=3)


def test_detector_exports_whole_with_nms_and_a_dynamic_batch(detector):
    prepared, _ = detector
    manifest = prepared["export"]
    assert manifest["task"] == "detection" and "inferred" in manifest["task_reason"]
    assert manifest["exporter"] == "dynamo" and manifest["export_path"]["model_wrapper"]["family"] == "fcos"
    assert manifest["inputs"]["images"]["shape"][0] == "batch"
    assert {"boxes", "scores", "labels", "num_detections"} == set(manifest["outputs"])
    report = prepared["validate"]
    assert report["task"] == "detection" and set(report["outputs"]) == {"boxes", "scores"}  # matched pairs, compared element-wise
    assert "(labelled)" in prepared["reference"]["source"] and prepared["reference"]["degenerate"] is None


def test_detector_through_every_cpu_target_with_map_and_its_int8_drop(detector):
    prepared, results = detector
    built = {n: r for n, r in results.items() if not r.get("skipped")}
    assert {"onnxruntime", "openvino", "onnxruntime-int8", "openvino-int8", "torch-eager", "torch-aoti"} <= set(built)
    for name, r in built.items():
        acc = r["accuracy"]
        assert acc["task"] == "detection" and acc["agreement_metric"] == "detection_f1"
        assert acc["map_fp32"] > 0.5, "the trained detector should find the shapes"
        assert "top1_agreement" not in acc and "cosine" not in acc  # padded lists are matched, not compared element-wise
        if fp32(name):
            assert acc["detection_f1"] > 0.98 and abs(acc["map_drop"]) < 1.0, (name, acc)
        else:
            # int8 and bf16 move scores and boxes a little: the drop is measured, whatever it is.
            assert acc["map"] > 0.0 and np.isfinite(acc["map_drop"]), (name, acc)
        assert r["ms_per_image"] > 0


def test_detection_budget_judges_f1_and_map_drop_not_top1(detector):
    from kiln.accuracy.budgets import budget_violations

    _, results = detector
    acc = copy.deepcopy(results["onnxruntime-int8"]["accuracy"])
    acc.update(detection_f1=0.5, map_drop=7.0)
    lines = budget_violations(acc, {"min_top1_agreement": 0.99, "min_detection_f1": 0.9, "max_map_drop": 1.0, "min_cosine": 0.99})
    assert any("detection_f1 0.5 < min_detection_f1" in v for v in lines) and any("map_drop 7 > max_map_drop" in v for v in lines)
    assert not any("top1" in v or "cosine" in v for v in lines)


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory):
    params = cpu_params(name="lraspp_mobilenet_v3_large", inputs={"input": {"shape": [3, 64, 64]}}, task="auto")
    params["model"]["demo_weights"] = {"batchnorm": True, "redraw_zero_layers": True, "images": 8}
    params["data"]["preprocess"].update(resize=64, crop=64)
    # Bilinear upsampling of the logits differs between PyTorch and ONNX Runtime by ~2e-4 at this size.
    params["validate"]["atol"] = 1e-3
    return _prepared_with_images(params, tmp_path_factory.mktemp("segmentation"), masks=True)


def _prepared_with_images(params: dict, root, inductor: str | None = None, masks: bool = False):
    from PIL import Image

    from kiln.data.images import make_sample_images, photograph

    make_sample_images(root / "calibration", [photograph(n) for n in ("astronaut", "chelsea", "rocket")], 32, 1, 96)
    written = make_sample_images(root / "eval", [photograph(n) for n in ("coffee", "china")], 16, 2, 96)
    if masks:  # class-index masks (255: ignore), blocks of classes; the random network's mIoU means nothing, its plumbing does
        (root / "eval" / "masks").mkdir()
        rng = np.random.default_rng(0)
        for path in written:
            blocks = rng.integers(0, 21, size=(4, 4)).astype(np.uint8)
            blocks[0, 0] = 255
            Image.fromarray(np.kron(blocks, np.ones((24, 24), np.uint8))).save(root / "eval" / "masks" / f"{path.stem}.png")
    params["data"].update(calibration_dir=str(root / "calibration"), eval_dir=str(root / "eval"))
    prepared = prepare(params, root / "work")
    return prepared, run_targets(prepared, every_target(params, inductor), iterations=3)


def test_segmentation_is_judged_per_pixel(segmentation):
    prepared, results = segmentation
    assert prepared["export"]["task"] == "segmentation" and "out" in prepared["export"]["outputs"]
    assert prepared["reference"]["degenerate"] is None  # demo_weights: the map is not one class everywhere
    assert prepared["reference"]["labels"].shape == (16, 64, 64) and "(labelled)" in prepared["reference"]["source"]
    for name, r in results.items():
        if r.get("skipped"):
            continue
        acc = r["accuracy"]
        assert acc["task"] == "segmentation" and acc["segmentation_output"] == "out"
        assert 0.0 <= acc["pixel_agreement"] <= 1.0 and acc["miou_agreement"] is not None
        assert 0.0 <= acc["miou"] <= 1.0 and np.isfinite(acc["miou_drop"])  # real mIoU against eval/masks/*.png
        if fp32(name):
            assert acc["pixel_agreement"] > 0.99, (name, acc)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    # torchvision's own VisionTransformer, small: its head is zero-initialised, so demo_weights must re-draw it.
    params = cpu_params(
        entrypoint="torchvision.models.vision_transformer:VisionTransformer",
        kwargs={"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64, "num_classes": 10},
        inputs={"input": {"shape": [3, 32, 32]}},
        outputs=["logits"],
        task="auto",
        demo_weights={"batchnorm": True, "redraw_zero_layers": True, "images": 8},
    )
    params["data"]["preprocess"].update(resize=32, crop=32)
    return _prepared_with_images(params, tmp_path_factory.mktemp("vit"), inductor="torch-compile")


def test_vit_reference_is_made_meaningful_and_int8_uses_the_transformer_scheme(vit):
    prepared, results = vit
    assert prepared["reference"]["degenerate"] is None and prepared["validate"]["degenerate"] is None
    assert prepared["export"]["task"] == "classification"
    for name, r in results.items():
        if r.get("skipped"):
            continue
        if fp32(name):
            assert r["accuracy"]["top1_agreement"] > 0.9, (name, r["accuracy"])
    calibration = (prepared["workdir"] / "calibration-openvino-int8" / "calibration.json").read_text()
    assert '"model_type": "transformer"' in calibration
    # What the compiler did with attention, per runtime ("fused", "partly fused" or "not fused"): measured, not assumed.
    for target in ("onnxruntime", "openvino"):
        manifest = json.loads((prepared["workdir"] / f"engine-{target}" / "manifest.json").read_text())
        assert "fused" in manifest["graph"]["attention"], (target, manifest["graph"])


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    params = cpu_params(
        entrypoint="tinymodels:image_and_tokens",
        inputs={"image": {"shape": [3, 16, 16]}, "tokens": {"shape": [6], "dtype": "int64", "range": [0, 49]}},
        task="auto",
    )
    params["data"]["preprocess"].update(resize=16, crop=16)
    return _prepared_with_images(params, tmp_path_factory.mktemp("two-inputs"))


def test_two_input_model_calibrates_and_is_judged_on_images_plus_seeded_tokens(two_inputs):
    prepared, results = two_inputs
    feeds = prepared["reference"]["inputs"]
    assert set(feeds) == {"image", "tokens"} and feeds["tokens"].max() <= 49 and feeds["tokens"].dtype == np.int64
    assert "images from" in prepared["reference"]["source"]
    assert not results["onnxruntime-int8"].get("skipped") and not results["openvino-int8"].get("skipped")
    for name, r in results.items():
        if not r.get("skipped") and fp32(name):
            assert r["accuracy"]["top1_agreement"] > 0.99, (name, r["accuracy"])


DETECTOR_MODEL = """\
name: null
entrypoint: detection_data:tiny_detector_factory
checkpoint: {checkpoint}
weights: null
kwargs: {{}}
inputs:
  images: {{shape: [3, 128, 128], dtype: float32}}
outputs: null
seed: 0
task: auto
detection: {{candidates: 200, max_detections: 50}}
demo_weights: {{batchnorm: false, redraw_zero_layers: false, images: 32}}
"""

MINI_TARGETS = """\
defaults:
  - /target_defaults/cpu@onnxruntime
  - /target_defaults/cpu@openvino-int8
  - _self_
onnxruntime:
  runtime: onnxruntime
openvino-int8:
  runtime: openvino
  precision: int8
"""


def test_a_detector_through_dvc_repro_reports_f1_and_map(tmp_path, detector):
    """The stage scripts, not only the library: reference labels in the .npz, metrics, and the report's columns."""
    import json
    import shutil

    from test_pipeline import make_project, run

    prepared, _ = detector
    root = prepared["workdir"].parent
    project = make_project(tmp_path)
    shutil.copy(root / "fcos.pt", project / "fcos.pt")
    (project / "conf" / "model" / "det.yaml").write_text(DETECTOR_MODEL.format(checkpoint="fcos.pt"))
    (project / "conf" / "targets" / "mini.yaml").write_text(MINI_TARGETS)
    for folder in ("calibration", "eval"):
        shutil.copytree(root / folder, project / "data" / folder)
    run(
        [
            "python",
            "-m",
            "kiln",
            "params",
            "model=det",
            "targets=mini",
            "data.preprocess.resize=128",
            "data.preprocess.crop=128",
            "calibration.subset_size=32",
            "data.eval_limit=32",
        ],
        project,
    )
    run(["dvc", "repro", "-q"], project)
    metrics = json.loads((project / "reports" / "metrics" / "openvino-int8.json").read_text())
    assert {"detection_f1", "map", "map50"} <= set(metrics) and "top1_agreement" not in metrics
    report = (project / "reports" / "benchmark.md").read_text()
    assert "detection F1" in report and "mAP@0.5:0.95" in report and "Outputs judged as task detection (inferred" in report
    assert "kiln's fixed-shape NMS" in report


@pytest.mark.parametrize(
    ("name", "size", "kwargs", "atol"),
    [
        ("deeplabv3_mobilenet_v3_large", 64, {}, 1e-3),  # bilinear upsampling: ~2e-4 float noise (conf/model/deeplabv3.yaml)
        ("vit_b_16", 32, {"image_size": 32}, 1e-4),  # a zero-initialised head: every output exactly 0 without demo weights
    ],
)
def test_a_name_only_random_model_gets_demo_weights_and_passes_validate(tmp_path, caplog, name, size, kwargs, atol):
    """A model file that gives only the name (and its input): demo_weights' defaults live in kiln, not in conf/model."""
    import logging

    from kiln.data.engine_input import engine_spec
    from kiln.export.models import build_model
    from kiln.export.onnx import ExportSettings, export_onnx
    from kiln.export.validate import ValidateSettings, reference_set, validate_export

    params = {
        "model": {"name": name, "kwargs": kwargs, "inputs": {"input": {"shape": [3, size, size]}}},
        "data": {"preprocess": {"resize": size, "crop": size}},
    }
    off = {**params, "model": {**params["model"], "demo_weights": False}}
    assert engine_spec(off).demo is None  # turned off, the reference proves nothing (test_export_validate)
    spec = engine_spec(params)
    assert spec.demo and spec.demo["batchnorm"] and spec.demo["redraw_zero_layers"]
    with caplog.at_level(logging.INFO, logger="kiln.data.demo_weights"):
        model = build_model(spec)
    assert any("model.demo_weights applied" in r.message and "model.demo_weights: false" in r.message for r in caplog.records)
    path = tmp_path / "model.onnx"
    manifest = export_onnx(model, spec, ExportSettings(), path)
    settings = ValidateSettings(atol=atol, batch_sizes=(1, 3), reference_samples=4)
    report = validate_export(build_model(spec), path, spec, settings, 2)
    assert report["passed"] and report["degenerate"] is None
    reference = reference_set(build_model(spec), spec, list(manifest["outputs"]), {}, settings)
    assert reference["degenerate"] is None
