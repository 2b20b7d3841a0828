"""The calibrate stage's library: which targets need calibration, the calibration set, and its settings.

Calibration is per target (calibrate@<target>), because targets quantize differently
(runtime, method, layers kept in float). A target that needs none gets a fixed marker,
so new calibration data re-builds only the targets that use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np

from .config import ModelSpec, Target
from .errors import KilnError
from .images import ImageSet, Preprocess, preprocess_for
from .runtimes import needs_calibration
from .settings import to_params

MARKER = "calibration.json"


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
        from .settings import parse

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
    inputs come from data.samples or are seeded within their declared range (kiln.inputs.other_inputs)."""

    images: ImageSet
    preprocess: Preprocess
    input_name: str
    batch: int
    eval_images: ImageSet | None = None  # held-out data, for quantizers that check accuracy themselves
    extras: Mapping[str, np.ndarray] | None = None  # the other inputs, one row per image

    @classmethod
    def from_params(cls, data: Mapping[str, Any], spec: ModelSpec, settings: CalibrationSettings) -> "CalibrationSet":
        from .inputs import other_inputs

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


def write_marker(out_dir: Path, info: Mapping[str, Any]) -> None:
    (out_dir / MARKER).write_text(json.dumps(dict(info), indent=2) + "\n", encoding="utf-8")


def read_marker(calibration_dir: Path) -> dict[str, Any]:
    path = calibration_dir / MARKER
    if not path.is_file():
        raise KilnError(f"{calibration_dir} holds no calibration; run `dvc repro calibrate@<target>`")
    return json.loads(path.read_text(encoding="utf-8"))


def layer_sensitivity(
    runtime: object, onnx_path: Path, calibration_dir: Path, calib: CalibrationSet, samples: int = 16, top: int | None = 10
) -> list[dict[str, Any]]:
    """Top layers (all with `top` None) by quantization noise added, on a few calibration images (a diagnostic, not an
    accuracy figure)."""
    from .runtimes import LayerInspectingRuntime
    from .sensitivity import rank_layers

    if not isinstance(runtime, LayerInspectingRuntime):
        return []
    activations = runtime.layer_activations(onnx_path, calibration_dir, calib.sample_feeds(samples))
    return rank_layers(activations, top=len(activations) if top is None else top)


def calibrate_target(target: Target, onnx_path: Path, spec: ModelSpec, params: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write `out_dir` (atomically): the runtime's quantized model for int8 targets, a marker for the rest."""
    from .atomic import atomic_path
    from .runtimes import CalibratingRuntime, get_runtime, skip_reason

    info: dict[str, Any] = {
        "target": target.name,
        "runtime": target.runtime,
        "precision": target.precision,
        "needed": needs_calibration(target),
    }
    # Fail (or skip an optional target) before reading a single image when it cannot be built here anyway.
    if info["needed"] and (skipped := skip_reason(target)):
        info.update(needed=False, skipped=skipped)
    if info["needed"]:
        runtime = get_runtime(target.runtime)
        if not isinstance(runtime, CalibratingRuntime):
            raise KilnError(f"runtime '{target.runtime}' lists {target.precision} as calibrated but has no calibrate(): a kiln bug")
        calibrator: CalibratingRuntime = runtime
        settings = CalibrationSettings.for_target(params.get("calibration"), target, runtime.calibration_options_type)
        calib = CalibrationSet.from_params(params.get("data") or {}, spec, settings)
    with atomic_path(out_dir, is_dir=True) as tmp:
        if info["needed"]:
            info.update(
                images=len(calib),
                folder=str(calib.images.root),
                ignored_scope=list(settings.ignored_scope),
                options=to_params(settings.options),
            )
            info.update(calibrator.calibrate(target, Path(onnx_path), calib, settings, tmp))
            info["sensitivity"] = layer_sensitivity(calibrator, Path(onnx_path), tmp, calib)
        write_marker(tmp, info)
    return info
