"""Build the user's nn.Module from a ModelSpec: a torchvision/timm name or a `module:function`, plus a checkpoint."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import torch
from torch import nn

from kiln.config.views import ModelSpec
from kiln.core.errors import KilnError, close_matches, first_line
from kiln.export.checkpoints import apply_state_dict, load_state_dict_file

log = logging.getLogger(__name__)

# model.name suffixes that mean an Ultralytics model (kiln.export.detection_yolo): its YAML config or a .pt checkpoint
ULTRALYTICS_SUFFIXES = (".yaml", ".yml", ".pt")


def _torchvision_model(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module | None:
    import torchvision

    if name not in torchvision.models.list_models():
        return None
    import inspect

    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters and "weights_backbone" not in kwargs:
        # Detection and segmentation builders fetch ImageNet backbone weights by default: a download,
        # which fails offline. kiln asks for none unless model.kwargs.weights_backbone says otherwise.
        kwargs = {**kwargs, "weights_backbone": None}
        log.info("model '%s': weights_backbone=None (no download); set model.kwargs.weights_backbone to use pretrained ones", name)
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except Exception as e:  # bad weights enum, unknown kwarg, no network for weights
        raise KilnError(f"torchvision could not build model '{name}' (weights={weights!r}, kwargs={kwargs}): {e}") from e


def _timm_model(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module | None:
    try:
        import timm
    except ImportError:
        # Without timm a timm name would read as a typo: say what is missing instead.
        raise KilnError(
            f"unknown model.name '{name}'{close_matches(name, _known_names())}: it is not a torchvision model, and timm is not "
            "installed to look it up; install it with `pip install timm` (kiln's setup installs it), or use model.entrypoint"
        ) from None
    # is_model accepts pretrained tags ('resnet50.a1_in1k'), which list_models() does not name; 'hf-hub:org/repo'
    # and repo-like names are timm's to accept or refuse with its own advice.
    if not (timm.is_model(name) or ":" in name or "/" in name):
        return None
    pretrained = bool(weights)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # no network for pretrained weights, an unknown kwarg, a bad hub id
        hint = (
            "; pretrained weights are downloaded from the Hugging Face Hub: check the network, or set model.weights to null for "
            "random weights (and model.checkpoint for your own)"
            if pretrained
            else ""
        )
        raise KilnError(f"timm could not build model '{name}' (pretrained={pretrained}, kwargs={kwargs}): {first_line(e)}{hint}") from e


def _known_names() -> list[str]:
    import torchvision

    names = list(torchvision.models.list_models())
    try:
        import timm

        # With pretrained tags too, so a mistyped 'resnet50.a1_in1k' gets a suggestion.
        names += timm.list_models() + timm.list_models(pretrained=True)
    except ImportError:
        pass
    return names


def _from_entrypoint(entrypoint: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, sep, func_name = entrypoint.partition(":")
    if not sep or not module_name or not func_name:
        raise KilnError(f"model.entrypoint must look like 'package.module:function', got '{entrypoint}'")
    # Stage scripts run as `python stages/x.py`; make the project root importable like `python -m` would.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise KilnError(f"model.entrypoint: cannot import module '{module_name}' ({e}); is it on PYTHONPATH or in the project root?") from e
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        raise KilnError(f"model.entrypoint: module '{module_name}' has no callable '{func_name}'{close_matches(func_name, dir(module))}")
    model = func(**kwargs)
    if not isinstance(model, nn.Module):
        raise KilnError(f"model.entrypoint '{entrypoint}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


# Keys training scripts keep the weights under, plain weights first: an EMA copy only when there is nothing else.
class FoldedPreprocess(nn.Module):
    """uint8 [N, H, W, C] images -> scale, normalise, layout -> the model: preprocessing inside the graph."""

    def __init__(self, model: nn.Module, mean: Any, std: Any, layout: str):
        super().__init__()
        self.model = model
        self.nchw = layout == "NCHW"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> Any:
        x = (images.to(torch.float32) / 255.0 - self.mean) / self.std
        return self.model(x.permute(0, 3, 1, 2) if self.nchw else x)


def build_model(spec: ModelSpec) -> nn.Module:
    """The user's model with its checkpoint loaded, in eval mode (exports and references are for inference)."""
    # Weights not loaded from a checkpoint are random: seed them so export, validate and the
    # torch engine all see the same network.
    torch.manual_seed(spec.seed)
    if spec.entrypoint:
        model = _from_entrypoint(spec.entrypoint, spec.kwargs)
    else:
        assert spec.name
        if spec.name.endswith(ULTRALYTICS_SUFFIXES):
            from kiln.export.detection_yolo import build_ultralytics

            model = build_ultralytics(spec.name, spec.kwargs)
        else:
            model = _torchvision_model(spec.name, spec.weights, spec.kwargs) or _timm_model(spec.name, spec.weights, spec.kwargs)
        if model is None:
            raise KilnError(
                f"unknown model.name '{spec.name}'{close_matches(spec.name, _known_names())}; "
                "use a torchvision (or timm) model name, or model.entrypoint"
            )
    if spec.checkpoint:
        apply_state_dict(model, load_state_dict_file(spec.checkpoint), f"model.checkpoint '{spec.checkpoint}'")
    if model.training:
        log.info("model put in eval mode (it was in training mode): dropout and batch-norm statistics are frozen for export")
    model = model.eval()
    from kiln.export.detection import DetectionSettings, PaddedDetections, detector_family

    family = detector_family(model)
    if family == "yolo":
        from kiln.export.detection_yolo import YoloDetections

        height, width = _image_size(spec)
        model = YoloDetections(model, height, width, DetectionSettings.from_params(spec.detection))
    elif family == "rcnn":
        # One image per call with torchvision's own postprocessing, outputs padded (kiln.export.detection_rcnn).
        from kiln.export.detection_rcnn import TwoStageDetections

        if spec.max_batch != 1:
            raise KilnError(
                f"{type(model).__name__} is a two-stage detector: kiln exports it at batch 1 (its region stage runs per image); "
                "set model.max_batch: 1 and every batch size in params is clamped to 1"
            )
        height, width = _image_size(spec)
        model = TwoStageDetections(model, height, width, DetectionSettings.from_params(spec.detection))
    elif family:
        # One batched graph with NMS inside, for export and for every eager copy alike.
        height, width = _image_size(spec)
        model = PaddedDetections(model, height, width, DetectionSettings.from_params(spec.detection))
    if spec.demo:
        from kiln.data.demo_weights import make_meaningful

        # With spec.fold the model under FoldedPreprocess takes data.preprocess's image (engine_spec checked it).
        make_meaningful(model, spec.demo, spec.seed, None if spec.fold else [tuple(i.shape) for i in spec.inputs], spec.max_batch)
    if spec.fold:
        model = FoldedPreprocess(model, spec.fold["mean"], spec.fold["std"], spec.fold["layout"])
    return model.eval()


def _image_size(spec: ModelSpec) -> tuple[int, int]:
    """(height, width) of a detector's one image input, [3, H, W]."""
    if len(spec.inputs) != 1 or len(spec.inputs[0].shape) != 3 or spec.inputs[0].shape[0] != 3:
        shapes = ", ".join(f"'{i.name}' {list(i.shape)}" for i in spec.inputs)
        raise KilnError(
            f"a detector takes one image input shaped [3, height, width] (float, normalised by data.preprocess); model.inputs is {shapes}"
        )
    return spec.inputs[0].shape[1], spec.inputs[0].shape[2]


def flatten_outputs(out: Any, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """A model's outputs as named tensors: a tensor, a tuple/list of tensors, or a dict of tensors."""
    if isinstance(out, torch.Tensor):
        tensors, default = [out], ["output"]
    elif isinstance(out, dict):
        tensors, default = list(out.values()), [str(k) for k in out]
    elif isinstance(out, (tuple, list)):
        tensors, default = list(out), [f"output_{i}" for i in range(len(out))]
    else:
        raise KilnError(f"the model returned {type(out).__name__}; kiln needs a tensor, a tuple/list of tensors or a dict of tensors")
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise KilnError("the model's outputs must all be tensors (nested structures are not supported yet)")
    if names is not None and len(names) != len(tensors):
        raise KilnError(f"model.outputs names {len(names)} outputs ({', '.join(names)}) but the model returns {len(tensors)}")
    return dict(zip(names or default, tensors))
