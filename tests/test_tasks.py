"""kiln.accuracy.tasks on hand-made outputs: inference of the task, order-insensitive detection matching, the
detection gate's tolerance at the list's cut, and what each task calls a reference that proves nothing."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.accuracy.tasks import OutputInfo, infer_task, output_infos, resolve_task
from kiln.accuracy.tasks.detection import Detection
from kiln.accuracy.tasks.segmentation import mean_iou
from kiln.core.errors import KilnError, ValidationFailed


def padded(dets: list[list[tuple[float, float, float, float, float, int]]], k: int = 4, best_first: bool = True) -> dict[str, np.ndarray]:
    """Per image [(x1, y1, x2, y2, score, label)] -> kiln's padded detection outputs (rows best first, as kiln's
    detectors answer, or in the order given)."""
    n = len(dets)
    out = {"boxes": np.zeros((n, k, 4), np.float32), "scores": np.zeros((n, k), np.float32), "labels": -np.ones((n, k), np.int64)}
    out["num_detections"] = np.array([len(d) for d in dets], np.int64)
    for i, image in enumerate(dets):
        for j, (*box, score, label) in enumerate(sorted(image, key=lambda d: -d[4]) if best_first else image):
            out["boxes"][i, j], out["scores"][i, j], out["labels"][i, j] = box, score, label
    return out


CAT = (10, 10, 50, 50, 0.9, 1)
DOG = (60, 60, 100, 100, 0.8, 2)
BIRD = (5, 70, 30, 95, 0.3, 3)


def detection_task(outputs: dict[str, np.ndarray]) -> Detection:
    task, line = resolve_task("auto", output_infos(outputs))
    assert isinstance(task, Detection) and "inferred" in line
    return task


def test_the_task_is_inferred_from_names_and_shapes():
    assert infer_task([OutputInfo("boxes", (2, 5, 4), "float32"), OutputInfo("scores", (2, 5), "float32")])[0] == "detection"
    assert infer_task([OutputInfo("out", (2, 21, 8, 8), "float32")])[0] == "segmentation"
    assert infer_task([OutputInfo("logits", (2, 10), "float32")])[0] == "classification"
    assert infer_task([OutputInfo("embedding", (2, 32), "float32")])[0] == "embedding"
    name, why = infer_task([OutputInfo("y", (2, 3, 4), "float32")])
    assert name == "raw" and "model.task" in why
    with pytest.raises(KilnError, match="needs outputs named boxes"):
        resolve_task("detection", [OutputInfo("logits", (2, 10), "float32")])


def test_detections_match_whatever_their_order_and_not_across_classes():
    ref = padded([[CAT, DOG, BIRD]])
    task = detection_task(ref)
    # Same objects in other rows: the engine's rows are not in the reference's order (the cat's and the dog's
    # scores swapped, so even best-first rows differ), and an unsorted list too.
    swapped = padded([[CAT[:4] + (0.8, 1), DOG[:4] + (0.9, 2), BIRD]])
    unsorted = padded([[BIRD, DOG, CAT]], best_first=False)
    unsorted["scores"][0, :3] += 0.001  # slightly different scores
    for got in (swapped, unsorted):
        assert [tuple(b) for b in got["boxes"][0, :3]] != [tuple(b) for b in ref["boxes"][0, :3]]  # really reordered
        result = task.compare(ref, got)
        assert result["detection_f1"] == 1.0 and result["detection_mean_iou"] == 1.0, result
    wrong_class = padded([[CAT, DOG, BIRD[:5] + (1,)]])
    moved = padded([[CAT, DOG, (40, 70, 65, 95, 0.3, 3)]])  # IoU with the bird under 0.5
    for got in (wrong_class, moved):
        result = task.compare(ref, got)
        assert result["detection_f1"] == pytest.approx(2 * 2 / 6) and result["detections"] == 3


def test_the_detection_gate_excuses_a_swap_at_the_cut_and_nothing_else():
    task = detection_task(padded([[CAT]]))
    lowest = (70, 5, 95, 30, 0.25, 3)
    twin = (5, 5, 20, 20, 0.25 + 1e-6, 3)  # its neighbour at the cut: equal score but for rounding
    comparisons = task.validate(padded([[CAT, DOG, lowest]]), padded([[CAT, DOG, twin]]), 1e-4, 1e-3)
    assert {c.name for c in comparisons} == {"boxes", "scores"} and all(c.passed for c in comparisons)
    with pytest.raises(ValidationFailed, match=r"detections of input 0: .* only 2 match .* above the list's cut"):
        task.validate(padded([[CAT, DOG, lowest]]), padded([[CAT, lowest, (60, 5, 90, 30, 0.8, 2)]]), 1e-4, 1e-3)


def test_references_that_prove_nothing_per_task():
    assert "detects nothing" in detection_task(padded([[], []])).degenerate(padded([[], []]))
    same = np.tile(np.array([[0.1, 2.0, 0.3]], np.float32), (4, 1)) + np.arange(4, dtype=np.float32)[:, None] * 0.01
    task, _ = resolve_task("auto", output_infos({"logits": same}))
    assert "class 1 for all 4 inputs" in task.degenerate({"logits": same})
    assert task.gate_degenerate({"logits": same}) is None  # the gate compares logits, which vary


def test_mean_iou_counts_classes_present_in_either_map():
    a = np.array([[0, 0, 1, 1]])
    assert mean_iou(a, a, 3) == 1.0
    assert mean_iou(a, np.array([[0, 1, 1, 1]]), 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert mean_iou(np.array([[255, 0]]), np.array([[1, 0]]), 3, ignore=255) == 1.0


def test_attention_fusion_is_read_from_what_the_runtime_runs():
    from kiln.export.graphs import attention_summary

    given = ["MatMul", "Softmax", "MatMul", "Add"]
    assert attention_summary(["Conv", "Relu"], ["Conv"]) is None
    assert attention_summary(given, ["MultiHeadAttention"]) == "fused into one kernel x1"
    assert attention_summary(given, ["MatMul", "MatMul"], {"MatMul+Softmax": 2}).startswith("partly fused")
    assert attention_summary(given, given).startswith("not fused")


def test_masks_and_keypoints_of_matched_detections_are_compared():
    import numpy as np

    from kiln.accuracy.tasks.detection import agreement, unpad

    boxes = np.array([[[0, 0, 10, 10], [20, 20, 30, 30]]], np.float32)
    masks = np.zeros((1, 2, 32, 32), np.float32)
    masks[0, 0, :10, :10] = 0.9
    masks[0, 1, 20:30, 20:30] = 0.9
    keypoints = np.zeros((1, 2, 3, 3), np.float32)
    ref = {"boxes": boxes, "scores": np.array([[0.9, 0.8]], np.float32), "labels": np.array([[1, 2]]), "num_detections": np.array([2])}
    ref.update(masks=masks, keypoints=keypoints)
    got = {k: v.copy() for k, v in ref.items()}
    got["masks"][0, 0, :5, :10] = 0.1  # half of the first object's mask lost
    got["keypoints"][0, 1, :, :2] += np.array([3.0, 4.0], np.float32)  # the second's keypoints 5 px away
    out = agreement(unpad(ref), unpad(got))
    assert out["detection_f1"] == 1.0
    assert out["mask_mean_iou"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["keypoint_mean_px"] == pytest.approx((0.0 + 5.0) / 2)
    assert "mask_mean_iou" not in agreement(unpad({k: v for k, v in ref.items() if k != "masks"}), unpad(got))
