"""validate: the gate. Eager PyTorch against the exported graph; also writes the fp32 reference outputs benchmarks compare with."""

import logging

import numpy as np

from kiln import paths
from kiln.atomic import atomic_path, write_json
from kiln.config import ModelSpec, load_params
from kiln.export import ExportSettings
from kiln.models import build_model
from kiln.stage import run_stage
from kiln.validate import ValidateSettings, reference_outputs, validate_export


def main() -> None:
    params = load_params()
    spec = ModelSpec.from_params(params.get("model") or {})
    traced = ExportSettings.from_params(params.get("export")).batch
    settings = ValidateSettings.from_params(params.get("validate"), traced)
    model = build_model(spec)
    report = validate_export(model, paths.ONNX, spec, settings, traced)
    reference = reference_outputs(model, spec, list(report["outputs"]), settings.reference_samples, settings.reference_seed)
    with atomic_path(paths.REFERENCE) as tmp, open(tmp, "wb") as f:
        np.savez(f, __seed__=np.array(settings.reference_seed), **reference)
    report["reference"] = {"samples": settings.reference_samples, "seed": settings.reference_seed}
    write_json(paths.VALIDATE, report)
    logging.getLogger("kiln.validate").info("passed: %s", ", ".join(
        f"{n} max abs {o['max_abs_err']:.3g}" for n, o in report["outputs"].items()))


if __name__ == "__main__":
    run_stage(main)
