"""Models that take one image per call, and the two-stage detectors that need it: batch sizes clamped before anything
builds (kiln.config.batch_limit), and a torchvision Mask R-CNN through every non-Inductor CPU target (Faster R-CNN
through the fp32 and int8 ones) at batch 1 with torchvision's own postprocessing in the graph (kiln.export.detection_rcnn)."""

from __future__ import annotations

import pytest
from conftest import ROOT
from test_model_zoo import cpu_params, every_target, fp32

from kiln.config.batch_limit import clamp_batches, model_max_batch
from kiln.config.params import compose
from kiln.config.slices import all_slices
from kiln.core.errors import KilnError


def default_params(**model: object) -> dict:
    params = compose([], config_dir=ROOT / "conf")
    params["model"].update(model)
    return params


def test_a_declared_limit_clamps_every_batch_size_with_a_note():
    params = default_params(max_batch=1)
    clamped, notes = clamp_batches(params)
    assert clamped["export"]["batch"] == 1 and clamped["calibration"]["batch"] == 1
    assert clamped["validate"]["batch_sizes"] == [1] and clamped["benchmark"]["batch_sizes"] == [1]
    assert list(clamped["benchmark"]["serve"]) == [1] and clamped["benchmark"]["serve"][1] == pytest.approx(1.0)
    for target in clamped["targets"].values():
        assert target["profile"] == {"min": 1, "opt": 1, "max": 1}
    (note,) = notes
    assert note.startswith("batch sizes clamped to 1 (model.max_batch is 1)") and "export.batch 2 -> 1" in note
    assert params["export"]["batch"] == 2  # the caller's params are left alone
    # The slices configure writes, and `kiln params`' re-run plan reads, are the clamped ones.
    name = next(iter(params["targets"]))
    assert all_slices(params)[f"targets/{name}/build.json"]["targets"][name]["profile"]["max"] == 1


def test_a_limit_above_some_sizes_keeps_the_smaller_ones_and_merges_the_served_mix():
    clamped, _ = clamp_batches(default_params(max_batch=4))
    assert clamped["validate"]["batch_sizes"] == [1, 4] and clamped["benchmark"]["batch_sizes"] == [1, 4]
    serve = {int(k): v for k, v in clamped["benchmark"]["serve"].items()}
    assert serve == pytest.approx({1: 0.7, 4: 0.3})  # 8-image requests (10%) served as 4
    assert all(t["profile"]["max"] == 4 and t["profile"]["opt"] == 4 for t in clamped["targets"].values())


def test_no_limit_changes_nothing_and_a_two_stage_name_implies_one():
    params = default_params()
    assert clamp_batches(params) == (params, [])
    assert model_max_batch({"name": "maskrcnn_resnet50_fpn"})[0] == 1
    assert model_max_batch({"name": "fasterrcnn_resnet50_fpn", "max_batch": 2})[0] == 2  # declared wins
    with pytest.raises(KilnError, match="model.max_batch must be a positive integer"):
        model_max_batch({"max_batch": 0})


@pytest.fixture(
    scope="module",
    # Keypoint R-CNN is left out: NNCF cannot quantize its graph for openvino-int8 ("Could not find a node Unsqueeze_...
    # in NNCFGraph", NNCF 3.4); the other targets were not checked without it
    params=[("small_faster_rcnn", "Faster R-CNN"), ("small_mask_rcnn", "Mask R-CNN")],
    ids=["faster", "mask"],
)
def rcnn(request, tmp_path_factory):
    from kiln.data.demo_weights import PHOTOGRAPHS
    from kiln.data.images import make_sample_images, photograph
    from kiln.pipeline.quickrun import prepare, run_targets

    root = tmp_path_factory.mktemp("rcnn")
    sources = [photograph(n) for n in PHOTOGRAPHS]
    sources = [s[..., :3] if s.ndim == 3 else __import__("numpy").stack([s] * 3, axis=-1) for s in sources]
    make_sample_images(root / "calibration", sources, 6, seed=1, size=200)
    make_sample_images(root / "eval", sources, 6, seed=2, size=200)
    entrypoint, kind = request.param
    params = cpu_params(
        entrypoint=f"tinymodels:{entrypoint}",
        # the detector's own resize at the input's size: at tinymodels' 320 it ran every image 4x larger (the slow part);
        # 50 proposals and 20 detections (torchvision's: 1000 and 100) make the box and mask heads' work 3-5x smaller
        kwargs={"min_size": 160, "max_size": 160, "box_detections_per_img": 20}
        | {"rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 50},
        max_batch=1,
        demo_weights={"images": 8},  # BatchNorm statistics from 8 photographs, not 32: one R-CNN forward each, twice
        inputs={"images": {"shape": [3, 160, 160]}},
        task="detection",
        detection={"max_detections": 50},
    )
    params["calibration"].update(subset_size=4)
    params["validate"]["atol"] = 0.002  # RoiAlign's order of sums: conf/model/fasterrcnn.yaml says why
    params["data"].update(calibration_dir=str(root / "calibration"), eval_dir=str(root / "eval"), eval_limit=6)
    params["data"]["preprocess"].update(resize=160, crop=160)
    prepared = prepare(params, root / "work")
    targets = every_target(params)
    if kind == "Faster R-CNN":  # Mask R-CNN is Faster R-CNN and a mask head: it alone runs the bf16 and fp16 targets
        targets = [n for n in targets if fp32(n) or "int8" in n]
    return kind, prepared, run_targets(prepared, targets, iterations=2)


def test_an_rcnn_runs_on_every_cpu_target_at_batch_1(rcnn):
    import onnx

    kind, prepared, results = rcnn
    manifest = prepared["export"]
    assert manifest["exporter"] == "torchscript" and "two-stage detector" in manifest["export_path"]["why"]
    assert manifest["export_path"]["model_wrapper"]["kind"] == kind
    # torchvision's own postprocessing in the graph: it finds what the detector's own forward finds.
    assert manifest["export_path"]["nms_fidelity"]["f1"] == pytest.approx(1.0)
    graph = onnx.load(str(prepared["onnx"]))
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 160, 160]
    assert not [n for n in graph.graph.node if n.op_type in ("If", "Loop")]  # nothing NNCF cannot quantize through
    assert prepared["validate"]["batch_sizes"] == [1] and prepared["reference"]["degenerate"] is None
    ran = {n: r for n, r in results.items() if "skipped" not in r}
    assert {"onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8", "torch-eager"} <= set(ran)
    for name, r in ran.items():
        assert r["batch"] == 1, name
        accuracy = r["accuracy"]
        assert accuracy["detections_ref"] > 0 and accuracy["detections"] > 0, name
        assert ("mask_mean_iou" in accuracy) == (kind == "Mask R-CNN"), name  # the matched detections' masks compared
        assert ("keypoint_mean_px" in accuracy) == (kind == "Keypoint R-CNN"), name  # and their keypoints
        if fp32(name):  # the same detections, to float rounding
            assert accuracy["detection_f1"] >= 0.99, (name, accuracy)
            assert accuracy.get("mask_mean_iou", 1.0) >= 0.99, (name, accuracy)
            assert accuracy.get("keypoint_mean_px", 0.0) < 0.5, (name, accuracy)  # the same keypoints, to float rounding
        else:  # judged like any detector's: a figure, whatever int8 does to a random head's near-equal scores
            assert 0.0 <= accuracy["detection_f1"] <= 1.0, (name, accuracy)
