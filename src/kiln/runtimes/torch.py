"""Eager PyTorch: the fp32 baseline every speed-up is measured against.

The engine folder holds the model's spec and weights; loading rebuilds the module from
the spec (eager execution needs the model's Python code anyway) and loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..config import ModelSpec, Target
from ..models import apply_state_dict, build_model, flatten_outputs

WEIGHTS = "state_dict.pt"
SPEC = "model.json"


class EagerSession:
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, output_names: list[str]):
        self.model = model
        self.input_names = [i.name for i in spec.inputs]
        self.output_names = output_names

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.model(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        return {k: v.numpy() for k, v in flatten_outputs(out, tuple(self.output_names)).items()}


class TorchRuntime:
    name = "torch"
    precisions = ("fp32",)
    libraries = ("torch", "torchvision")

    def unavailable_reason(self, target: Target) -> str | None:
        if target.device != "cpu":
            return f"the torch runtime runs on device 'cpu' in this version of kiln, not '{target.device}'"
        return None

    def build(self, target: Target, source: Any, engine_dir: Path) -> dict[str, Any]:
        import onnx

        model = build_model(source.model)
        torch.save(model.state_dict(), engine_dir / WEIGHTS)
        spec = {**source.model.to_params(), "checkpoint": None, "weights": None}
        # The ONNX graph's output names are the names every runtime answers with.
        outputs = [o.name for o in onnx.load(str(source.onnx_path), load_external_data=False).graph.output]
        (engine_dir / SPEC).write_text(json.dumps({"model": spec, "outputs": outputs}, indent=2) + "\n", encoding="utf-8")
        return {"executed_precision": "fp32", "mode": "eager"}

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> EagerSession:
        torch.set_num_threads(target.effective_threads)
        saved = json.loads((engine_dir / SPEC).read_text(encoding="utf-8"))
        spec = ModelSpec.from_params(saved["model"])
        model = build_model(spec)
        apply_state_dict(model, torch.load(engine_dir / WEIGHTS, map_location="cpu", weights_only=True), f"engine weights {engine_dir / WEIGHTS}")
        return EagerSession(model.eval(), spec, saved["outputs"])


RUNTIME = TorchRuntime()
