"""Ultralytics YOLO detectors (YOLOv8, YOLO11, YOLO26's one-to-many head) as one batched graph, NMS included.

The model is prepared the way Ultralytics' own exporter prepares it (ultralytics/engine/exporter.py): the Detect
head is told it is exported with a dynamic shape, so it computes its anchors from the input instead of caching
them for the first shape it saw (the cache is what froze the batch axis); C2f takes its split() forward; an
end-to-end (NMS-free) head is switched to its one-to-many branch, so that kiln's NMS applies. Layers are not fused
here: ONNX Runtime and OpenVINO fold BatchNorm themselves, and demo weights re-estimate it after this.

The head's output [B, 4 + classes, anchors] (centre-size boxes in input pixels, class probabilities) goes through
the fixed-shape Cluster-NMS that torchvision's single-stage detectors get (kiln.export.detection.padded_nms), with
each anchor's best class only, as Ultralytics' predict does (multi_label=False), so the gate, the accuracy budget
and the report judge detections, not a raw tensor. The head's box decoding (its DFL softmax and 1x1 convolution,
and everything after) is named in the ONNX file's metadata so that every int8 target keeps it in float, as
Ultralytics does for OpenVINO int8 (kiln.export.graphs.float_nodes).

Input: images [B, 3, H, W] in 0..1 (data.preprocess with mean 0 and std 1; H and W multiples of the largest
stride). Outputs: kiln.export.detection.OUTPUT_NAMES, labels numbered as the model's classes (0-based).

The ``ultralytics`` package is an optional extra (``pip install -e '.[yolo]'``), imported only for these models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.core.errors import KilnError
from kiln.export.detection import DetectionSettings, DetectorWrapper, is_ultralytics_detector, padded_nms, ultralytics_head

# Ultralytics' predict defaults (ultralytics/cfg/default.yaml: conf, iou, max_det)
SCORE_THRESH, NMS_THRESH, MAX_DETECTIONS = 0.25, 0.7, 300
# Module names, under the Detect head, whose nodes int8 keeps in float: the DFL box decoding
FLOAT_MODULES = ("dfl",)


def restore_pil_open() -> None:
    """Undo Ultralytics' process-wide patch of ``PIL.Image.open`` (ultralytics/utils/patches.py, applied on import):
    on an image PIL cannot read it tries to install pi-heif and raises ModuleNotFoundError instead of PIL's own
    UnidentifiedImageError, which kiln's data readers turn into a clear error naming the file."""
    import sys

    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    if original is not None:
        from PIL import Image

        Image.open = original


def build_ultralytics(path: str, kwargs: dict[str, Any]) -> nn.Module:
    """An Ultralytics model from a model YAML (``yolov8n.yaml``, ``yolo11s.yaml``: Ultralytics' own configs by name, random
    weights; ``nc`` in model.kwargs sets the class count) or a trained ``.pt`` checkpoint file."""
    try:
        from ultralytics.nn.tasks import DetectionModel, load_checkpoint
    except ImportError:
        raise KilnError(
            f"model.name '{path}' is an Ultralytics model, and the ultralytics package is not installed: "
            "pip install -e '.[yolo]' (or pip install ultralytics)"
        ) from None
    restore_pil_open()
    if path.endswith(".pt"):
        if not Path(path).is_file():  # Ultralytics would try to download it: kiln runs offline
            raise KilnError(f"model.name '{path}': no such checkpoint file (kiln downloads nothing; give the path of your .pt)")
        try:
            model, _ = load_checkpoint(path)
        except Exception as e:
            raise KilnError(f"Ultralytics could not load '{path}': {type(e).__name__}: {e}") from e
    else:
        try:
            model = DetectionModel(path, nc=kwargs.get("nc"), verbose=False)
        except Exception as e:
            raise KilnError(f"Ultralytics could not build '{path}' (kwargs {kwargs}): {type(e).__name__}: {e}") from e
    if not is_ultralytics_detector(model):
        raise KilnError(f"'{path}' is an Ultralytics {type(ultralytics_head(model)).__name__} model: kiln exports its Detect models only")
    return model


def prepare_for_export(model: nn.Module) -> nn.Module:
    """What Ultralytics' exporter does to a Detect model before ONNX export (fusion aside: see the module's docstring)."""
    from ultralytics.nn.modules.block import C2f

    model.eval().float()
    for p in model.parameters():
        p.requires_grad = False
    head = ultralytics_head(model)
    if getattr(head, "end2end", False):
        head.end2end = False  # the one-to-many branch and kiln's NMS: the one-to-one branch bakes a TopK of its own
    head.dynamic, head.export, head.format, head.shape = True, True, "onnx", None
    for m in model.modules():
        if isinstance(m, C2f):
            m.forward = m.forward_split
    return model


def float_module_prefixes(model: nn.Module) -> list[str]:
    """Qualified names (inside `model`) of the modules int8 keeps in float: the head's box decoding."""
    head = ultralytics_head(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(head)]}.{sub}" for sub in FLOAT_MODULES if hasattr(head, sub)]


class YoloDetections(DetectorWrapper):
    family = "yolo"
    reference = "Ultralytics' own non_max_suppression (its predict defaults: best class per box, agnostic=False)"

    def __init__(self, model: nn.Module, height: int, width: int, settings: DetectionSettings):
        super().__init__()
        restore_pil_open()  # an entrypoint's own ultralytics import patched it
        stride = int(max(float(s) for s in model.stride))
        if height % stride or width % stride:
            raise KilnError(
                f"a YOLO input must be a multiple of its largest stride ({stride}) on both sides; model.inputs is "
                f"[3, {height}, {width}]: set it (and data.preprocess's crop) to, e.g., {max(stride, round(height / stride) * stride)}"
            )
        self.model = prepare_for_export(model)
        self.height, self.width = height, width
        self.resized = self.padded = (height, width)
        self.classes = int(ultralytics_head(model).nc)
        # YOLO takes 0..1 RGB: data.preprocess with mean 0, std 1 (docs/models.md; export warns otherwise)
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.ones(1, 3, 1, 1), persistent=False)
        self.score_thresh = float(SCORE_THRESH if settings.score_thresh is None else settings.score_thresh)
        self.nms_thresh = float(NMS_THRESH if settings.nms_thresh is None else settings.nms_thresh)
        self.max_detections = int(settings.max_detections or MAX_DETECTIONS)
        self.candidates = int(settings.candidates)
        self.nms_iterations = int(settings.nms_iterations)
        self.float_modules = [f"model.{p}" for p in float_module_prefixes(model)]

    def describe(self) -> dict[str, Any]:
        head = ultralytics_head(self.model)
        return {
            "family": self.family,
            "head": type(head).__name__,
            "classes": self.classes,
            "postprocess": f"kiln: each box's best class, top-{self.candidates} scores, class-aware Cluster-NMS "
            f"({self.nms_iterations} rounds), best {self.max_detections} kept, padded with num_detections",
            "score_thresh": self.score_thresh,
            "nms_thresh": self.nms_thresh,
            "input": [self.height, self.width],
            "strides": [int(s) for s in self.model.stride],
            "kept_in_float_at_int8": self.float_modules,
            "image_mean": [0.0, 0.0, 0.0],
            "image_std": [1.0, 1.0, 1.0],
        }

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out[0] if isinstance(out, (tuple, list)) else out  # [B, 4 + classes, anchors]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = self.raw(images)
        xywh, scores = raw[:, :4].transpose(1, 2), raw[:, 4 : 4 + self.classes].transpose(1, 2)
        half = xywh[..., 2:] / 2
        # NMS on the boxes as predicted, as Ultralytics' does; clipped to the image after (its scale_boxes clips too)
        found = padded_nms(scores, torch.cat((xywh[..., :2] - half, xywh[..., :2] + half), dim=-1), self, single_label=True)
        found["boxes"] = clip_boxes(found["boxes"], self.height, self.width)
        return found

    def reference_detections(self, images: torch.Tensor) -> list[dict[str, Any]]:
        from ultralytics.utils.nms import non_max_suppression

        found = non_max_suppression(
            self.raw(images), conf_thres=self.score_thresh, iou_thres=self.nms_thresh, max_det=self.max_detections, nc=self.classes
        )
        return [{"boxes": clip_boxes(d[:, :4], self.height, self.width), "scores": d[:, 4], "labels": d[:, 5].long()} for d in found]


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[..., 4] x1, y1, x2, y2 clipped to the image."""
    x, y = boxes[..., 0::2].clamp(0, width), boxes[..., 1::2].clamp(0, height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
