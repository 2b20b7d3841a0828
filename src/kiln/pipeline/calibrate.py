"""The calibrate stage's library: which targets need calibration, and the marker each writes.

Calibration is per target (calibrate@<target>), because targets quantize differently
(runtime, method, layers kept in float). A target that needs none gets a fixed marker,
so new calibration data re-builds only the targets that use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from kiln.config.views import ModelSpec, Target
from kiln.core.errors import KilnError
from kiln.core.settings import to_params
from kiln.data.calibration_set import CalibrationSet, CalibrationSettings
from kiln.runtimes import needs_calibration

MARKER = "calibration.json"


def write_marker(out_dir: Path, info: Mapping[str, Any]) -> None:
    (out_dir / MARKER).write_text(json.dumps(dict(info), indent=2) + "\n", encoding="utf-8")


def read_marker(calibration_dir: Path) -> dict[str, Any]:
    path = calibration_dir / MARKER
    if not path.is_file():
        raise KilnError(f"{calibration_dir} holds no calibration; run `dvc repro calibrate@<target>`")
    return json.loads(path.read_text(encoding="utf-8"))


def layer_sensitivity(
    runtime: object,
    onnx_path: Path,
    calibration_dir: Path,
    calib: CalibrationSet,
    samples: int = 16,
    top: int | None = 10,
    max_batch: int | None = None,
) -> list[dict[str, Any]]:
    """Top layers (all with `top` None) by quantization noise added, on a few calibration images (a diagnostic, not an
    accuracy figure). A model that takes at most `max_batch` images per call is run in chunks of that many; a layer
    whose rows depend on the data (an R-CNN's regions) and differ between the two graphs is left out."""
    import numpy as np

    from kiln.accuracy.sensitivity import rank_layers
    from kiln.runtimes import LayerInspectingRuntime

    if not isinstance(runtime, LayerInspectingRuntime):
        return []
    feeds = calib.sample_feeds(samples)
    count = len(next(iter(feeds.values())))
    step = max_batch or count
    chunks = [
        runtime.layer_activations(onnx_path, calibration_dir, {k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, count, step)
    ]
    activations = []
    for j, (layer, _, _) in enumerate(chunks[0]):
        refs, gots = [c[j][1] for c in chunks], [c[j][2] for c in chunks]
        if all(r.shape == g.shape for r, g in zip(refs, gots)):
            activations.append((layer, np.concatenate(refs), np.concatenate(gots)))
    return rank_layers(activations, top=len(activations) if top is None else top)


def calibrate_target(target: Target, onnx_path: Path, spec: ModelSpec, params: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write `out_dir` (atomically): the runtime's quantized model for int8 targets, a marker for the rest."""
    from kiln.core.atomic import atomic_path
    from kiln.runtimes import CalibratingRuntime, get_runtime, skip_reason

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
            info["sensitivity"] = layer_sensitivity(calibrator, Path(onnx_path), tmp, calib, max_batch=spec.max_batch)
        write_marker(tmp, info)
    return info
