"""The calibration set a quantizer reads, and the settings it is read with.

The images (data.calibration_dir) preprocessed as the model takes them, with the model's other inputs; the
settings are `calibration` merged with a target's own. The runtimes' quantizers take both (kiln.runtimes'
CalibratingRuntime); the calibrate stage's driver is kiln.pipeline.calibrate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np

from kiln.config.views import ModelSpec, Target
from kiln.core.errors import KilnError
from kiln.data.images import ImageSet, Preprocess, preprocess_for


@dataclass(frozen=True)
class CalibrationSettings:
    """`calibration` (shared by every calibrated target) merged with `targets.<name>.calibration`. `options`
    are the runtime's own (its `calibration_options_type`: NNCF's preset and accuracy control for OpenVINO,
    reduce_range for ONNX Runtime), parsed per target."""

    subset_size: int = 300
    batch: int = 8
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    ignored_scope: tuple[str, ...] = ()
    options: Any = None

    @classmethod
    def for_target(cls, raw: Mapping[str, Any] | None, target: Target, options_type: type) -> "CalibrationSettings":
        from kiln.core.settings import parse

        merged = {**dict(raw or {}), **target.calibration}
        if "preset" in merged:
            raise KilnError(
                f"calibration.preset is an OpenVINO (NNCF) option now: set targets.{target.name}.calibration.options.preset "
                "(performance or mixed) on the OpenVINO targets that need it"
            )
        options = {**dict((raw or {}).get("options") or {}), **dict(target.calibration.get("options") or {})}
        merged.pop("options", None)
        # The shared block first, so that an error names the block that holds the bad value.
        parse(cls, {k: v for k, v in dict(raw or {}).items() if k != "options"}, "calibration")
        s = parse(cls, merged, f"targets.{target.name}.calibration")
        if s.subset_size < 1 or s.batch < 1:
            raise KilnError(f"calibration.subset_size and batch must be positive integers, got {s.subset_size} and {s.batch}")
        return replace(s, options=parse(options_type, options, f"targets.{target.name}.calibration.options (with calibration.options)"))


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed calibration images, fed to a runtime's quantizer as {input name: batch}; a model's other
    inputs come from data.samples or are seeded within their declared range (kiln.data.inputs.other_inputs)."""

    images: ImageSet
    preprocess: Preprocess
    input_name: str
    batch: int
    eval_images: ImageSet | None = None  # held-out data, for quantizers that check accuracy themselves
    extras: Mapping[str, np.ndarray] | None = None  # the other inputs, one row per image

    @classmethod
    def from_params(cls, data: Mapping[str, Any], spec: ModelSpec, settings: CalibrationSettings) -> "CalibrationSet":
        from kiln.data.inputs import other_inputs

        preprocess = preprocess_for(spec, data)
        image = check_image_input(spec, preprocess)
        images = ImageSet.scan(data.get("calibration_dir", "data/calibration"), "calibration folder")
        images.warn_small(preprocess, "calibration folder")
        eval_dir = data.get("eval_dir")
        eval_images = ImageSet.scan(eval_dir, "eval folder") if eval_dir and Path(eval_dir).is_dir() else None
        subset = images.subset(settings.subset_size)
        extras = other_inputs([i for i in spec.inputs if i.name != image.name], len(subset), 97, data)
        return cls(subset, preprocess, image.name, settings.batch, eval_images, extras)

    def __len__(self) -> int:
        return len(self.images)

    def _with_extras(self, arr: np.ndarray, start: int) -> dict[str, np.ndarray]:
        feeds = {self.input_name: arr}
        for name, values in (self.extras or {}).items():
            feeds[name] = values[start : start + len(arr)]
        return feeds

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        start = 0
        for arr in self.images.batches(self.preprocess, self.batch):
            yield self._with_extras(arr, start)
            start += len(arr)

    def labelled_eval(self) -> list[tuple[dict[str, np.ndarray], int]]:
        """(input, class index) pairs from the eval folder; an error when it is missing or unlabelled."""
        targets = self.eval_images.target_indices() if self.eval_images else None
        if targets is None:
            raise KilnError(
                "accuracy-aware quantization needs labelled held-out images: put data/eval in ImageFolder layout "
                "(<class>/<image>, class folders named by index) or drop calibration.options.accuracy_aware"
            )
        assert self.eval_images is not None
        extras = {k: v[:1] for k, v in (self.extras or {}).items()}
        return [({self.input_name: self.preprocess(p)[None], **extras}, int(t)) for p, t in zip(self.eval_images.paths, targets)]

    def samples(self) -> Iterator[dict[str, np.ndarray]]:
        """One image at a time (NNCF gathers its statistics per sample)."""
        for i, arr in enumerate(self.images.batches(self.preprocess, 1)):
            yield self._with_extras(arr, i)

    def sample_feeds(self, count: int) -> dict[str, np.ndarray]:
        """The first `count` samples as one batch."""
        return self._with_extras(self.images.subset(min(count, len(self))).load(self.preprocess), 0)


def image_input(spec: ModelSpec, preprocess: Preprocess) -> Any:
    """The input that takes the images data.preprocess makes, or None."""
    matches = [i for i in spec.inputs if tuple(i.shape) == preprocess.sample_shape() and i.dtype == preprocess.dtype]
    return matches[0] if len(matches) == 1 else None


def check_image_input(spec: ModelSpec, preprocess: Preprocess) -> Any:
    """The model's image input; an error saying how to make data.preprocess fit when there is none."""
    found = image_input(spec, preprocess)
    if found is not None:
        return found
    inputs = ", ".join(f"'{i.name}' {i.dtype} {list(i.shape)}" for i in spec.inputs)
    raise KilnError(
        f"data.preprocess makes {preprocess.dtype} images of shape {list(preprocess.sample_shape())}, but no single model input takes "
        f"them (model.inputs: {inputs}): make data.preprocess (crop, layout, dtype) match the image input"
    )
