"""torchvision's two-stage detectors (Faster, Mask and Keypoint R-CNN) as a graph of one image, outputs padded.

An R-CNN proposes regions per image and pools each one (RoIAlign) before classifying it: the number of regions
is data-dependent at every step, and torchvision's own export with a dynamic batch breaks at other batch sizes
(torchvision #8937, #2311; detectron2 exports at batch 1 too). So kiln exports it at batch 1 (the model's
max_batch, kiln.config.batch_limit) with the TorchScript exporter, which captures the RoI stage as ONNX loops and
TopK, and keeps torchvision's own postprocessing, NMS included: the detections are the model's own, padded to
a fixed count so that every runtime and kiln's detection task read them as they read a single-stage detector's.

Input: images [1, 3, H, W] normalised as data.preprocess does. Outputs: boxes [1, K, 4] (x1, y1, x2, y2 in input
pixels), scores [1, K], labels [1, K] (int64, -1 in padding), num_detections [1] (int64), and for Mask R-CNN
masks [1, K, M, M] (each detection's mask probabilities in its box's frame, M = 28: paste them into the image on
the host, as torchvision's paste_masks_in_image does), for Keypoint R-CNN keypoints [1, K, P, 3] (x, y,
visibility per keypoint).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from kiln.core.errors import KilnError
from kiln.export.detection import DetectionSettings, DetectorWrapper, resize_and_pad


def batched_nms_without_branch(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's batched_nms (its coordinate trick: each class's boxes moved apart) with no branch on an empty
    input: torchvision's is scripted while tracing, so the graph gets an ONNX If, which NNCF cannot quantize
    through (OpenVINO int8). The max over no boxes is 0 here (a zero is appended), so an empty input needs no branch."""
    from torchvision.ops import nms

    max_coordinate = torch.cat((boxes.reshape(-1), boxes.new_zeros(1))).max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


@contextlib.contextmanager
def branchless_nms() -> Iterator[None]:
    """The RPN and the RoI heads call torchvision.ops.boxes.batched_nms through the module: swap it for the call."""
    from torchvision.ops import boxes as box_ops

    original = box_ops.batched_nms
    box_ops.batched_nms = batched_nms_without_branch
    try:
        yield
    finally:
        box_ops.batched_nms = original


class TwoStageDetections(DetectorWrapper):
    family = "rcnn"
    exporter = "torchscript"  # torch.export cannot capture the data-dependent RoI stage; TorchScript's tracer can
    exporter_why = "a two-stage detector: torch.export cannot capture its data-dependent region stage, the TorchScript exporter can"

    def __init__(self, model: nn.Module, height: int, width: int, settings: DetectionSettings):
        super().__init__()
        self.take_geometry(model, height, width)
        heads = model.roi_heads
        self.max_detections = int(settings.max_detections or heads.detections_per_img)
        heads.detections_per_img = self.max_detections  # the model's own cut: never more rows than the padding holds
        if settings.score_thresh is not None:
            heads.score_thresh = settings.score_thresh
        if settings.nms_thresh is not None:
            heads.nms_thresh = settings.nms_thresh
        self.score_thresh, self.nms_thresh = float(heads.score_thresh), float(heads.nms_thresh)
        self.masks, self.keypoints = bool(heads.has_mask()), bool(heads.has_keypoint())

    @property
    def output_names(self) -> tuple[str, ...]:
        return (
            ("boxes", "scores", "labels", "num_detections")
            + (("masks",) if self.masks else ())
            + (("keypoints",) if self.keypoints else ())
        )

    def describe(self) -> dict[str, Any]:
        kind = "Mask R-CNN" if self.masks else "Keypoint R-CNN" if self.keypoints else "Faster R-CNN"
        return {
            "family": self.family,
            "kind": kind,
            "postprocess": f"torchvision's own (RPN, RoI heads, batched NMS), best {self.max_detections} kept, padded with num_detections",
            "batch": 1,
            "score_thresh": self.score_thresh,
            "nms_thresh": self.nms_thresh,
            "input": [self.height, self.width],
            "resized_to": list(self.resized),
            "image_mean": [round(float(v), 6) for v in self.mean.flatten()],
            "image_std": [round(float(v), 6) for v in self.std.flatten()],
        }

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from torchvision.models.detection.image_list import ImageList

        if images.shape[0] != 1:  # a Python int while tracing too: no branch in the graph
            raise KilnError(f"a two-stage detector takes one image per call (model.max_batch 1), got a batch of {images.shape[0]}")
        x = resize_and_pad(images, self.resized, self.padded, (self.height, self.width))
        image_list = ImageList(x, [self.resized])
        features = self.model.backbone(x)
        with branchless_nms():
            proposals, _ = self.model.rpn(image_list, features)
            detections, _ = self.model.roi_heads(features, proposals, image_list.image_sizes)
        # Mask R-CNN's masks stay in their boxes' frame (the mask head's [N, 1, M, M] probabilities): pasting them into
        # the image is a per-detection ONNX Loop that OpenVINO cannot convert, and a server pastes on the host anyway.
        box_masks = detections[0].pop("masks", None)
        found = self.model.transform.postprocess(detections, image_list.image_sizes, [(self.height, self.width)])[0]
        missing = self.max_detections - found["boxes"].shape[0]
        scores = nn.functional.pad(found["scores"], (0, missing)).unsqueeze(0)
        out = {
            "boxes": nn.functional.pad(found["boxes"], (0, 0, 0, missing)).unsqueeze(0),
            "scores": scores,
            "labels": nn.functional.pad(found["labels"], (0, missing), value=-1).unsqueeze(0),
            "num_detections": (scores > 0).sum(dim=1),
        }
        if self.masks and box_masks is not None:  # [N, 1, M, M] probabilities in each box's frame -> [1, K, M, M]
            out["masks"] = nn.functional.pad(box_masks[:, 0], (0, 0, 0, 0, 0, missing)).unsqueeze(0)
        if self.keypoints:  # [N, P, 3] -> [1, K, P, 3]
            out["keypoints"] = nn.functional.pad(found["keypoints"], (0, 0, 0, 0, 0, missing)).unsqueeze(0)
        return out
