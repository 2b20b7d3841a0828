"""export: PyTorch -> artifacts/model.onnx (dynamic batch axis) and its manifest."""

import logging

from kiln import paths
from kiln.atomic import write_json
from kiln.config import engine_spec, load_params
from kiln.export import ExportSettings, export_onnx
from kiln.models import build_model
from kiln.stage import run_stage


def main() -> None:
    params = load_params()
    spec = engine_spec(params)
    settings = ExportSettings.from_params(params.get("export"))
    model = build_model(spec)
    manifest = export_onnx(model, spec, settings, paths.ONNX)
    write_json(paths.EXPORT_MANIFEST, manifest)
    logging.getLogger("kiln.export").info(
        "%s -> %s: opset %d, %d nodes, inputs %s, outputs %s, %d exporter warnings",
        spec.label,
        paths.ONNX,
        manifest["opset"],
        manifest["nodes"],
        manifest["inputs"],
        manifest["outputs"],
        len(manifest["warnings"]),
    )


if __name__ == "__main__":
    run_stage(main)
