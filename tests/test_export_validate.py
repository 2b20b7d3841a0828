"""Export and the validation gate, on small models whose export is right or deliberately wrong."""

from __future__ import annotations

import onnx
import pytest
from conftest import tiny_model_params

from kiln.config.views import ModelSpec
from kiln.core.errors import KilnError, ValidationFailed
from kiln.export.models import build_model
from kiln.export.onnx import ExportSettings, check_exported_graph, export_onnx
from kiln.export.validate import ValidateSettings, validate_export


def export_and_validate(tmp_path, entrypoint: str, exporter: str = "dynamo", fallback: bool = False, **validate: object) -> dict:
    spec = ModelSpec.from_params(tiny_model_params(entrypoint))
    settings = ExportSettings(exporter=exporter, fallback=fallback)
    path = tmp_path / "model.onnx"
    export_onnx(build_model(spec), spec, settings, path)
    return validate_export(build_model(spec), path, spec, ValidateSettings(**validate), settings.batch)


def test_correct_model_exports_with_dynamic_batch_and_passes(tmp_path, tiny_onnx):
    path, spec, manifest = tiny_onnx
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert manifest["opset"] == 18 and manifest["exporter"] == "dynamo"
    assert manifest["inputs"]["input"]["shape"][1:] == [3, 16, 16]
    assert len(manifest["sha256"]) == 64
    report = validate_export(build_model(spec), path, spec, ValidateSettings(), 2)
    assert report["passed"]
    out = report["outputs"]["output"]
    assert out["max_abs_err"] < 1e-4 and out["top1_agreement"] == 1.0
    assert report["batch_sizes"] == [1, 5]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_both_exporters_pass_a_correct_model(tmp_path, exporter):
    assert export_and_validate(tmp_path, "tinymodels:tiny_cnn", exporter)["passed"]


def test_data_dependent_branch_frozen_by_tracing_fails_validation(tmp_path):
    # The tracer records the branch the traced batch took; batches whose mean has the other sign differ.
    with pytest.raises(ValidationFailed, match=r"output 'output' at batch \d+: max abs error .* exceeds tolerance \(atol 0.0001"):
        export_and_validate(tmp_path, "tinymodels:data_dependent_branch", "torchscript")


def test_dynamo_failure_falls_back_to_torchscript_and_the_gate_still_catches_the_frozen_branch(tmp_path):
    spec = ModelSpec.from_params(tiny_model_params("tinymodels:data_dependent_branch"))
    manifest = export_onnx(build_model(spec), spec, ExportSettings(), tmp_path / "model.onnx")
    # The manifest says which exporter made the graph, and why not the asked one.
    assert manifest["exporter"] == "torchscript" and "dynamo failed" in manifest["export_path"]["why"]
    with pytest.raises(ValidationFailed, match=r"output 'output' at batch \d+: max abs error"):
        validate_export(build_model(spec), tmp_path / "model.onnx", spec, ValidateSettings(), 2)


def test_data_dependent_branch_is_refused_by_the_dynamo_exporter_in_a_few_lines(tmp_path, capsys):
    with pytest.raises(KilnError) as err:
        export_and_validate(tmp_path, "tinymodels:data_dependent_branch", "dynamo")
    message = str(err.value)
    assert "torch.onnx.export (dynamo) failed" in message and "data-dependent" in message
    assert len(message) < 800  # a summary; the full report is in the log
    assert "Traceback" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()  # nothing half-written


def test_batch_size_frozen_by_shape_arithmetic_fails_validation(tmp_path):
    with pytest.raises(ValidationFailed, match=r"batch \d+.*froze a batch-dependent shape"):
        export_and_validate(tmp_path, "tinymodels:batch_size_arithmetic", "torchscript")


def test_a_graph_whose_input_batch_axis_is_fixed_is_refused(tmp_path):
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [2, 3, 16, 16])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 16, 16])
    model = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Relu", ["input"], ["y"])], "g", [x], [y]),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    spec = ModelSpec.from_params(tiny_model_params())
    with pytest.raises(KilnError, match=r"export froze the batch axis of input 'input' to 2"):
        check_exported_graph(path, spec, ExportSettings())


def test_zero_head_reference_is_called_out(tmp_path):
    proves_nothing = r"the reference proves nothing: output 'output': all values are near zero.*model.demo_weights"
    with pytest.raises(ValidationFailed, match=proves_nothing):
        export_and_validate(tmp_path, "tinymodels:zero_head")
    report = export_and_validate(tmp_path, "tinymodels:zero_head", allow_degenerate_reference=True)
    assert "near zero" in report["degenerate"]


def test_demo_weights_redraw_a_zero_head_so_the_reference_proves_something(tmp_path):
    params = tiny_model_params("tinymodels:zero_head")
    params["demo"] = {"redraw_zero_layers": True, "batchnorm": True, "images": 4, "preprocess": {"resize": 16, "crop": 16}}
    spec = ModelSpec.from_params(params)
    path = tmp_path / "model.onnx"
    export_onnx(build_model(spec), spec, ExportSettings(), path)
    report = validate_export(build_model(spec), path, spec, ValidateSettings(), 2)  # no allow_degenerate_reference needed
    assert report["passed"] and report["degenerate"] is None
    # The same seeded weights in every copy: export and each eager reference agree.
    a, b = build_model(spec).state_dict(), build_model(spec).state_dict()
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_training_mode_model_is_exported_in_eval_mode(tmp_path, caplog):
    report = export_and_validate(tmp_path, "tinymodels:training_mode")
    assert report["passed"]  # batch-norm in training mode would make every batch differ


def test_two_outputs_top1_only_for_class_scores(tmp_path):
    spec = ModelSpec.from_params(tiny_model_params("tinymodels:two_outputs", outputs=["logits", "features"]))
    path = tmp_path / "model.onnx"
    manifest = export_onnx(build_model(spec), spec, ExportSettings(), path)
    assert list(manifest["outputs"]) == ["logits", "features"]
    report = validate_export(build_model(spec), path, spec, ValidateSettings(), 2)
    assert report["outputs"]["logits"]["top1_agreement"] == 1.0
    assert report["outputs"]["features"]["top1_agreement"] is None


def test_tolerance_is_what_decides(tmp_path):
    # An impossible tolerance turns ordinary float noise into a named failure.
    with pytest.raises(ValidationFailed, match=r"output 'output' at batch 1: max abs error .* \(atol 0 \+ rtol 0"):
        export_and_validate(tmp_path, "tinymodels:tiny_cnn", atol=0.0, rtol=0.0)


@pytest.mark.parametrize(
    "exporter,opset,match",
    [
        ("dynamo", 13, r"opsets 18\.\.\d+ .*use exporter 'torchscript'"),
        ("dynamo", 99, r"export.opset 99 cannot be targeted"),
        ("torchscript", 25, r"opsets 7\.\.20"),
        ("dynamo", "18", r"export.opset must be an integer, got '18'"),
    ],
)
def test_opset_the_exporter_cannot_target(exporter, opset, match):
    with pytest.raises(KilnError, match=match):
        ExportSettings.from_params({"exporter": exporter, "opset": opset})


def test_torchscript_exporter_targets_an_older_opset(tmp_path):
    spec = ModelSpec.from_params(tiny_model_params())
    manifest = export_onnx(
        build_model(spec), spec, ExportSettings.from_params({"exporter": "torchscript", "opset": 13}), tmp_path / "m.onnx"
    )
    assert manifest["opset"] == 13
    # The legacy exporter warns that it is deprecated: the warning is kept, not swallowed.
    assert any("TorchScript" in w["message"] for w in manifest["warnings"])


def test_validate_settings_need_batch_sizes_other_than_the_traced_one():
    with pytest.raises(KilnError, match="at least two positive batch sizes other than the traced"):
        ValidateSettings.from_params({"batch_sizes": [2, 4]}, traced_batch=2)
    from kiln.export.onnx import check_traced_batch

    with pytest.raises(KilnError, match=r"export.batch must be an integer >= 2.*model.max_batch: 1"):
        check_traced_batch(ExportSettings.from_params({"batch": 1}).batch, None)
    check_traced_batch(1, 1)  # a model that takes one image at a time is traced at 1


def test_unknown_export_key_is_named():
    with pytest.raises(KilnError, match=r"export has unknown keys \['opset_version'\]"):
        ExportSettings.from_params({"opset_version": 17})
