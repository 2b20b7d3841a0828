"""export: PyTorch -> artifacts/model.onnx (dynamic batch axis) and its manifest; or model.onnx taken as it is."""

import logging

from kiln.config.slices import load_stage_params
from kiln.core import paths
from kiln.core.atomic import write_json
from kiln.data.engine_input import engine_spec
from kiln.export.models import build_model
from kiln.export.onnx import ExportSettings, export_onnx, import_onnx
from kiln.pipeline.stage import run_stage


def main() -> None:
    params = load_stage_params("export")
    spec = engine_spec(params)
    settings = ExportSettings.from_params(params.get("export"))
    if spec.onnx:  # the user's graph, as given: with a PyTorch model too, validate checks one against the other
        manifest = import_onnx(spec, paths.ONNX)
        manifest["reference"] = "onnxruntime" if spec.onnx_only else "pytorch"
    else:
        manifest = export_onnx(build_model(spec), spec, settings, paths.ONNX)
        check_normalisation(manifest, params)
    write_json(paths.EXPORT_MANIFEST, manifest)
    logging.getLogger("kiln.export").info(
        "%s -> %s: opset %s, %d nodes, inputs %s, outputs %s, %d exporter warnings",
        spec.label,
        paths.ONNX,
        manifest["opset"],
        manifest["nodes"],
        manifest["inputs"],
        manifest["outputs"],
        len(manifest["warnings"]),
    )


def check_normalisation(manifest: dict, params: dict) -> None:
    """A wrapped detector takes images normalised by data.preprocess: say so when its own mean/std differ."""
    from kiln.data.images import Preprocess

    wrapper = (manifest.get("export_path") or {}).get("model_wrapper") or {}
    if "image_mean" not in wrapper:
        return
    pre = Preprocess.from_params((params.get("data") or {}).get("preprocess"))
    if any(abs(a - b) > 1e-3 for a, b in zip([*pre.mean, *pre.std], [*wrapper["image_mean"], *wrapper["image_std"]])):
        logging.getLogger("kiln.export").warning(
            "the detector normalises with mean %s, std %s, but data.preprocess uses mean %s, std %s: the engines take what "
            "data.preprocess makes, so set data.preprocess.mean/std to the detector's",
            wrapper["image_mean"],
            wrapper["image_std"],
            list(pre.mean),
            list(pre.std),
        )


if __name__ == "__main__":
    run_stage(main)
