"""A model that arrives as an ONNX file (model.onnx): export takes it as it is, validate checks it against its own
samples and makes ONNX Runtime fp32 the reference, the engines are built from it, and the torch targets say why
they cannot be; with a PyTorch model beside it, the PyTorch model validates it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest

from kiln.accuracy.budgets import accuracy_against_reference
from kiln.config.views import ModelSpec, Target
from kiln.core.errors import KilnError, ValidationFailed
from kiln.export.models import build_model
from kiln.export.onnx import import_onnx
from kiln.export.validate import OnnxReference, ValidateSettings, reference_set, validate_export, validate_onnx
from kiln.pipeline.engine import build_engine, load_engine
from kiln.runtimes import BuildSource

SETTINGS = ValidateSettings(batch_sizes=(1, 3), reference_samples=8)


def onnx_only(spec: ModelSpec, path) -> ModelSpec:
    return replace(spec, name=None, entrypoint=None, onnx=str(path))


def test_an_onnx_file_goes_through_validate_and_the_engines(tmp_path, tiny_onnx):
    given, tiny_spec, _ = tiny_onnx
    spec = onnx_only(tiny_spec, given)
    assert spec.onnx_only and spec.label == str(given)
    assert replace(spec, trained=None).trained_weights()[0]  # the file holds its weights: taken as trained
    assert ModelSpec.from_params(spec.to_params()) == spec  # what configure hands the stages round-trips
    out = tmp_path / "artifacts" / "model.onnx"
    out.parent.mkdir()
    manifest = import_onnx(spec, out)
    assert out.read_bytes() == given.read_bytes() and manifest["exporter"].startswith("none")
    assert list(manifest["inputs"]) == [i.name for i in spec.inputs] and manifest["nodes"] > 0

    report = validate_onnx(out, spec, SETTINGS)
    assert report["passed"] and report["reference_model"].startswith("ONNX Runtime fp32")
    reference = reference_set(OnnxReference(out), spec, report["output_names"], {}, SETTINGS)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    direct = session.run(report["output_names"], reference["inputs"])
    assert np.array_equal(reference["outputs"][report["output_names"][0]], direct[0])

    # Downstream is unchanged: an ONNX Runtime engine built from it agrees with the reference; torch cannot build it.
    params = {"targets": {"ort": {"runtime": "onnxruntime"}, "eager": {"runtime": "torch"}}}
    ort_target = Target.from_params("ort", params)
    build_engine(ort_target, BuildSource(out, spec), tmp_path / "ort")
    engine, _ = load_engine(tmp_path / "ort", ort_target)
    accuracy = accuracy_against_reference(engine, reference, chunk=4)
    assert accuracy["top1_agreement"] == 1.0, accuracy
    skipped = build_engine(Target.from_params("eager", params), BuildSource(out, spec), tmp_path / "eager")
    assert "only an ONNX file" in skipped["skipped"]


def test_a_graph_that_does_not_fit_model_inputs_is_refused_with_its_inputs_named(tmp_path, tiny_onnx):
    given, tiny_spec, _ = tiny_onnx
    spec = onnx_only(tiny_spec, given)
    wrong_name = replace(spec, inputs=(replace(spec.inputs[0], name="pixels"),))
    with pytest.raises(KilnError, match=r"the graph's inputs are \['input'\].*declares \['pixels'\].*shape \['batch'"):
        import_onnx(wrong_name, tmp_path / "m.onnx")
    wrong_shape = replace(spec, inputs=(replace(spec.inputs[0], shape=(3, 64, 64)),))
    with pytest.raises(KilnError, match="per sample"):
        import_onnx(wrong_shape, tmp_path / "m.onnx")
    # A graph frozen at batch 2 (as a fixed-shape export leaves it) is refused before anything is built from it.
    frozen = onnx.load(str(given))
    frozen.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    fixed = tmp_path / "fixed.onnx"
    onnx.save(frozen, str(fixed))
    with pytest.raises(KilnError, match="fixed batch axis"):
        import_onnx(onnx_only(tiny_spec, fixed), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()  # nothing half-written


def test_with_the_pytorch_model_beside_it_the_model_validates_the_file(tmp_path, tiny_onnx):
    given, tiny_spec, _ = tiny_onnx
    both = replace(tiny_spec, onnx=str(given))
    assert not both.onnx_only
    out = tmp_path / "model.onnx"
    import_onnx(both, out)
    assert validate_export(build_model(both), out, both, SETTINGS, 2)["passed"]
    # A file from another model (different weights) is caught by the PyTorch model it claims to be.
    other = tmp_path / "other.onnx"
    shutil.copyfile(given, other)
    graph = onnx.load(str(other))
    weights = next(i for i in graph.graph.initializer if len(i.dims) == 4)
    array = onnx.numpy_helper.to_array(weights).copy() * -1.0
    weights.CopyFrom(onnx.numpy_helper.from_array(array, weights.name))
    onnx.save(graph, str(other))
    import_onnx(replace(both, onnx=str(other)), out)
    with pytest.raises(ValidationFailed):
        validate_export(build_model(both), out, both, SETTINGS, 2)


@pytest.mark.slow
def test_model_onnx_through_dvc_and_a_file_replaced_in_place_re_runs_export(tmp_path, tiny_onnx):
    from test_pipeline import make_project, run, stale_stages

    given, _, _ = tiny_onnx
    project = make_project(tmp_path, "targets=cpu")
    shutil.copyfile(given, project / "tiny.onnx")
    model = project / "conf" / "model" / "tiny.yaml"
    model.write_text(model.read_text().replace("entrypoint: tinymodels:tiny_cnn", "entrypoint: null\nonnx: tiny.onnx"))
    keep = ("onnxruntime", "onnxruntime-int8", "torch-eager")
    cpu = project / "conf" / "targets" / "cpu.yaml"
    import yaml

    targets = yaml.safe_load(cpu.read_text())
    targets["defaults"] = [d for d in targets["defaults"] if d == "_self_" or d.split("@")[1] in keep]
    cpu.write_text(yaml.safe_dump({k: v for k, v in targets.items() if k in keep or k == "defaults"}, sort_keys=False))
    run(["python", "-m", "kiln", "params"], project)
    run(["dvc", "repro"], project)
    export = json.loads((project / "artifacts" / "export.json").read_text())
    assert export["source_onnx"] == "tiny.onnx" and export["reference"] == "onnxruntime"
    validate = json.loads((project / "reports" / "validate.json").read_text())
    assert validate["reference_model"].startswith("ONNX Runtime fp32")
    assert json.loads((project / "reports" / "metrics" / "onnxruntime.json").read_text())["top1_agreement"] == 1.0
    assert "only an ONNX file" in json.loads((project / "reports" / "runs" / "torch-eager.json").read_text())["skipped"]
    assert "nothing was exported" in (project / "reports" / "benchmark.md").read_text()
    # The file replaced in place changes no param: the model's file digest re-runs export and what follows.
    graph = onnx.load(str(project / "tiny.onnx"))
    graph.producer_name = "retrained"
    onnx.save(graph, str(project / "tiny.onnx"))
    assert "export" in stale_stages(project)
