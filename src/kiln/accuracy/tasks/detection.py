"""Detections (boxes, scores, labels, num_detections): matched by class and IoU, order-insensitive.

Kiln's detectors answer padded lists (kiln.export.detection): per image the first num_detections rows
are detections, best first. An engine's detections are matched to the reference's greedily, best score
first, same class and IoU >= 0.5; F1 of that matching is the agreement, with the mean IoU and score
error of the matched pairs. With COCO or YOLO labels in the eval folder, real mAP (pycocotools).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kiln.accuracy.numerics import compare_output
from kiln.accuracy.tasks import Task
from kiln.core.errors import KilnError, ValidationFailed

MATCH_IOU = 0.5


def unpad(outputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Padded [N, K, ...] outputs -> one {boxes, scores, labels} per image (num_detections optional: without
    it, detections are the rows with a positive score)."""
    from kiln.accuracy.tasks.detection_labels import unpad as unpad_arrays

    scores = np.asarray(outputs["scores"])
    count = outputs["num_detections"] if "num_detections" in outputs else (scores > 0).sum(axis=1)
    images = unpad_arrays(outputs["boxes"], scores, outputs["labels"], count)
    for extra in EXTRAS:  # Mask R-CNN's masks [N, K, H, W], Keypoint R-CNN's keypoints [N, K, P, 3]
        if extra in outputs:
            for i, image in enumerate(images):
                image[extra] = np.asarray(outputs[extra][i, : len(image["scores"])], dtype=np.float32)
    return images


EXTRAS = ("masks", "keypoints")
MASK_THRESHOLD = 0.5  # torchvision's: a mask probability above it is the object


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    ma, mb = a > MASK_THRESHOLD, b > MASK_THRESHOLD
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 1.0


def keypoint_px(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance in pixels between the same keypoints of two detections."""
    return float(np.linalg.norm(a[:, :2] - b[:, :2], axis=1).mean())


def to_crop(gt: Mapping[str, np.ndarray], size: tuple[int, int], preprocess: Any) -> dict[str, np.ndarray]:
    """Ground-truth boxes of an original (width, height) image moved into the resized, centre-cropped image
    the model sees (kiln.data.images.Preprocess); boxes cropped away entirely are dropped."""
    w, h = size
    rw, rh, left, top = preprocess.geometry(w, h)
    boxes = np.asarray(gt["boxes"], np.float64).reshape(-1, 4) * [rw / w, rh / h, rw / w, rh / h] - [left, top, left, top]
    boxes = np.clip(boxes, 0, preprocess.crop)
    keep = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)
    return {"boxes": boxes[keep].astype(np.float32), "labels": np.asarray(gt["labels"]).reshape(-1)[keep].astype(np.int64)}


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], iou: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """(reference index, engine index, IoU) pairs: engine detections best first take the best free reference one."""
    ious = iou_matrix(got["boxes"], ref["boxes"])
    same = got["labels"][:, None] == ref["labels"][None, :]
    taken: set[int] = set()
    pairs = []
    for g in np.argsort(-got["scores"], kind="stable"):
        candidates = [(ious[g, r], r) for r in range(len(ref["scores"])) if r not in taken and same[g, r] and ious[g, r] >= iou]
        if candidates:
            best, r = max(candidates)
            taken.add(r)
            pairs.append((r, int(g), float(best)))
    return pairs


def agreement(ref_images: list[dict[str, np.ndarray]], got_images: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    matched = n_ref = n_got = 0
    ious: list[float] = []
    score_err: list[float] = []
    masks: list[float] = []
    keypoints: list[float] = []
    for ref, got in zip(ref_images, got_images):
        pairs = match(ref, got)
        matched += len(pairs)
        n_ref += len(ref["scores"])
        n_got += len(got["scores"])
        ious += [p[2] for p in pairs]
        score_err += [abs(float(ref["scores"][r]) - float(got["scores"][g])) for r, g, _ in pairs]
        if "masks" in ref and "masks" in got:  # of the matched detections: the same object's mask
            masks += [mask_iou(ref["masks"][r], got["masks"][g]) for r, g, _ in pairs]
        if "keypoints" in ref and "keypoints" in got:
            keypoints += [keypoint_px(ref["keypoints"][r], got["keypoints"][g]) for r, g, _ in pairs]
    out = {
        "detection_f1": 2.0 * matched / (n_ref + n_got) if n_ref + n_got else None,
        "detection_mean_iou": float(np.mean(ious)) if ious else None,
        "detection_score_err": float(np.mean(score_err)) if score_err else None,
        "detections_ref": n_ref,
        "detections": n_got,
    }
    if masks:
        out["mask_mean_iou"] = float(np.mean(masks))
    if keypoints:
        out["keypoint_mean_px"] = float(np.mean(keypoints))
    return out


class Detection(Task):
    name = "detection"
    budget_keys = {
        "min_detection_f1": ("detection_f1", min),
        "min_detection_mean_iou": ("detection_mean_iou", min),
        "min_mask_mean_iou": ("mask_mean_iou", min),
        "max_map_drop": ("map_drop", max),
    }
    agreement_metric = "detection_f1"
    headline = ("detection_f1", "map", "map50")
    elementwise = False  # padded lists in score order: element-wise errors would compare different objects

    def check(self) -> None:
        names = {o.name for o in self.outputs}
        missing = {"boxes", "scores", "labels"} - names
        if missing:
            raise KilnError(
                f"model.task detection needs outputs named boxes [B, K, 4], scores [B, K] and labels [B, K] (num_detections [B] "
                f"optional); missing {sorted(missing)} in {sorted(names)}: name them with model.outputs"
            )

    def compare(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, Any]:
        return agreement(unpad(ref), unpad(got))

    def read_labels(self, images: Any, preprocess: Any) -> list[dict[str, np.ndarray]] | None:
        """COCO JSON or YOLO txt next to the eval images (kiln.accuracy.tasks.detection_labels.find_labels), in the
        coordinates of the image the model sees."""
        from PIL import Image

        from kiln.accuracy.tasks.detection_labels import find_labels, read_coco_labels, read_yolo_labels

        kind, where = find_labels(images.root)
        if kind is None or where is None:
            return None
        sizes = []
        for p in images.paths:
            with Image.open(p) as im:
                sizes.append(im.size)
        if kind == "coco":
            gts = read_coco_labels(where, [p.relative_to(images.root).as_posix() for p in images.paths])
        else:
            gts = read_yolo_labels(where, images.paths, sizes)
        return [to_crop(gt, size, preprocess) for gt, size in zip(gts, sizes)]

    def against_labels(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], labels: Any) -> dict[str, Any]:
        if not isinstance(labels, list):
            return {}
        from kiln.accuracy.tasks.detection_labels import detection_map

        ref_map, got_map = detection_map(unpad(ref), labels), detection_map(unpad(got), labels)
        if ref_map is None or got_map is None or ref_map.get("map") is None or got_map.get("map") is None:
            return {}
        return {
            "map": got_map["map"],
            "map50": got_map["map50"],
            "map_fp32": ref_map["map"],
            "map50_fp32": ref_map["map50"],
            "map_drop": 100.0 * (ref_map["map"] - got_map["map"]),
        }

    def degenerate(self, ref: Mapping[str, np.ndarray]) -> str | None:
        images = unpad(ref)
        if not any(len(d["scores"]) for d in images):
            return (
                "the reference detects nothing on any input (the gate feeds noise: lower the score cut, "
                "model.detection.score_thresh, as Ultralytics' val does with 0.001; random weights? then model.demo_weights too: "
                "a random head's scores sit near its prior)"
            )
        scores = np.concatenate([d["scores"] for d in images])
        if scores.size > 1 and float(np.ptp(scores)) <= 1e-6 * max(1.0, float(np.max(np.abs(scores)))):
            return f"every reference detection has the same score ({float(scores[0]):.4g}): which boxes survive NMS is a tie-break"
        return None

    def gate_degenerate(self, ref: Mapping[str, np.ndarray]) -> str | None:
        return self.degenerate(ref)  # the gate matches detections: with none, it matched nothing

    def validate(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], atol: float, rtol: float) -> list[Any]:
        """Every reference detection must have its match, and matched boxes and scores must agree within tolerance."""
        ref_images, got_images = unpad(ref), unpad(got)
        aligned: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"boxes": ([], []), "scores": ([], [])}
        for i, (r, g) in enumerate(zip(ref_images, got_images)):
            pairs = match(r, g)
            unmatched = [float(x) for x in np.delete(r["scores"], [p[0] for p in pairs])]
            unmatched += [float(x) for x in np.delete(g["scores"], [p[1] for p in pairs])]
            # At the list's cut (the last kept score, or the score threshold) a score that moves by float
            # rounding can swap one detection for its neighbour: those are excused, nothing else is.
            floor = min([*r["scores"], *g["scores"]], default=0.0)
            strays = [x for x in unmatched if x - floor > atol + rtol * abs(x)]
            if strays:
                raise ValidationFailed(
                    f"detections of input {i}: the graph finds {len(g['scores'])}, PyTorch {len(r['scores'])}, and only {len(pairs)} "
                    f"match (same class, IoU >= {MATCH_IOU}); {len(strays)} unmatched score(s) up to {max(strays):.4g} lie above the "
                    f"list's cut ({floor:.4g}) by more than the tolerance: the exported detector computes something else"
                )
            ri = [p[0] for p in pairs]
            gi = [p[1] for p in pairs]
            for key in aligned:
                aligned[key][0].append(r[key][ri])
                aligned[key][1].append(g[key][gi])
        # Box corners are compared as a share of the reference boxes' extent (about the image size): a fixed atol in
        # pixels would be strict on a large image and loose on a small one, and a two-stage detector's RoI pooling
        # moves a corner by a few hundredths of a pixel between runtimes where the scores agree to 1e-5.
        extent = max([1.0, *(float(np.abs(r["boxes"]).max()) for r in ref_images if len(r["boxes"]))])
        scale = {"boxes": extent, "scores": 1.0}
        return [
            # Flat: a [matches, 4] array of coordinates is not class scores (no top-1 on it).
            compare_output(
                key,
                np.concatenate(a).astype(np.float32).ravel() / scale[key],
                np.concatenate(b).astype(np.float32).ravel() / scale[key],
                atol,
                rtol,
            )
            for key, (a, b) in aligned.items()
        ]
