"""Small models for kiln's tests: fast to export, and some whose export is deliberately wrong.

Entrypoints here are referenced as `tinymodels:<function>` in test configs.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """A classifier on 3x16x16 images: conv, batch-norm, ReLU, pool, linear."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DataDependentBranch(TinyCNN):
    """A branch on the input's values: tracing records only the branch the traced batch took."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if x.mean() > 0:
            return y * 2.0
        return -y


class BatchSizeArithmetic(TinyCNN):
    """Python arithmetic on the input's shape: a tracer bakes the traced batch size in as a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        n = int(x.shape[0])
        return y.reshape(n, -1) + torch.arange(n, dtype=y.dtype).reshape(n, 1)


class ZeroHead(TinyCNN):
    """A zero-initialised head: every output is 0, so a comparison against it proves nothing."""

    def __init__(self) -> None:
        super().__init__()
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)


class TwoOutputs(TinyCNN):
    """Class scores plus a feature map: only the scores get a top-1 column."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features[:6](x)
        return self.head(self.features[6:](f)), f


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return TinyCNN(num_classes)


def data_dependent_branch() -> nn.Module:
    return DataDependentBranch()


def batch_size_arithmetic() -> nn.Module:
    return BatchSizeArithmetic()


def zero_head() -> nn.Module:
    return ZeroHead()


def two_outputs() -> nn.Module:
    return TwoOutputs()


def training_mode() -> nn.Module:
    return TinyCNN().train()


def not_a_module() -> str:
    return "nope"


class ImageAndTokens(nn.Module):
    """Two inputs: an image and int64 token ids (an embedding table of 50), fused into class scores."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.image = TinyCNN(num_classes=width * 2, width=width)
        self.tokens = nn.Embedding(50, width * 2)
        self.head = nn.Linear(width * 2, num_classes)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.image(image) + self.tokens(tokens).mean(dim=1)))


def image_and_tokens() -> nn.Module:
    return ImageAndTokens()


def _small_rcnn(kind: str, num_classes: int = 5, **kwargs: object) -> nn.Module:
    """A torchvision R-CNN on a MobileNetV3-Large FPN backbone (random weights), 320 px: what the two-stage tests run."""
    from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    # Plain BatchNorm, as torchvision's builders use without pretrained weights (its default is a frozen identity).
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=6, norm_layer=nn.BatchNorm2d)
    sizes = ((32, 64, 128, 256, 512),) * 3  # three feature maps, as torchvision's fasterrcnn_mobilenet_v3_large_fpn
    kwargs.setdefault("rpn_anchor_generator", AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 3))
    common = {"min_size": 320, "max_size": 320, "box_score_thresh": 0.01, "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 150}
    common.update(kwargs)
    if kind == "mask":
        return MaskRCNN(backbone, num_classes=num_classes, **common)
    if kind == "keypoint":
        return KeypointRCNN(backbone, num_classes=2, num_keypoints=5, **common)
    return FasterRCNN(backbone, num_classes=num_classes, **common)


def small_faster_rcnn(**kwargs: object) -> nn.Module:
    return _small_rcnn("faster", **kwargs)


def small_mask_rcnn(**kwargs: object) -> nn.Module:
    return _small_rcnn("mask", **kwargs)


def small_keypoint_rcnn(**kwargs: object) -> nn.Module:
    return _small_rcnn("keypoint", **kwargs)
