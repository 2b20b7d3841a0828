"""torchvision's single-stage detectors (SSD, SSDlite, RetinaNet, FCOS) as one batched graph, NMS included (the
two-stage R-CNNs: kiln.export.detection_rcnn, at batch 1).

torchvision's own postprocessing filters each image to a data-dependent number of boxes and runs
`batched_nms`, which torch.export cannot capture (every per-image filter is an unbacked size) and which
the TorchScript exporter captures only for a batch of one. `PaddedDetections` keeps the model's
backbone, head and anchors and replaces the postprocessing with fixed-shape tensor code: the top
`candidates` class scores per image, class-aware Cluster-NMS (Zheng et al., 2021: iterated Fast-NMS,
which reaches greedy NMS's answer when it stops changing), and the best `max_detections` kept. Every
runtime then runs the whole detector, NMS included, at any batch size.

Input: images [B, 3, H, W] normalised as data.preprocess does (the detector's own mean/std, recorded
in the manifest, must match it). Outputs: boxes [B, K, 4] (x1, y1, x2, y2 in input pixels), scores [B, K], labels [B, K] (int64, -1 in
padding), num_detections [B] (int64): the first num_detections rows of each image are its detections,
best first.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from kiln.core.errors import KilnError
from kiln.export.settings import DetectionSettings

OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")


def ultralytics_head(model: nn.Module) -> nn.Module | None:
    """The last layer of an Ultralytics model (its head), if `model` looks like one."""
    layers = getattr(model, "model", None)
    return layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None


def is_ultralytics_detector(model: nn.Module) -> bool:
    """An Ultralytics model with a Detect head (not its Segment, Pose or OBB subclasses), seen without importing ultralytics
    (kiln.export.detection_yolo wraps it)."""
    if not type(model).__module__.startswith("ultralytics."):
        return False
    return type(ultralytics_head(model)).__name__ in ("Detect", "v10Detect")


def detector_family(model: nn.Module) -> str | None:
    if is_ultralytics_detector(model):
        return "yolo"
    # Only a torchvision detection class (or a subclass) can be one of these: importing torchvision to ask costs
    # 2-3 s (it loads torch._dynamo) in every stage that builds a model, detector or not.
    if not any(cls.__module__.startswith("torchvision.models.detection.") for cls in type(model).__mro__):
        return None
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    for cls, family in ((SSD, "ssd"), (RetinaNet, "retinanet"), (FCOS, "fcos")):
        if isinstance(model, cls):
            return family
    if isinstance(model, GeneralizedRCNN):
        return "rcnn"
    return None


class DetectorWrapper(nn.Module):
    """A detector wrapped for export (PaddedDetections here; the two-stage one in kiln.export.detection_rcnn; YOLO in
    kiln.export.detection_yolo): its family, input size, the transform's resize and padding, and its mean/std as buffers."""

    family: str
    # What kiln's postprocessing is compared with at export (nms_fidelity).
    reference = "the torchvision detector's own forward (its postprocess and batched_nms)"

    def take_geometry(self, model: nn.Module, height: int, width: int) -> Any:
        """Set the wrapped model (in eval mode), the input size, the size torchvision's transform resizes it to and pads
        it to, and the transform's mean/std as buffers; returns the transform's ImageList for a blank image of that size."""
        self.model = model.eval()
        self.height, self.width = height, width
        transform = model.transform
        with torch.no_grad():
            images, _ = transform([torch.zeros(3, height, width)])
        self.resized = tuple(int(s) for s in images.image_sizes[0])
        self.padded = tuple(int(s) for s in images.tensors.shape[-2:])
        self.register_buffer("mean", torch.tensor(transform.image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(transform.image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        return images

    def reference_detections(self, images: torch.Tensor) -> list[dict[str, Any]]:
        """The torchvision detector's own forward (eval mode, its own transform, postprocess and batched_nms) on
        `images` [N, 3, H, W] in 0..1, best first."""
        return [{k: found[k] for k in ("boxes", "scores", "labels")} for found in self.model(list(images))]


class PaddedDetections(DetectorWrapper):
    def __init__(self, model: nn.Module, height: int, width: int, settings: DetectionSettings):
        super().__init__()
        family = detector_family(model)
        if family not in ("ssd", "retinanet", "fcos"):  # R-CNNs: kiln.export.detection_rcnn, at batch 1; YOLO: detection_yolo
            raise KilnError(f"{type(model).__name__} is not a torchvision SSD, RetinaNet or FCOS detector")
        self.family = family
        images = self.take_geometry(model, height, width)
        with torch.no_grad():
            anchors = model.anchor_generator(images, self._features(images.tensors))[0]
        self.register_buffer("anchors", anchors.detach().clone(), persistent=False)
        self.score_thresh = float(model.score_thresh if settings.score_thresh is None else settings.score_thresh)
        self.nms_thresh = float(model.nms_thresh if settings.nms_thresh is None else settings.nms_thresh)
        self.max_detections = int(settings.max_detections or model.detections_per_img)
        self.candidates = int(settings.candidates)
        self.nms_iterations = int(settings.nms_iterations)
        self.label_offset = 1 if family == "ssd" else 0  # SSD's class 0 is the background

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "postprocess": f"kiln: top-{self.candidates} class scores, class-aware Cluster-NMS ({self.nms_iterations} rounds), "
            f"best {self.max_detections} kept, padded with num_detections",
            "score_thresh": self.score_thresh,
            "nms_thresh": self.nms_thresh,
            "input": [self.height, self.width],
            "resized_to": list(self.resized),
            "anchors": int(self.anchors.shape[0]),
            "image_mean": [round(float(v), 6) for v in self.mean.flatten()],
            "image_std": [round(float(v), 6) for v in self.std.flatten()],
        }

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.model.backbone(x)
        return [features] if isinstance(features, torch.Tensor) else list(features.values())

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """torchvision's GeneralizedRCNNTransform for a fixed input size, after normalisation: resize, pad.

        The input is already normalised, by data.preprocess (ImageNet's mean/std by default, which every
        torchvision detector uses) or by the graph with export.fold_preprocess: one place normalises,
        and a detector named on the command line gets the same input as any classifier."""
        return resize_and_pad(images, self.resized, self.padded, (self.height, self.width))

    def scores_and_boxes(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-anchor class scores [B, A, C] and decoded boxes [B, A, 4] in input pixels."""
        head = self.model.head(self._features(self._prepare(images)))
        cls, reg = head["cls_logits"], head["bbox_regression"]
        batch, count = reg.shape[0], reg.shape[1]
        anchors = self.anchors.unsqueeze(0).expand(batch, -1, -1).reshape(-1, 4)
        if self.family == "ssd":
            scores = torch.softmax(cls, dim=-1)[..., 1:]
            boxes = self.model.box_coder.decode_single(reg.reshape(-1, 4), anchors)
        elif self.family == "retinanet":
            scores = torch.sigmoid(cls)
            boxes = self.model.box_coder.decode_single(reg.reshape(-1, 4), anchors)
        else:
            scores = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(head["bbox_ctrness"]))
            boxes = self.model.box_coder.decode(reg.reshape(-1, 4), anchors)
        boxes = boxes.reshape(batch, count, 4)
        rh, rw = self.resized
        x = boxes[..., 0::2].clamp(0, rw) * (self.width / rw)
        y = boxes[..., 1::2].clamp(0, rh) * (self.height / rh)
        return scores, torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        scores, boxes = self.scores_and_boxes(images)
        return padded_nms(scores, boxes, self, self.label_offset)


def padded_nms(
    scores: torch.Tensor, boxes: torch.Tensor, wrapper: Any, label_offset: int = 0, single_label: bool = False
) -> dict[str, torch.Tensor]:
    """Per-anchor class scores [B, A, C] and boxes [B, A, 4] -> kiln's padded detections (OUTPUT_NAMES): the top
    `wrapper.candidates` scores above `wrapper.score_thresh`, class-aware Cluster-NMS, the best `wrapper.max_detections`.
    Every (anchor, class) pair is a candidate, as in torchvision's postprocessing; with `single_label` only each
    anchor's best class is (Ultralytics' predict: multi_label=False)."""
    classes = scores.shape[-1]
    if single_label:
        flat, best = scores.max(dim=-1)
        classes = 1
    else:
        flat = scores.reshape(scores.shape[0], -1)
    flat = torch.where(flat > wrapper.score_thresh, flat, torch.zeros_like(flat))
    top, index = flat.topk(min(wrapper.candidates, flat.shape[1]), dim=1)
    anchor = torch.div(index, classes, rounding_mode="floor")
    labels = (torch.gather(best, 1, index) if single_label else index % classes) + label_offset
    cand = torch.gather(boxes, 1, anchor.unsqueeze(-1).expand(-1, -1, 4))
    side = float(max(wrapper.height, wrapper.width)) + 1.0
    keep = cluster_nms(cand, labels, top, wrapper.nms_thresh, wrapper.nms_iterations, side)
    kept = top * keep
    final, order = kept.topk(min(wrapper.max_detections, kept.shape[1]), dim=1)
    valid = final > 0
    out_boxes = torch.gather(cand, 1, order.unsqueeze(-1).expand(-1, -1, 4)) * valid.unsqueeze(-1)
    out_labels = torch.where(valid, torch.gather(labels, 1, order), torch.full_like(order, -1))
    return dict(zip(OUTPUT_NAMES, (out_boxes, final, out_labels, valid.sum(dim=1))))


def resize_and_pad(x: torch.Tensor, resized: tuple[int, ...], padded: tuple[int, ...], size: tuple[int, int]) -> torch.Tensor:
    """torchvision's GeneralizedRCNNTransform after normalisation, for a fixed input `size`: resize to `resized`, pad
    bottom and right to `padded` (a multiple of the backbone's stride)."""
    if tuple(resized) != tuple(size):
        x = nn.functional.interpolate(x, size=tuple(resized), mode="bilinear", align_corners=False)
    pad_h, pad_w = padded[0] - resized[0], padded[1] - resized[1]
    if pad_h or pad_w:
        x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
    return x


def pairwise_iou(boxes: torch.Tensor) -> torch.Tensor:
    """[B, K, 4] -> [B, K, K] IoU."""
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    rb = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1e-9)


def cluster_nms(
    boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, iou_thresh: float, iterations: int, offset: float
) -> torch.Tensor:
    """Which of the score-sorted candidates survive class-aware NMS, as 0/1 floats [B, K].

    Boxes of different classes are moved apart (torchvision's batched_nms does the same), so they never
    overlap. A box is suppressed when a kept, higher-scoring box overlaps it by more than `iou_thresh`;
    iterating from "all kept" converges to greedy NMS's answer."""
    shifted = boxes + (labels.to(boxes.dtype) * offset).unsqueeze(-1)
    upper = torch.triu(pairwise_iou(shifted), diagonal=1)  # [b, j, i]: j scores higher than i
    valid = (scores > 0).to(boxes.dtype)
    keep = valid
    for _ in range(iterations):
        suppressed = (upper * keep.unsqueeze(-1)).amax(dim=1)
        keep = valid * (suppressed <= iou_thresh).to(boxes.dtype)
    return keep


# How well kiln's postprocessing must agree with the detector's own (detection F1, matched by class and
# IoU >= 0.5) for the export to go on: a fixed constant, the default of the detection gate
# (benchmark.accuracy_budget.min_detection_f1), since the export stage reads model, export and data.preprocess only.
MIN_NMS_F1 = 0.9
NMS_FIDELITY_IMAGES = 8  # crops of kiln's sample photographs the two are compared on


def sample_images(height: int, width: int, count: int, seed: int) -> torch.Tensor:
    """`count` random square crops of kiln's sample photographs resized to [3, height, width], in [0, 1]
    (the detector's own input, before normalisation): pictures with objects in them, not noise."""
    import numpy as np
    from PIL import Image

    from kiln.data.demo_weights import PHOTOGRAPHS
    from kiln.data.images import photograph, random_square_crop

    rng = np.random.default_rng(seed)
    sources = [photograph(n) for n in PHOTOGRAPHS]
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        src = np.stack([src] * 3, axis=-1) if src.ndim == 2 else src[..., :3]
        crop = Image.fromarray(np.ascontiguousarray(random_square_crop(src, rng))).resize((width, height), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def nms_fidelity(wrapper: DetectorWrapper, count: int = NMS_FIDELITY_IMAGES, seed: int = 0) -> dict[str, Any]:
    """kiln's fixed-shape postprocessing against the detector's own (`wrapper.reference_detections`: torchvision's
    forward with its postprocess and batched_nms, or Ultralytics' non_max_suppression) on sample photographs:
    detection F1 by class and IoU (kiln.accuracy.tasks.detection),
    the detector's list cut to kiln's max_detections (best first) so that only the postprocessing differs."""
    from kiln.accuracy.tasks.detection import MATCH_IOU, agreement, unpad

    images = sample_images(wrapper.height, wrapper.width, count, seed)
    was_training = wrapper.training
    wrapper.eval()
    try:
        with torch.no_grad():
            normalised = (images - wrapper.mean) / wrapper.std
            if wrapper.family == "rcnn":  # one image per call: the outputs of each, stacked
                each = [wrapper(normalised[i : i + 1]) for i in range(count)]
                padded = {k: torch.cat([e[k] for e in each]) for k in each[0]}
            else:
                padded = wrapper(normalised)
            ours = unpad({k: v.numpy() for k, v in padded.items()})
            theirs = []
            for found in wrapper.reference_detections(images):
                order = torch.argsort(found["scores"], descending=True)[: wrapper.max_detections]
                theirs.append({k: found[k][order].numpy() for k in ("boxes", "scores", "labels")})
    finally:
        wrapper.train(was_training)
    agreed = agreement(theirs, ours)
    return {
        "f1": agreed["detection_f1"],
        "mean_iou": agreed["detection_mean_iou"],
        "images": count,
        "iou": MATCH_IOU,
        "detections_own": agreed["detections_ref"],
        "detections_kiln": agreed["detections"],
        "min_f1": MIN_NMS_F1,
        "compared_with": f"{wrapper.reference}, cut to max_detections",
    }


def check_nms_fidelity(fidelity: Mapping[str, Any]) -> None:
    """One line when kiln's postprocessing finds other detections than the detector's own."""
    f1 = fidelity["f1"]
    if f1 is not None and f1 < fidelity["min_f1"]:
        raise KilnError(
            f"kiln's in-graph NMS disagrees with the detector's own postprocessing ({fidelity['compared_with']}): detection F1 {f1:.3g} < "
            f"{fidelity['min_f1']} on {fidelity['images']} sample photographs ({fidelity['detections_kiln']} detections "
            f"against {fidelity['detections_own']}, matched by class and IoU >= {fidelity['iou']}); raise "
            "model.detection.candidates or nms_iterations"
        )


def find_wrapper(model: nn.Module) -> DetectorWrapper | None:
    """The detector wrapper inside `model` (itself, or under FoldedPreprocess), if any."""
    for m in (model, getattr(model, "model", None)):
        if isinstance(m, DetectorWrapper):
            return m
    return None
