"""Every check that params alone decide, run by the configure stage before anything else runs.

A value that would fail in build or benchmark must fail here instead: by then DVC has already
removed the stage's committed outputs (metrics included) to re-create them. Checks that depend on
the machine (is there a GPU, does the CPU run bf16) stay with the stages that run there.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from kiln.config.views import Target, check_target_names, default_threads
from kiln.core.errors import KilnError
from kiln.data.engine_input import engine_spec

log = logging.getLogger(__name__)


def check_params(params: Mapping[str, Any]) -> list[Target]:
    """Every settings block and target, parsed and checked; the targets, in params order."""
    from kiln.accuracy.budgets import budget_limits
    from kiln.data.calibration_set import CalibrationSettings
    from kiln.data.images import Preprocess
    from kiln.export.settings import ExportSettings, ValidateSettings, check_traced_batch
    from kiln.measure.benchmark import BenchmarkSettings
    from kiln.measure.tuning import TuningSettings
    from kiln.runtimes import CalibratingRuntime, TunableRuntime, check_precision, get_runtime, needs_calibration, runtime_options
    from kiln.serving.run import ServingSettings, check_serving

    check_target_names(params)
    check_paths(params)
    spec = engine_spec(params)
    check_model_extras(params.get("model") or {}, spec)
    export = ExportSettings.from_params(params.get("export"))
    check_traced_batch(export.batch, spec.max_batch)
    ValidateSettings.from_params(params.get("validate"), export.batch, spec.max_batch)
    benchmark = BenchmarkSettings.from_params(params.get("benchmark"))
    Preprocess.from_params((params.get("data") or {}).get("preprocess"))
    TuningSettings.from_params(params.get("tuning"))
    serving = ServingSettings.from_params(params.get("serving"))
    cores = default_threads()
    targets = []
    for name in params.get("targets") or {}:
        target = Target.from_params(name, params)
        check_precision(target)
        runtime = get_runtime(target.runtime)
        runtime_options(runtime, target)
        if target.tune and not isinstance(runtime, TunableRuntime):
            raise KilnError(f"targets.{name}.tune: runtime '{target.runtime}' declares no knobs to tune; set tune: false")
        check_serving(serving, target)
        if needs_calibration(target):
            assert isinstance(runtime, CalibratingRuntime)
            CalibrationSettings.for_target(params.get("calibration"), target, runtime.calibration_options_type)
        budget_limits(benchmark.accuracy_budget, target.accuracy_budget, f"targets.{name}.accuracy_budget (or benchmark.accuracy_budget)")
        if target.threads is not None and target.threads > cores:
            log.warning(
                "targets.%s.threads is %d, more than the %d cores this process may use: the target runs with %d "
                "(threads beyond the cores only wait for each other)",
                name,
                target.threads,
                cores,
                cores,
            )
        targets.append(target)
    return targets


def check_model_extras(model: Mapping[str, Any], spec: Any) -> None:
    """model.task and model.detection (engine_spec has parsed model.demo_weights)."""
    from kiln.accuracy.tasks import check_task_name
    from kiln.export.settings import DetectionSettings

    check_task_name(spec.task)
    DetectionSettings.from_params(model.get("detection"))


def check_paths(params: Mapping[str, Any]) -> None:
    """Every file and folder params name exists: a missing one would otherwise be skipped quietly (an eval
    folder that is not there made every accuracy figure compare random inputs)."""
    from pathlib import Path

    from kiln.core.paths import SAMPLE_CALIBRATION_DIR, SAMPLE_EVAL_DIR
    from kiln.export.model_files import entrypoint_files

    model, data = params.get("model") or {}, params.get("data") or {}
    for key in ("checkpoint", "onnx"):
        if model.get(key) and not Path(model[key]).is_file():
            raise KilnError(f"model.{key}: file '{model[key]}' not found (paths are relative to the project root, {Path.cwd()})")
    name = str(model.get("name") or "")
    if name.endswith(".pt") and not Path(name).is_file():
        raise KilnError(
            f"model.name: checkpoint '{name}' not found (paths are relative to the project root, {Path.cwd()}; kiln downloads nothing)"
        )
    entrypoint = model.get("entrypoint")
    if entrypoint and ":" in str(entrypoint) and not entrypoint_files(str(entrypoint)):
        module = str(entrypoint).partition(":")[0]
        raise KilnError(f"model.entrypoint: module '{module}' not found in the project root ({Path.cwd()}) or on PYTHONPATH")
    for key, sample in (("calibration_dir", SAMPLE_CALIBRATION_DIR), ("eval_dir", SAMPLE_EVAL_DIR)):
        if key not in data:  # params composed from conf/ always hold it (conf/data/default.yaml)
            continue
        folder = data.get(key)
        if not folder or not isinstance(folder, str):
            raise KilnError(f"data.{key} must be a folder of images, got {folder!r} ({sample} holds kiln's sample images)")
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise KilnError(f"data.{key}: '{folder}' is a file, not a folder of images")
        if not path.exists() and Path(path.as_posix()) != sample:  # the sample folders are made by the sample-data stage
            raise KilnError(f"data.{key}: folder '{folder}' not found (paths are relative to the project root, {Path.cwd()})")
