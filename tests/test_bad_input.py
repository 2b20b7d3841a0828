"""Bad input gets one clear message: what was wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_params

from kiln.config.views import ModelSpec, Target
from kiln.core.errors import KilnError
from kiln.export.models import build_model
from kiln.export.onnx import ExportSettings, export_onnx
from kiln.runtimes import get_runtime


def spec(**overrides):
    return ModelSpec.from_params(tiny_model_params(**overrides))


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(KilnError, match=r"unknown model.name 'resnet81'.*did you mean 'resnet18'"):
        build_model(ModelSpec.from_params({**tiny_model_params(entrypoint=None), "name": "resnet81"}))


def test_name_and_entrypoint_are_exclusive():
    with pytest.raises(KilnError, match="exactly one of model.name"):
        ModelSpec.from_params({**tiny_model_params(), "name": "resnet18"})


def test_bad_entrypoints():
    with pytest.raises(KilnError, match="must look like 'package.module:function'"):
        build_model(spec(entrypoint="tinymodels.tiny_cnn"))
    with pytest.raises(KilnError, match="cannot import module 'no_such_module'"):
        build_model(spec(entrypoint="no_such_module:f"))
    with pytest.raises(KilnError, match=r"has no callable 'tiny_cn'.*did you mean 'tiny_cnn'"):
        build_model(spec(entrypoint="tinymodels:tiny_cn"))
    with pytest.raises(KilnError, match="returned str, not a torch.nn.Module"):
        build_model(spec(entrypoint="tinymodels:not_a_module"))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(KilnError, match=r"model.checkpoint '.*missing.pt' does not exist"):
        build_model(spec(checkpoint=str(tmp_path / "missing.pt")))


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(KilnError, match=r"is not a readable PyTorch checkpoint"):
        build_model(spec(checkpoint=str(bad)))


def test_state_dict_that_does_not_fit(tmp_path):
    from tinymodels import TinyCNN

    other = tmp_path / "other.pt"
    torch.save(TinyCNN(num_classes=5).state_dict(), other)
    with pytest.raises(KilnError, match=r"does not fit the model: shape mismatch: head.weight \(5, 128\) vs model \(10, 128\)"):
        build_model(spec(checkpoint=str(other)))


def test_checkpoint_that_fits_is_loaded_even_when_wrapped(tmp_path):
    from tinymodels import TinyCNN

    trained = TinyCNN()
    torch.nn.init.constant_(trained.head.bias, 3.0)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, path)
    model = build_model(spec(checkpoint=str(path)))
    assert torch.equal(model.head.bias, trained.head.bias)
    assert not model.training


def test_input_shape_of_the_wrong_rank(tmp_path):
    bad = ModelSpec.from_params(tiny_model_params(inputs={"input": {"shape": [16, 16]}}))
    with pytest.raises(KilnError, match=r"forward failed on inputs 'input' \[2, 16, 16\].*check model.inputs"):
        export_onnx(build_model(bad), bad, ExportSettings(), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_input_spec_values():
    with pytest.raises(KilnError, match=r"model.inputs.input.shape must be a list of positive integers"):
        ModelSpec.from_params(tiny_model_params(inputs={"input": {"shape": [3, -1, 16]}}))
    with pytest.raises(KilnError, match=r"model.inputs.input.dtype 'float64' is not one of"):
        ModelSpec.from_params(tiny_model_params(inputs={"input": {"shape": [3], "dtype": "float64"}}))


def test_unknown_runtime():
    params = {"targets": {"ov": {"runtime": "openvno"}}}
    with pytest.raises(KilnError, match=r"targets.ov.runtime 'openvno' is not a kiln runtime \(did you mean 'openvino'\?\)"):
        Target.from_params("ov", params)
    with pytest.raises(KilnError, match="unknown runtime 'tensorflow'"):
        get_runtime("tensorflow")


def test_unknown_target_and_keys():
    with pytest.raises(KilnError, match=r"no target 'openvin0'.*did you mean 'openvino'"):
        Target.from_params("openvin0", {"targets": {"openvino": {"runtime": "openvino"}}})
    with pytest.raises(KilnError, match=r"unknown keys \['precison'\].*did you mean 'precision'"):
        Target.from_params("t", {"targets": {"t": {"runtime": "openvino", "precison": "fp32"}}})


@pytest.mark.parametrize(
    "profile,match",
    [
        ({"min": 8, "opt": 4, "max": 32}, r"min <= opt <= max, got min=8 opt=4 max=32"),
        ({"min": 1, "opt": 64, "max": 32}, r"min <= opt <= max"),
        ({"min": 0}, r"profile.min must be a positive integer"),
        ({"batch": 4}, r"unknown keys \['batch'\]"),
    ],
)
def test_bad_profiles(profile, match):
    with pytest.raises(KilnError, match=match):
        Target.from_params("t", {"targets": {"t": {"runtime": "onnxruntime", "profile": profile}}})


def test_precision_a_runtime_does_not_offer(tmp_path, tiny_onnx):
    from kiln.pipeline.engine import build_engine
    from kiln.runtimes import BuildSource

    path, s, _ = tiny_onnx
    target = Target.from_params("t", {"targets": {"t": {"runtime": "onnxruntime", "precision": "fp8"}}})
    with pytest.raises(KilnError, match=r"runtime 'onnxruntime' does not offer precision 'fp8'; it offers fp32"):
        build_engine(target, BuildSource(path, s), tmp_path / "engine")
    assert not (tmp_path / "engine").exists()
