"""Detection ground truth (COCO JSON or YOLO txt) and COCO mAP for kiln's detection outputs.

Every function here speaks one per-image format: ``{"boxes": float32 [n, 4] xyxy in pixels,
"labels": int64 [n]}`` for ground truth, plus ``"scores": float32 [n]`` for detections.

Labels are kept as the dataset numbers them: a COCO ``category_id`` is the label, and a YOLO class
index ``c`` is label ``c + label_offset`` (offset 0 by default). torchvision's detectors reserve
label 0 for the background, so a YOLO dataset read for one of them wants ``label_offset=1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from kiln.core.errors import KilnError

COCO_NAMES = ("annotations.json", "labels.json")
YOLO_DIR = "labels"


def _empty() -> dict[str, np.ndarray]:
    return {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64)}


def _parts(name: str | os.PathLike[str]) -> tuple[str, ...]:
    # COCO files written on Windows use backslashes; "./a.png" and "a.png" are the same file.
    return tuple(p for p in PurePosixPath(str(name).replace("\\", "/")).parts if p not in (".", "/"))


def _common_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _load_coco(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KilnError(f"COCO labels {path} not found: point the eval folder's labels at an existing annotations.json") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"COCO labels {path} are not valid JSON ({e}): fix or re-export the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations", []), list):
        raise KilnError(
            f"COCO labels {path} are not a COCO detection file: expected an object with 'images' and 'annotations' lists "
            "(COCO's instances_*.json format)"
        )
    return data


def read_coco_labels(json_path: str | os.PathLike[str], file_names: Sequence[str | os.PathLike[str]]) -> list[dict[str, np.ndarray]]:
    """Ground truth for each of `file_names`, in order, from a COCO detection JSON.

    A file name matches the image whose ``file_name`` shares the most trailing path parts with it:
    the same relative path, else the same base name (``/data/eval/a.png`` matches ``eval/a.png`` or ``a.png``).
    Boxes come back as pixel xyxy. Crowd annotations (``iscrowd: 1``) add an ``"iscrowd"`` array to
    their image's dict, which `detection_map` honours (a crowd region neither rewards nor punishes)."""
    path = Path(json_path)
    data = _load_coco(path)
    by_base: dict[str, list[tuple[tuple[str, ...], Any]]] = defaultdict(list)
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise KilnError(f"COCO labels {path}: images[{i}] lacks an 'id' or a 'file_name' string: every image needs both")
        parts = _parts(image["file_name"])
        by_base[parts[-1] if parts else ""].append((parts, image["id"]))

    boxes: dict[Any, list[list[float]]] = defaultdict(list)
    labels: dict[Any, list[int]] = defaultdict(list)
    crowd: dict[Any, list[int]] = defaultdict(list)
    for i, ann in enumerate(data.get("annotations", [])):
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        try:
            x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
            image_id, category = ann["image_id"], int(ann["category_id"])
        except (TypeError, ValueError, KeyError):
            raise KilnError(
                f"COCO labels {path}: annotations[{i}] needs 'image_id', an integer 'category_id' and a 'bbox' of 4 numbers [x, y, w, h]"
            ) from None
        if w < 0 or h < 0:
            raise KilnError(
                f"COCO labels {path}: annotations[{i}] has a negative width or height in bbox {bbox}: COCO boxes are [x, y, w, h]"
            )
        boxes[image_id].append([x, y, x + w, y + h])
        labels[image_id].append(category)
        crowd[image_id].append(int(bool(ann.get("iscrowd", 0))))

    result = []
    for name in file_names:
        parts = _parts(name)
        candidates = by_base.get(parts[-1] if parts else "", [])
        # The entries sharing the most trailing path parts with the name: "eval/a.png" picks
        # "eval/a.png" over "train/a.png", and a bare "a.png" on either side matches by base name.
        tails = [_common_tail(parts, p) for p, _ in candidates]
        ids = {image_id for (_, image_id), tail in zip(candidates, tails) if tail == max(tails)}
        if not ids:
            raise KilnError(
                f"image {name} is not listed in COCO labels {path} ({len(data['images'])} images there): "
                "add it to the file's 'images' (with its annotations) or remove it from the eval folder"
            )
        if len(ids) > 1:
            raise KilnError(
                f"image {name} matches {len(ids)} entries of COCO labels {path}: give the images distinct file names "
                "or list them in 'images' by their path relative to the eval folder"
            )
        (image_id,) = ids
        if not boxes[image_id]:
            result.append(_empty())
            continue
        entry = {"boxes": np.asarray(boxes[image_id], np.float32), "labels": np.asarray(labels[image_id], np.int64)}
        if any(crowd[image_id]):
            entry["iscrowd"] = np.asarray(crowd[image_id], np.int64)
        result.append(entry)
    return result


def read_yolo_labels(
    label_dir: str | os.PathLike[str],
    image_paths: Sequence[str | os.PathLike[str]],
    image_sizes: Sequence[tuple[int, int]],
    label_offset: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Ground truth for each image from YOLO txt files: ``<label_dir>/<image stem>.txt``, one
    ``class cx cy w h`` line per object in coordinates normalised to 0..1 (a segmentation line,
    ``class x1 y1 x2 y2 ...``, counts as its polygon's bounding box). An image without a txt file has
    no objects. `image_sizes` are (width, height) of each image as the model sees it: normalised
    coordinates survive a plain resize, not a crop or a letterbox. Class ``c`` becomes label ``c + label_offset``."""
    if len(image_paths) != len(image_sizes):
        raise ValueError(f"{len(image_paths)} image paths but {len(image_sizes)} image sizes")
    root = Path(label_dir)
    result = []
    for image, (width, height) in zip(image_paths, image_sizes):
        txt = root / f"{Path(image).stem}.txt"
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            result.append(_empty())
            continue
        boxes, labels = [], []
        for n, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                cls, values = int(fields[0]), [float(v) for v in fields[1:]]
            except ValueError:
                cls, values = -1, []
            if cls < 0 or not (len(values) == 4 or (len(values) >= 6 and len(values) % 2 == 0)):
                raise KilnError(
                    f"YOLO labels {txt}, line {n}: expected 'class cx cy w h' (a class index, 4 normalised numbers), got {line.strip()!r}"
                )
            if len(values) == 4:
                cx, cy, w, h = values
                x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            else:
                xs, ys = values[0::2], values[1::2]
                x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
            boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
            labels.append(cls + label_offset)
        if boxes:
            result.append({"boxes": np.asarray(boxes, np.float32), "labels": np.asarray(labels, np.int64)})
        else:
            result.append(_empty())
    return result


def find_labels(folder: str | os.PathLike[str]) -> tuple[str | None, Path | None]:
    """Where an eval folder's ground truth is: ``("coco", json file)``, ``("yolo", txt folder)`` or ``(None, None)``.

    COCO: ``annotations.json``, else ``labels.json``, else the folder's only ``*.json``. YOLO: a
    ``labels/`` folder of txt files inside the folder, or next to it when the folder is YOLO's ``images/``."""
    root = Path(folder)
    for name in COCO_NAMES:
        if (root / name).is_file():
            return "coco", root / name
    others = sorted(p for p in root.glob("*.json") if p.is_file())
    if len(others) == 1:
        return "coco", others[0]
    if len(others) > 1:
        raise KilnError(
            f"eval folder {root} holds {len(others)} JSON files ({', '.join(p.name for p in others[:4])}"
            f"{', ...' if len(others) > 4 else ''}): name the COCO labels annotations.json so kiln knows which one to read"
        )
    candidates = [root / YOLO_DIR] + ([root.parent / YOLO_DIR] if root.name == "images" else [])
    for labels in candidates:
        if labels.is_dir() and any(labels.glob("*.txt")):
            return "yolo", labels
    return None, None


def unpad(boxes: Any, scores: Any, labels: Any, count: Any) -> list[dict[str, np.ndarray]]:
    """Per-image detections from outputs padded to K per image: the first ``count[i]`` rows of image i are real."""
    boxes, scores, labels = np.asarray(boxes), np.asarray(scores), np.asarray(labels)
    # Exporters write the count as [N] or [N, 1], as an integer or a float.
    count = np.rint(np.asarray(count, dtype=np.float64)).astype(np.int64).reshape(-1)
    n = len(count)
    if boxes.ndim != 3 or boxes.shape[0] != n or boxes.shape[2] != 4 or scores.shape != boxes.shape[:2] or labels.shape != boxes.shape[:2]:
        raise KilnError(
            f"detection outputs disagree: boxes {list(boxes.shape)}, scores {list(scores.shape)}, labels {list(labels.shape)}, "
            f"num_detections {list(np.shape(count))}; expected boxes [N, K, 4], scores and labels [N, K], num_detections [N]"
        )
    count = np.clip(count, 0, boxes.shape[1])
    return [
        {
            "boxes": boxes[i, : count[i]].astype(np.float32),
            "scores": scores[i, : count[i]].astype(np.float32),
            "labels": labels[i, : count[i]].astype(np.int64),
        }
        for i in range(n)
    ]


def _rows(entry: dict[str, Any], what: str, i: int, scored: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.asarray(entry["boxes"], np.float64).reshape(-1, 4)
    labels = np.asarray(entry["labels"]).reshape(-1).astype(np.int64)
    scores = np.asarray(entry["scores"], np.float64).reshape(-1) if scored else np.ones(len(boxes))
    crowd = np.asarray(entry.get("iscrowd", np.zeros(len(boxes))), np.int64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores) == len(crowd):
        raise ValueError(f"{what}[{i}]: {len(boxes)} boxes, {len(labels)} labels, {len(scores)} scores")
    return boxes, labels, scores, crowd


def detection_map(detections: Sequence[dict[str, Any]], ground_truth: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """COCO box mAP (pycocotools' COCOeval, up to 100 detections per image) of `detections` against
    `ground_truth`, image by image: ``{"map": mAP@0.5:0.95, "map50": mAP@0.5, "images": n, "objects": m}``.
    The mAPs are None when the ground truth holds no object (COCO's -1: nothing to measure against)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truth)} of ground truth")
    images, gt_anns, dt_anns, categories = [], [], [], set()
    for i, (dt, gt) in enumerate(zip(detections, ground_truth), start=1):
        images.append({"id": i})
        for anns, entry, scored in ((gt_anns, gt, False), (dt_anns, dt, True)):
            boxes, labels, scores, crowd = _rows(entry, "detections" if scored else "ground_truth", i - 1, scored)
            wh = np.maximum(boxes[:, 2:] - boxes[:, :2], 0)
            for box, size, label, score, is_crowd in zip(boxes, wh, labels, scores, crowd):
                # Ids start at 1: COCOeval takes a matched id of 0 for "unmatched".
                ann = {"id": len(anns) + 1, "image_id": i, "category_id": int(label), "iscrowd": int(is_crowd)}
                ann.update(bbox=[float(box[0]), float(box[1]), float(size[0]), float(size[1])], area=float(size[0] * size[1]))
                if scored:
                    ann["score"] = float(score)
                anns.append(ann)
                categories.add(int(label))
    objects = sum(1 for a in gt_anns if not a["iscrowd"])
    result: dict[str, Any] = {"map": None, "map50": None, "images": len(images), "objects": objects}
    if not objects:
        return result
    cats = [{"id": c} for c in sorted(categories)]
    # pycocotools prints its progress on stdout, which a stage's output (and DVC's log) should not carry.
    with contextlib.redirect_stdout(io.StringIO()):
        # COCO objects built in memory: loadRes needs at least one detection, and neither needs a file.
        gt_coco, dt_coco = COCO(), COCO()
        gt_coco.dataset = {"images": images, "annotations": gt_anns, "categories": cats}
        dt_coco.dataset = {"images": images, "annotations": dt_anns, "categories": cats}
        gt_coco.createIndex()
        dt_coco.createIndex()
        evaluator = COCOeval(gt_coco, dt_coco, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    result["map"] = float(stats[0]) if stats[0] >= 0 else None
    result["map50"] = float(stats[1]) if stats[1] >= 0 else None
    return result
