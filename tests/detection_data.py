"""A synthetic detection task and a tiny torchvision detector that learns it on two CPU cores in under half a minute.

Coloured shapes on crops of scikit-image's photographs: class 1 a red square, class 2 a green circle,
class 3 a blue triangle. The detector is a real torchvision FCOS (what kiln's detection export
targets), on a four-stage convolutional backbone. Entrypoint for test configs: ``detection_data:tiny_detector_factory``;
``detection_data:tiny_yolo_factory`` is an Ultralytics YOLOv8 at a tiny scale, trained with Ultralytics' own loss.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

CLASSES = {1: "square", 2: "circle", 3: "triangle"}
# Each class's colour is near one primary, so colour alone nearly separates them and shape confirms it.
COLOURS = {1: (220, 30, 30), 2: (30, 200, 30), 3: (30, 60, 230)}


def _photographs() -> list[np.ndarray]:
    try:
        import skimage.data as data

        return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    except Exception:
        return []


def _background(rng: np.random.Generator, sources: Sequence[np.ndarray], size: int) -> Image.Image:
    if not sources:
        noise = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        return Image.fromarray(noise).resize((size, size), Image.BILINEAR)
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape[:2]
    side = int(min(h, w) * rng.uniform(0.4, 1.0))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return Image.fromarray(np.ascontiguousarray(src[top : top + side, left : left + side, :3])).resize((size, size), Image.BILINEAR)


def _overlaps(box: list[float], boxes: list[list[float]]) -> bool:
    return any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes)


def make_shapes_dataset(
    out_dir: str | Path, count: int, seed: int, size: int = 128, sources: Sequence[np.ndarray] | None = None
) -> list[dict[str, Any]]:
    """`count` PNGs with 1-3 non-overlapping shapes each, and ``out_dir/annotations.json`` (COCO).

    Returns per image ``{"file_name", "boxes": float32 [n, 4] xyxy, "labels": int64 [n]}``: the
    format of kiln.accuracy.tasks.detection_labels, plus the file's name inside `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = _photographs() if sources is None else list(sources)
    scale = size / 128
    images, annotations, result = [], [], []
    for i in range(count):
        image = _background(rng, sources, size)
        draw = ImageDraw.Draw(image)
        boxes: list[list[float]] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(20):
                side = int(round(rng.uniform(16, 48) * scale))
                x, y = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
                box = [float(x), float(y), float(x + side), float(y + side)]
                if not _overlaps(box, boxes):
                    break
            else:
                continue
            label = int(rng.integers(1, 4))
            colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in COLOURS[label])
            # PIL's shapes include their last pixel: draw to side - 1 so the shape fills exactly the box.
            x1, y1 = x + side - 1, y + side - 1
            if label == 1:
                draw.rectangle([x, y, x1, y1], fill=colour)
            elif label == 2:
                draw.ellipse([x, y, x1, y1], fill=colour)
            else:
                draw.polygon([(x, y1), (x1, y1), ((x + x1) / 2, y)], fill=colour)
            boxes.append(box)
            labels.append(label)
        name = f"{i:04d}.png"
        image.save(out / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for box, label in zip(boxes, labels):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": label,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        result.append({"file_name": name, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64)})
    categories = [{"id": k, "name": v} for k, v in CLASSES.items()]
    (out / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return result


class TinyBackbone(nn.Module):
    """Four stride-2 stages of two convolutions each; the last two (strides 8 and 16) are the feature maps FCOS sees."""

    def __init__(self, width: int = 32):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.stem = nn.Sequential(stage(3, 16), stage(16, 32), stage(32, width))
        self.p4 = stage(width, width)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        c3 = self.stem(x)
        return OrderedDict([("0", c3), ("1", self.p4(c3))])


def tiny_detector(num_classes: int = 4, size: int = 128) -> nn.Module:
    """An untrained torchvision FCOS for `size` x `size` inputs; labels 1..num_classes-1 (0 is unused, as in torchvision's COCO models)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    backbone = TinyBackbone()
    # FCOS gives an object to the level where its largest centre-to-side distance lies within 4..8
    # anchor sizes (the first level from 0, the last without end): sizes 3 and 6 at 128 px keep
    # objects under 24 px on stride 8 and share larger ones with stride 16, so both levels learn.
    anchors = AnchorGenerator(sizes=((3 * size / 128,), (6 * size / 128,)), aspect_ratios=((1.0,), (1.0,)))
    return FCOS(
        backbone,
        num_classes=num_classes,
        min_size=size,
        max_size=size,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        anchor_generator=anchors,
        head=FCOSHead(backbone.out_channels, 1, num_classes, num_convs=2),
        score_thresh=0.05,
        # Positives are the points within radius x anchor size of an object's centre: 3 (not
        # FCOS's 1.5) because these anchors are under half a stride, and few positives train slowly.
        center_sampling_radius=3.0,
        nms_thresh=0.5,
        detections_per_img=100,
        topk_candidates=200,
    )


def tiny_detector_factory(**kwargs: Any) -> nn.Module:
    """The entrypoint a checkpoint of `tiny_detector` is loaded into."""
    return tiny_detector(**kwargs).eval()


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def load_images(dataset_dir: str | Path, ground_truth: Sequence[dict[str, Any]]) -> torch.Tensor:
    """[N, 3, H, W] float in 0..1: what torchvision's detectors take (they normalise inside)."""
    arrays = [np.asarray(Image.open(Path(dataset_dir) / g["file_name"]).convert("RGB")) for g in ground_truth]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


def train_detector(
    model: nn.Module,
    dataset_dir: str | Path,
    ground_truth: Sequence[dict[str, Any]],
    steps: int,
    seed: int,
    batch: int = 8,
    lr: float = 2e-3,
    threads: int = 1,
) -> nn.Module:
    """`steps` AdamW steps on the shapes in `dataset_dir` (random horizontal flips); returns the model in eval mode.

    One thread by default: a model this small gains little from two (about 45 against 55 ms a step),
    and with another process busy on a two-core machine, two threads made each step 3 to 40 times slower."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = load_images(dataset_dir, ground_truth)
    width = images.shape[-1]
    targets = [
        {"boxes": torch.from_numpy(np.asarray(g["boxes"], np.float32)), "labels": torch.from_numpy(np.asarray(g["labels"], np.int64))}
        for g in ground_truth
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # One cycle (warm-up, then annealing): the most progress for a number of steps fixed in advance.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    model.train()
    try:
        for _ in range(steps):
            idx = rng.choice(len(images), size=batch, replace=False)
            batch_images, batch_targets = [], []
            for i in idx:
                image, target = images[i], dict(targets[i])
                if rng.random() < 0.5:
                    image = image.flip(-1)
                    b = target["boxes"]
                    target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
                batch_images.append(image)
                batch_targets.append(target)
            losses = model(batch_images, batch_targets)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            sched.step()
    finally:
        # The caller's setting, not this helper's, should hold for whatever the process runs next.
        torch.set_num_threads(previous_threads)
    return model.eval()


def tiny_yolo(nc: int = 4) -> nn.Module:
    """An untrained Ultralytics YOLOv8 Detect model from Ultralytics' own yolov8.yaml at a tiny scale (depth 0.33, width
    0.125: about 350k parameters); classes 1..nc-1 (0 unused, as in the shapes' COCO labels). Needs the ultralytics extra."""
    from pathlib import Path as _Path

    import ultralytics
    import yaml
    from ultralytics.nn.tasks import DetectionModel

    cfg = yaml.safe_load((_Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8.yaml").read_text())
    cfg.update(scales={"t": [0.33, 0.125, 256]}, scale="t", nc=nc)
    from kiln.export.detection_yolo import restore_pil_open

    restore_pil_open()
    return DetectionModel(cfg, nc=nc, verbose=False)


def tiny_yolo_factory(**kwargs: Any) -> nn.Module:
    """The entrypoint a checkpoint of `tiny_yolo` is loaded into."""
    return tiny_yolo(**kwargs).eval()


def train_yolo(
    model: nn.Module, dataset_dir: str | Path, ground_truth: Sequence[dict[str, Any]], steps: int, seed: int, batch: int = 16
) -> nn.Module:
    """`steps` AdamW steps of Ultralytics' own detection loss (box, class, DFL) on the shapes; returns the model in eval mode.
    About 0.12 s a step at 128 px on two cores: 150 steps find every held-out shape."""
    from ultralytics.cfg import get_cfg

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = load_images(dataset_dir, ground_truth)
    size = images.shape[-1]
    model.args = get_cfg()  # the loss reads its gains (box, cls, dfl) from the training arguments
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        idx = rng.choice(len(images), size=batch, replace=False)
        rows = [(k, label, box) for k, i in enumerate(idx) for box, label in zip(ground_truth[i]["boxes"], ground_truth[i]["labels"])]
        boxes = torch.tensor([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]] for _, _, b in rows]) / size
        targets = {
            "img": images[idx],
            "batch_idx": torch.tensor([float(k) for k, _, _ in rows]),
            "cls": torch.tensor([[float(label)] for _, label, _ in rows]),
            "bboxes": boxes.float(),
        }
        loss, _ = model.loss(targets)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int = 16) -> list[dict[str, np.ndarray]]:
    """The eager model's detections as kiln.accuracy.tasks.detection_labels dicts."""
    model.eval()
    out = []
    for start in range(0, len(images), batch):
        for d in model(list(images[start : start + batch])):
            out.append({k: d[k].numpy() for k in ("boxes", "scores", "labels")})
    return out


def evaluate(model: nn.Module, dataset_dir: str | Path, ground_truth: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from kiln.accuracy.tasks.detection_labels import detection_map

    return detection_map(predict(model, load_images(dataset_dir, ground_truth)), list(ground_truth))


def main() -> None:
    """Train on a fresh synthetic set and print the held-out figures: `python tests/detection_data.py [steps] [size]`."""
    import sys
    import tempfile

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    with tempfile.TemporaryDirectory() as tmp:
        train_gt = make_shapes_dataset(Path(tmp) / "train", 512, seed=0, size=size)
        eval_gt = make_shapes_dataset(Path(tmp) / "eval", 32, seed=1, size=size)
        torch.manual_seed(0)
        model = tiny_detector(size=size)
        start = time.perf_counter()
        train_detector(model, Path(tmp) / "train", train_gt, steps=steps, seed=0)
        seconds = time.perf_counter() - start
        print(f"size {size}, {steps} steps, {seconds:.1f} s, {evaluate(model, Path(tmp) / 'eval', eval_gt)}")


if __name__ == "__main__":
    main()
