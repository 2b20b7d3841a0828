"""Build the user's nn.Module from a ModelSpec: a torchvision/timm name or a `module:function`, plus a checkpoint."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelSpec
from .errors import KilnError, close_matches

log = logging.getLogger(__name__)


def _torchvision_model(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module | None:
    import torchvision

    if name not in torchvision.models.list_models():
        return None
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except Exception as e:  # bad weights enum, unknown kwarg, no network for weights
        raise KilnError(f"torchvision could not build model '{name}' (weights={weights!r}, kwargs={kwargs}): {e}") from e


def _timm_model(name: str, weights: str | None, kwargs: dict[str, Any]) -> nn.Module | None:
    try:
        import timm
    except ImportError:
        return None
    if name not in timm.list_models():
        return None
    return timm.create_model(name, pretrained=bool(weights), **kwargs)


def _known_names() -> list[str]:
    import torchvision

    names = list(torchvision.models.list_models())
    try:
        import timm

        names += timm.list_models()
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


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise KilnError(f"model.checkpoint '{p}' does not exist; set it to a state_dict file saved with torch.save, or to null")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(
            f"model.checkpoint '{p}' is not a readable PyTorch checkpoint ({first}); save one with torch.save(model.state_dict(), path)"
        ) from e
    # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KilnError(f"model.checkpoint '{p}' holds a {type(obj).__name__}, not a state_dict of tensors")
    return obj


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise KilnError(f"{source} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


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
    if spec.fold:
        model = FoldedPreprocess(model, spec.fold["mean"], spec.fold["std"], spec.fold["layout"])
    return model.eval()


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
