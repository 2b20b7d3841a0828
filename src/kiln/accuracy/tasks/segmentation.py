"""Per-pixel class scores [batch, classes, H, W] (torchvision's `out`/`aux`): argmax agreement and mIoU."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from kiln.accuracy.tasks import Task
from kiln.core.errors import KilnError


def mean_iou(ref_map: np.ndarray, got_map: np.ndarray, classes: int, ignore: int | None = None) -> float | None:
    """Mean over classes present in either map of |ref & got| / |ref | got|."""
    valid = np.ones(ref_map.shape, dtype=bool) if ignore is None else ref_map != ignore
    ious = []
    for c in range(classes):
        r, g = (ref_map == c) & valid, (got_map == c) & valid
        union = np.count_nonzero(r | g)
        if union:
            ious.append(np.count_nonzero(r & g) / union)
    return float(np.mean(ious)) if ious else None


def _resize_crop_nearest(im: Any, preprocess: Any) -> np.ndarray:
    from PIL import Image

    rw, rh, left, top = preprocess.geometry(*im.size)
    im = im.resize((rw, rh), Image.NEAREST)
    return np.asarray(im.crop((left, top, left + preprocess.crop, top + preprocess.crop))).astype(np.int64)


class Segmentation(Task):
    name = "segmentation"
    budget_keys = {
        "min_pixel_agreement": ("pixel_agreement", min),
        "min_miou_agreement": ("miou_agreement", min),
        "max_miou_drop": ("miou_drop", max),
    }
    agreement_metric = "pixel_agreement"
    headline = ("pixel_agreement", "miou_agreement", "miou")

    def check(self) -> None:
        if self.primary() is None:
            shapes = ", ".join(f"'{o.name}' {list(o.shape)}" for o in self.outputs)
            raise KilnError(f"model.task segmentation needs a [batch, classes, H, W] output; the model returns {shapes}")

    def primary(self) -> str | None:
        maps = [o for o in self.outputs if len(o.shape) == 4 and o.shape[1] > 1]
        # torchvision's segmentation models return {"out": ..., "aux": ...}: `out` is the answer, `aux` a training aid.
        return next((o.name for o in maps if o.name == "out"), maps[0].name if maps else None)

    def compare(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, Any]:
        result = super().compare(ref, got)
        name = self.primary()
        assert name is not None
        r, g = np.argmax(ref[name], axis=1), np.argmax(got[name], axis=1)
        result["pixel_agreement"] = float(np.mean(r == g))
        result["miou_agreement"] = mean_iou(r, g, ref[name].shape[1])
        result["segmentation_output"] = name
        return result

    def read_labels(self, images: Any, preprocess: Any) -> np.ndarray | None:
        """Class-index masks: `masks/<image stem>.png` in the eval folder (255 = ignore, as in VOC), resized and
        centre-cropped like the images (nearest neighbour). All or nothing: a missing mask is an error."""
        from PIL import Image

        folder = images.root / "masks"
        if not folder.is_dir():
            return None
        masks = []
        for path in images.paths:
            mask_path = folder / f"{path.stem}.png"
            if not mask_path.is_file():
                raise KilnError(f"eval folder {images.root} has masks/ but no {mask_path.name} for {path.name}: add it or remove masks/")
            with Image.open(mask_path) as im:
                if im.mode not in ("L", "P", "I;16", "I"):
                    raise KilnError(f"mask {mask_path} is {im.mode}: a mask holds one class index per pixel (mode L or P)")
                masks.append(_resize_crop_nearest(im, preprocess))
        return np.stack(masks)

    def against_labels(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], labels: Any) -> dict[str, Any]:
        if labels is None or np.asarray(labels).ndim != 3:
            return {}
        name = self.primary()
        assert name is not None
        classes = ref[name].shape[1]
        ref_miou = mean_iou(np.asarray(labels), np.argmax(ref[name], axis=1), classes, ignore=255)
        miou = mean_iou(np.asarray(labels), np.argmax(got[name], axis=1), classes, ignore=255)
        if ref_miou is None or miou is None:
            return {}
        return {"miou": miou, "miou_fp32": ref_miou, "miou_drop": 100.0 * (ref_miou - miou)}

    def degenerate(self, ref: Mapping[str, np.ndarray]) -> str | None:
        name = self.primary()
        assert name is not None
        reason = super().degenerate({name: ref[name]})
        if reason:
            return reason
        classes = np.unique(np.argmax(ref[name], axis=1))
        if classes.size == 1:
            return f"output '{name}': the reference labels every pixel of every input class {int(classes[0])}"
        return None
