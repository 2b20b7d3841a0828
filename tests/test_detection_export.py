"""kiln's in-graph detection postprocessing against torchvision's own: Cluster-NMS against torchvision.ops.batched_nms,
and SSD and RetinaNet (tiny, untrained, built here) through PaddedDetections against the detector's own forward
(its postprocess_detections, batched_nms included); a two-stage detector refused without model.max_batch: 1."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import batched_nms

from kiln.core.errors import KilnError
from kiln.export.detection import DetectionSettings, PaddedDetections, cluster_nms

SIZE = 64
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def random_candidates(seed: int, count: int = 120, classes: int = 3, size: float = 100.0):
    """Overlapping boxes in a few clusters (where NMS has work to do), scores best first, as kiln's top-k leaves them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, 2, generator=g) * size
    which = torch.randint(0, 6, (count,), generator=g)
    xy = centres[which] + torch.randn(count, 2, generator=g) * 6
    wh = 10 + torch.rand(count, 2, generator=g) * 20
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
    scores = torch.rand(count, generator=g).sort(descending=True).values + 0.01
    labels = torch.randint(0, classes, (count,), generator=g)
    return boxes, scores, labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_cluster_nms_keeps_what_torchvision_batched_nms_keeps(seed, iou):
    boxes, scores, labels = random_candidates(seed)
    # Cluster-NMS reaches greedy NMS's answer once a round changes nothing: as many rounds as boxes always suffice.
    keep = cluster_nms(boxes[None], labels[None], scores[None], iou, len(scores), 1000.0)[0]
    ours = set(torch.nonzero(keep).flatten().tolist())
    theirs = set(batched_nms(boxes, scores, labels, iou).tolist())
    assert 0 < len(theirs) < len(scores)  # something was suppressed, something kept
    assert ours == theirs


def test_cluster_nms_never_suppresses_across_classes_and_skips_empty_slots():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = box.repeat(4, 1)[None]  # four copies of one box
    labels = torch.tensor([[1, 2, 1, 2]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.0]])  # the last slot is padding (score 0)
    keep = cluster_nms(boxes, labels, scores, 0.5, 12, 100.0)[0].tolist()
    assert keep == [1.0, 1.0, 0.0, 0.0]  # one per class; the padded slot is never kept


class TinyBackbone(nn.Module):
    """Two feature maps, strides 8 and 16, `width` channels each."""

    def __init__(self, width: int = 16):
        super().__init__()

        def down(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())

        self.stem = nn.Sequential(down(3, 8), down(8, 16), down(16, width))
        self.p4 = down(width, width)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        c3 = self.stem(x)
        return OrderedDict([("0", c3), ("1", self.p4(c3))])


def tiny_ssd(num_classes: int = 4) -> nn.Module:
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD, SSDHead

    torch.manual_seed(0)
    backbone = TinyBackbone()
    anchors = DefaultBoxGenerator([[2], [2]], min_ratio=0.3, max_ratio=0.8)
    head = SSDHead([backbone.out_channels] * 2, anchors.num_anchors_per_location(), num_classes)
    return SSD(
        backbone, anchors, (SIZE, SIZE), num_classes, image_mean=MEAN, image_std=STD, head=head,
        score_thresh=0.28, nms_thresh=0.45, detections_per_img=1000, topk_candidates=1000,
    )  # fmt: skip


def tiny_retinanet(num_classes: int = 3) -> nn.Module:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

    torch.manual_seed(0)
    backbone = TinyBackbone()
    anchors = AnchorGenerator(sizes=((16,), (32,)), aspect_ratios=((0.5, 1.0, 2.0),) * 2)
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes)
    with torch.no_grad():  # an untrained head scores everything near its 0.01 prior: spread the scores out
        for layer in head.classification_head.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight)
        head.classification_head.cls_logits.bias.fill_(-2.0)
    return RetinaNet(
        backbone, num_classes, min_size=SIZE, max_size=SIZE, image_mean=MEAN, image_std=STD, anchor_generator=anchors,
        head=head, score_thresh=0.125, nms_thresh=0.5, detections_per_img=1000, topk_candidates=1000,
    )  # fmt: skip


def tiny_faster_rcnn() -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    backbone.out_channels = 8
    anchors = AnchorGenerator(sizes=((16,),), aspect_ratios=((1.0,),))
    return FasterRCNN(backbone, num_classes=3, min_size=SIZE, max_size=SIZE, rpn_anchor_generator=anchors)


def images(batch: int = 2) -> torch.Tensor:
    """Pictures with structure (blocks of colour), not noise, in [0, 1]."""
    g = torch.Generator().manual_seed(3)
    return nn.functional.interpolate(torch.rand(batch, 3, 8, 8, generator=g), size=(SIZE, SIZE), mode="nearest")


@pytest.mark.parametrize(("build", "family"), [(tiny_ssd, "ssd"), (tiny_retinanet, "retinanet")])
def test_padded_detections_find_what_the_torchvision_detector_finds(build, family):
    model = build().eval()
    # Every candidate enters NMS, and NMS runs to convergence: then kiln's fixed-shape postprocessing must return
    # torchvision's detections exactly (its per-class / per-level top-k keep every candidate here too).
    padded = PaddedDetections(model, SIZE, SIZE, DetectionSettings(candidates=100_000, max_detections=1000, nms_iterations=1000)).eval()
    assert padded.family == family
    x = images()
    normalised = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs = model(list(x))  # torchvision's own transform (normalise) and postprocess (batched_nms)
        ours = padded(normalised)
    for i, want in enumerate(theirs):
        n = int(ours["num_detections"][i])
        assert 3 <= len(want["scores"]) and n == len(want["scores"]), (i, n, len(want["scores"]))
        order = torch.argsort(want["scores"], descending=True)
        np.testing.assert_allclose(ours["scores"][i, :n].numpy(), want["scores"][order].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours["boxes"][i, :n].numpy(), want["boxes"][order].numpy(), rtol=1e-4, atol=1e-3)
        assert ours["labels"][i, :n].tolist() == want["labels"][order].tolist()
        assert (ours["labels"][i, n:] == -1).all() and (ours["scores"][i, n:] == 0).all()


def test_a_two_stage_detector_without_its_batch_limit_is_refused_with_the_fix():
    from conftest import tiny_model_params

    from kiln.config.views import ModelSpec
    from kiln.export.models import build_model

    spec = ModelSpec.from_params(
        tiny_model_params("test_detection_export:tiny_faster_rcnn", inputs={"images": {"shape": [3, SIZE, SIZE], "dtype": "float32"}})
    )
    with pytest.raises(KilnError, match=r"FasterRCNN is a two-stage detector: kiln exports it at batch 1.*set model.max_batch: 1"):
        build_model(spec)


def export_tiny_detector(tmp_path, build: str = "tiny_ssd") -> dict:
    from conftest import tiny_model_params

    from kiln.config.views import ModelSpec
    from kiln.export.models import build_model
    from kiln.export.onnx import ExportSettings, export_onnx

    spec = ModelSpec.from_params(
        tiny_model_params(f"test_detection_export:{build}", inputs={"images": {"shape": [3, SIZE, SIZE], "dtype": "float32"}})
    )
    return export_onnx(build_model(spec), spec, ExportSettings(), tmp_path / "model.onnx")


def test_export_records_how_well_kiln_nms_agrees_with_the_detector_own_postprocessing(tmp_path):
    fidelity = export_tiny_detector(tmp_path)["export_path"]["nms_fidelity"]
    assert fidelity["images"] == 8 and fidelity["iou"] == 0.5 and fidelity["min_f1"] == 0.9
    assert fidelity["detections_own"] > 8  # the sample photographs give the tiny SSD something to find
    assert fidelity["f1"] == 1.0 and fidelity["detections_kiln"] == fidelity["detections_own"]


def test_a_wrapper_whose_nms_keeps_everything_fails_export_in_one_line(tmp_path, monkeypatch):
    import kiln.export.detection as detection

    def keep_everything(boxes, labels, scores, iou_thresh, iterations, offset):
        return (scores > 0).to(boxes.dtype)

    monkeypatch.setattr(detection, "cluster_nms", keep_everything)
    disagrees = (
        r"in-graph NMS disagrees with the detector's own postprocessing \(the torchvision detector's own forward.*\): "
        r"detection F1 0\.\d+ < 0\.9"
    )
    with pytest.raises(KilnError, match=disagrees) as err:
        export_tiny_detector(tmp_path, "tiny_retinanet")
    assert "\n" not in str(err.value) and not (tmp_path / "model.onnx").exists()
