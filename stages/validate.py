"""validate: the gate. Eager PyTorch against the exported graph (a model given only as ONNX: the graph against its
own samples one at a time); also writes the fp32 reference outputs benchmarks compare with."""

import logging

from kiln.config.slices import load_stage_params
from kiln.core import paths
from kiln.core.atomic import write_json
from kiln.data.engine_input import engine_spec
from kiln.data.reference import save_reference
from kiln.export.models import build_model
from kiln.export.onnx import ExportSettings
from kiln.export.validate import OnnxReference, ValidateSettings, reference_set, validate_export, validate_onnx
from kiln.pipeline.stage import run_stage


def main() -> None:
    params = load_stage_params("validate")
    spec = engine_spec(params)
    if spec.onnx_only:  # no PyTorch model: the graph is checked against itself and is its own reference
        settings = ValidateSettings.from_params(params.get("validate"), 0)
        model = OnnxReference(paths.ONNX)
        report = validate_onnx(paths.ONNX, spec, settings)
    else:
        traced = ExportSettings.from_params(params.get("export")).batch
        settings = ValidateSettings.from_params(params.get("validate"), traced, spec.max_batch)
        model = build_model(spec)
        report = validate_export(model, paths.ONNX, spec, settings, traced)
    reference = reference_set(model, spec, report["output_names"], params.get("data") or {}, settings)
    save_reference(paths.REFERENCE, reference)
    report["reference"] = reference["source"]
    report["reference_degenerate"] = reference["degenerate"]
    if reference["degenerate"]:
        # The gate's own inputs passed; the eval set's reference can still prove nothing: every engine's figures say so.
        logging.getLogger("kiln.export.validate").warning("the eval reference proves little: %s", reference["degenerate"])
    write_json(paths.VALIDATE, report)
    logging.getLogger("kiln.export.validate").info(
        "passed: %s", ", ".join(f"{n} max abs {o['max_abs_err']:.3g}" for n, o in report["outputs"].items())
    )


if __name__ == "__main__":
    run_stage(main)
