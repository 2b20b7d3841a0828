"""Checkpoints as people save them (whole modules, DataParallel, Lightning, EMA, extras) and timm names: loaded, or one clear line."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from conftest import tiny_model_params
from torch import nn

from kiln.config.views import ModelSpec
from kiln.core.errors import KilnError
from kiln.export.checkpoints import apply_state_dict, load_state_dict_file
from kiln.export.models import build_model

ENTRYPOINT = f"{__name__}:tiny"


class Tiny(nn.Module):
    """A conv, a batch-norm and a head: weights, buffers and a num_batches_tracked to load."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def tiny() -> Tiny:
    return Tiny()


class HParams(dict):
    """Stands in for Lightning's AttributeDict: a class torch's safe loader does not know."""


def trained() -> Tiny:
    """A Tiny whose weights differ from a fresh one's, so a test can tell they were loaded."""
    torch.manual_seed(123)
    model = Tiny()
    with torch.no_grad():
        model.bn.running_mean.uniform_()
        model.bn.num_batches_tracked.fill_(7)
    return model


def spec(checkpoint=None) -> ModelSpec:
    return ModelSpec.from_params(tiny_model_params(entrypoint=ENTRYPOINT, checkpoint=str(checkpoint) if checkpoint else None))


def assert_loaded(model: nn.Module, source: nn.Module) -> None:
    mine, theirs = model.state_dict(), source.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def error(fn, *args) -> str:
    with pytest.raises(KilnError) as info:
        fn(*args)
    message = str(info.value)
    assert "\x1b" not in message and "\n" not in message, message
    return message


@pytest.fixture
def kiln_log(caplog):
    caplog.set_level(logging.INFO, logger="kiln.export.models")
    return caplog


# 1. A whole pickled module


def test_whole_pickled_module_is_refused_with_the_two_lines_that_convert_it(tmp_path):
    path = tmp_path / "whole.pt"
    source = trained()
    torch.save(source, path)
    message = error(build_model, spec(path))
    out = tmp_path / "whole.state_dict.pt"
    assert f"model.checkpoint '{path}' holds a whole pickled module ({Tiny.__module__}.Tiny), not a state_dict" in message
    assert "kiln does not unpickle arbitrary code" in message
    assert f'`model = torch.load("{path}", weights_only=False)`' in message
    assert f'`torch.save(model.state_dict(), "{out}")`' in message
    assert f"set model.checkpoint to {out}" in message
    assert "Weights only load failed" not in message and "add_safe_globals" not in message
    # The lines work, and what they write loads.
    exec(message.split("`")[1] + "\n" + message.split("`")[3], {"torch": torch})
    assert_loaded(build_model(spec(out)), source)


def test_whole_pickled_torch_module_and_legacy_format(tmp_path):
    seq = tmp_path / "seq.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)), seq)
    assert "holds a whole pickled module (torch.nn.modules.container.Sequential)" in error(load_state_dict_file, seq)
    legacy = tmp_path / "legacy.pt"
    torch.save(Tiny(), legacy, _use_new_zipfile_serialization=False)
    assert f"holds a whole pickled module ({Tiny.__module__}.Tiny)" in error(load_state_dict_file, legacy)


def test_whole_module_pickled_from_main_says_where_to_convert(tmp_path, monkeypatch):
    # A class defined in the training script pickles as __main__.<name>: only that script can unpickle it.
    cls = type("MainNet", (Tiny,), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "MainNet", cls, raising=False)
    path = tmp_path / "main.pt"
    torch.save(cls(), path)
    message = error(load_state_dict_file, path)
    assert "holds a whole pickled module (__main__.MainNet)" in message
    assert "convert it in the script that defines MainNet (it was pickled from __main__)" in message


def test_pickled_object_next_to_the_weights_says_how_to_save_them_alone(tmp_path):
    # Lightning pickles its hyper-parameters as an AttributeDict, which the safe loader refuses like a module.
    path = tmp_path / "lightning.ckpt"
    source = trained()
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": HParams(lr=0.1)}, path)
    message = error(load_state_dict_file, path)
    out = tmp_path / "lightning.state_dict.pt"
    assert f"holds a pickled {HParams.__module__}.HParams object next to its weights" in message
    assert "kiln does not unpickle arbitrary code" in message
    assert f'`ckpt = torch.load("{path}", weights_only=False)` then `torch.save(ckpt["state_dict"], "{out}")`' in message
    exec(message.split("`")[1] + "\n" + message.split("`")[3], {"torch": torch})
    assert_loaded(build_model(spec(out)), source)


def test_whole_module_inside_a_dict(tmp_path):
    path = tmp_path / "dict.pt"
    torch.save({"model": Tiny(), "epoch": 1}, path)
    assert 'torch.save(ckpt["model"].state_dict(), ' in error(load_state_dict_file, path)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_and_corrupt_files(tmp_path):
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))), scripted)
    assert "is a TorchScript archive (torch.jit.save), not a state_dict" in error(load_state_dict_file, scripted)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    assert "is not a readable PyTorch checkpoint" in error(load_state_dict_file, corrupt)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, empty)
    assert "holds a dict without tensors (keys: epoch, optimizer), not a state_dict" in error(load_state_dict_file, empty)


# 2. DataParallel / DistributedDataParallel


def test_data_parallel_prefix_is_stripped_and_logged(tmp_path, kiln_log):
    source = trained()
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(source).state_dict(), path)
    assert all(k.startswith("module.") for k in torch.load(path))
    assert_loaded(build_model(spec(path)), source)
    assert "key prefix 'module.' stripped (added by DataParallel/DistributedDataParallel)" in kiln_log.text


# 3. Lightning and other wrappers


@pytest.mark.parametrize("attribute", ["model", "net", "backbone"])
def test_lightning_checkpoint_with_attribute_prefix(tmp_path, kiln_log, attribute):
    source = trained()
    state = {f"{attribute}.{k}": v for k, v in source.state_dict().items()}
    state["criterion.weight"] = torch.ones(2)  # a loss with weights, next to the network in the LightningModule
    path = tmp_path / "epoch=3.ckpt"
    torch.save(
        {
            "state_dict": state,
            "epoch": 3,
            "global_step": 300,
            "pytorch-lightning_version": "2.4.0",
            "hyper_parameters": {"lr": 0.1},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        },
        path,
    )
    assert_loaded(build_model(spec(path)), source)
    assert (
        f"key prefix '{attribute}.' stripped (the attribute of the LightningModule or other wrapper that held the network)" in kiln_log.text
    )
    assert "1 entries outside it ignored (criterion.weight)" in kiln_log.text


def test_nested_prefixes_and_torch_compile(tmp_path, kiln_log):
    source = trained()
    state = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    model = Tiny()
    apply_state_dict(model, state, "test")
    assert_loaded(model, source)
    reasons = "'module.' added by DataParallel/DistributedDataParallel; '_orig_mod.' added by torch.compile"
    assert f"key prefix 'module._orig_mod.' stripped ({reasons})" in kiln_log.text


def test_ema_copy_next_to_the_network_prefers_the_network(tmp_path):
    source, ema = trained(), Tiny()
    state = {**{f"model.{k}": v for k, v in source.state_dict().items()}, **{f"ema_model.{k}": v for k, v in ema.state_dict().items()}}
    model = Tiny()
    apply_state_dict(model, state, "test")
    assert_loaded(model, source)


def test_a_config_under_model_is_not_taken_for_the_weights(tmp_path):
    source = trained()
    path = tmp_path / "config.pt"
    torch.save({"model": {"name": "tiny", "width": 4}, "module": source.state_dict()}, path)
    assert_loaded(build_model(spec(path)), source)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "module", "ema", "model_ema", "state_dict_ema"])
def test_wrapper_keys(tmp_path, key):
    source = trained()
    path = tmp_path / "wrapped.pt"
    torch.save({key: source.state_dict(), "epoch": 3, "optimizer": {"state": {}}}, path)
    assert_loaded(build_model(spec(path)), source)


def test_prefix_that_fits_the_keys_but_not_the_shapes_is_named_in_the_error():
    state = {f"model.{k}": v for k, v in Tiny().state_dict().items()}
    state["model.head.weight"] = torch.zeros(5, 4)
    message = error(apply_state_dict, Tiny(), state, "model.checkpoint 'x.ckpt'")
    assert message.startswith("model.checkpoint 'x.ckpt' does not fit the model (key prefix 'model.' stripped")
    assert "shape mismatch: head.weight (5, 4) vs model (2, 4)" in message


def test_keys_that_fit_under_no_prefix_keep_the_old_error():
    state = {f"model.{k}": v for k, v in nn.Sequential(nn.Linear(2, 2)).state_dict().items()}
    message = error(apply_state_dict, Tiny(), state, "model.checkpoint 'x.pt'")
    assert message.startswith("model.checkpoint 'x.pt' does not fit the model: missing: conv.weight, conv.bias, bn.weight and")
    assert "unexpected: model.0.weight, model.0.bias" in message


# 4. Non-tensor entries


def test_non_tensor_entries_are_ignored_when_the_tensors_fit(tmp_path, kiln_log):
    source = trained()
    path = tmp_path / "mixed.pt"
    state = dict(source.state_dict())
    state["bn.num_batches_tracked"] = 7  # a scalar buffer saved as a Python int
    torch.save({**state, "epoch": 3, "lr": 0.1, "hparams": {"width": 4}}, path)
    model = build_model(spec(path))
    assert_loaded(model, source)
    assert model.bn.num_batches_tracked.dtype == torch.long
    assert "non-tensor entries ignored, the tensors fit the model without them: epoch (int), lr (float), hparams (dict)" in kiln_log.text


def test_non_tensor_entries_when_the_tensors_do_not_fit(tmp_path):
    state = {**nn.Sequential(nn.Linear(2, 2)).state_dict(), "epoch": 3}
    message = error(apply_state_dict, Tiny(), state, "model.checkpoint 'x.pt'")
    assert "does not fit the model: missing: conv.weight" in message
    assert "non-tensor entries: epoch (int)" in message


def test_missing_num_batches_tracked_is_tolerated(kiln_log):
    source = trained()
    state = source.state_dict()  # keeps _metadata: batch-norm version 2 would refuse a missing counter under strict loading
    del state["bn.num_batches_tracked"]
    model = Tiny()
    apply_state_dict(model, state, "test")
    assert torch.equal(model.bn.running_mean, source.bn.running_mean)
    assert "no num_batches_tracked for 1 batch-norm layers" in kiln_log.text


def test_metadata_follows_a_stripped_prefix():
    state = nn.DataParallel(trained()).state_dict()
    assert "module.bn" in state._metadata
    model = Tiny()
    apply_state_dict(model, state, "test")  # strict: would fail if the versions were lost with the prefix
    assert torch.equal(model.bn.num_batches_tracked, torch.tensor(7))


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = trained()
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    assert_loaded(build_model(spec(path)), source)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert "is not a readable safetensors file" in error(load_state_dict_file, bad)


def test_plain_state_dict_still_loads_strictly(tmp_path):
    source = trained()
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    assert_loaded(build_model(spec(path)), source)


# 5. timm


def timm_spec(name: str, weights=None, **kwargs) -> ModelSpec:
    return ModelSpec.from_params(
        {"name": name, "weights": weights, "kwargs": kwargs, "inputs": {"input": {"shape": [3, 32, 32]}}, "outputs": None, "seed": 0}
    )


def test_timm_model_builds_offline_with_random_weights():
    model = build_model(timm_spec("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # A pretrained tag names a timm model too (list_models() does not list them).
    tagged = build_model(timm_spec("vit_tiny_patch16_224.augreg_in21k", img_size=32, patch_size=8, num_classes=10))
    assert tagged(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_timm_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    message = error(build_model, timm_spec("vit_tiny_patch16_224"))
    assert message.startswith("unknown model.name 'vit_tiny_patch16_224': it is not a torchvision model, and timm is not installed")
    assert "install it with `pip install timm` (kiln's setup installs it)" in message
    # A typo of a torchvision name still gets its suggestion.
    assert "did you mean 'resnet18'" in error(build_model, timm_spec("resnet81"))


def test_timm_bad_kwargs():
    message = error(build_model, timm_spec("vit_tiny_patch16_224", img_size=32, no_such_kwarg=1))
    assert message.startswith(
        "timm could not build model 'vit_tiny_patch16_224' (pretrained=False, kwargs={'img_size': 32, 'no_such_kwarg': 1}): "
    )
    assert "unexpected keyword argument 'no_such_kwarg'" in message


def test_timm_download_failure_is_one_line(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise RuntimeError("\x1b[31mLocalEntryNotFoundError\x1b[0m: cannot reach huggingface.co\nand a second line of advice")

    monkeypatch.setattr(timm, "create_model", offline)
    message = error(build_model, timm_spec("vit_tiny_patch16_224", weights="DEFAULT"))
    assert message.startswith(
        "timm could not build model 'vit_tiny_patch16_224' (pretrained=True, kwargs={}): "
        "LocalEntryNotFoundError: cannot reach huggingface.co; pretrained weights are downloaded from the Hugging Face Hub"
    )
    assert "second line" not in message
