"""The pipeline's steps in one process, for notebooks, tests and benchmarks/model_zoo.py.

export -> validate (the gate) -> reference -> per target: calibrate, build, accuracy against the
reference, a short latency run. The DVC stages call the same library functions one at a time; this
module only strings them together without DVC, so a model can be tried in seconds and a test can run
a model family through every CPU target.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kiln.config.views import Target
from kiln.data.engine_input import engine_spec

log = logging.getLogger(__name__)


def prepare(params: Mapping[str, Any], workdir: str | Path) -> dict[str, Any]:
    """Export and validate the model of `params` (a composed params.yaml); returns what the targets need."""
    from kiln.config.batch_limit import clamp_batches
    from kiln.export.models import build_model
    from kiln.export.onnx import ExportSettings, export_onnx
    from kiln.export.validate import ValidateSettings, reference_set, validate_export

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    params, notes = clamp_batches(params)  # as configure does for the stages
    for note in notes:
        log.info("%s", note)
    spec = engine_spec(params)
    export = ExportSettings.from_params(params.get("export"))
    settings = ValidateSettings.from_params(params.get("validate"), export.batch, spec.max_batch)
    model = build_model(spec)
    onnx_path = workdir / "model.onnx"
    start = time.perf_counter()
    manifest = export_onnx(model, spec, export, onnx_path)
    export_s = time.perf_counter() - start
    report = validate_export(model, onnx_path, spec, settings, export.batch)
    reference = reference_set(model, spec, report["output_names"], dict(params.get("data") or {}), settings)
    return {
        "params": params,
        "spec": spec,
        "onnx": onnx_path,
        "export": manifest,
        "export_seconds": export_s,
        "validate": report,
        "reference": reference,
        "workdir": workdir,
    }


def run_target(prepared: Mapping[str, Any], name: str, batch: int | None = None, iterations: int = 10) -> dict[str, Any]:
    """Calibrate (if the precision needs it), build, judge and time one target of the prepared model."""
    from kiln.accuracy.budgets import accuracy_against_reference
    from kiln.data.inputs import make_inputs
    from kiln.measure.benchmark import BenchmarkSettings, time_infer
    from kiln.pipeline.calibrate import calibrate_target
    from kiln.pipeline.engine import build_engine, load_engine
    from kiln.runtimes import BuildSource, needs_calibration, skip_reason

    params, spec, workdir = prepared["params"], prepared["spec"], prepared["workdir"]
    target = Target.from_params(name, params)
    if reason := skip_reason(target):
        return {"target": name, "skipped": reason}
    calibration_dir = None
    if needs_calibration(target):
        calibration_dir = workdir / f"calibration-{name}"
        calibrate_target(target, prepared["onnx"], spec, params, calibration_dir)
    start = time.perf_counter()
    manifest = build_engine(target, BuildSource(prepared["onnx"], spec, calibration_dir), workdir / f"engine-{name}")
    build_s = time.perf_counter() - start
    session, _ = load_engine(workdir / f"engine-{name}", target)
    accuracy = accuracy_against_reference(session, prepared["reference"], chunk=target.profile.opt)
    batch = batch or target.main_batch
    # The benchmark's own timer (device events where the session has them), one warm-up, exactly `iterations`.
    quick = BenchmarkSettings(warmup_iters=1, min_iters=iterations, max_iters=iterations, min_time_s=0.0)
    p50 = float(np.median(time_infer(session, make_inputs(spec.inputs, batch, quick.seed), quick)))
    return {
        "target": name,
        "precision": manifest["precision"],
        "build_seconds": build_s,
        "accuracy": accuracy,
        "batch": batch,
        "ms_per_batch": p50,
        "ms_per_image": p50 / batch,
    }


def run_targets(prepared: Mapping[str, Any], names: Sequence[str], **kwargs: Any) -> dict[str, dict[str, Any]]:
    results = {}
    for name in names:
        log.info("target %s", name)
        results[name] = run_target(prepared, name, **kwargs)
    return results
