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
    def __init__(self, model: torch.nn.Module, spec: ModelSpec, output_names: list[str], bf16: bool = False):
        # bf16: autocast on channels-last tensors, the layout oneDNN's bf16 kernels want.
        self.bf16 = bf16
        self.model = model.to(memory_format=torch.channels_last) if bf16 else model
        self.input_names = [i.name for i in spec.inputs]
        self.output_names = output_names

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        return t.to(memory_format=torch.channels_last) if self.bf16 and t.dim() == 4 else t

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(*(self._tensor(feeds[n]) for n in self.input_names))
        return {k: v.float().numpy() for k, v in flatten_outputs(out, tuple(self.output_names)).items()}


class TorchRuntime:
    name = "torch"
    precisions = ("fp32", "bf16")
    libraries = ("torch", "torchvision")

    def unavailable_reason(self, target: Target) -> str | None:
        if target.device != "cpu":
            return f"the torch runtime runs on device 'cpu' in this version of kiln, not '{target.device}'"
        if target.precision == "bf16":
            from ..fingerprint import collect

            cpu = collect()["hardware"]["cpu"]
            if not set(cpu["features"]) & {"avx512_bf16", "amx_bf16", "bf16"}:
                # oneDNN then emulates bf16: measured here ~7x slower than fp32 on ResNet-18.
                return f"{cpu['model']} has no native bf16 (no AVX512-BF16/AMX/Arm BF16): PyTorch would emulate it, slower than fp32"
        return None

    def build(self, target: Target, source: Any, engine_dir: Path) -> dict[str, Any]:
        import onnx

        model = build_model(source.model)
        torch.save(model.state_dict(), engine_dir / WEIGHTS)
        spec = {**source.model.to_params(), "checkpoint": None, "weights": None}
        # The ONNX graph's output names are the names every runtime answers with.
        outputs = [o.name for o in onnx.load(str(source.onnx_path), load_external_data=False).graph.output]
        (engine_dir / SPEC).write_text(json.dumps({"model": spec, "outputs": outputs}, indent=2) + "\n", encoding="utf-8")
        return {"executed_precision": "bf16 autocast" if target.precision == "bf16" else "fp32", "mode": "eager"}

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> EagerSession:
        torch.set_num_threads(target.effective_threads)
        saved = json.loads((engine_dir / SPEC).read_text(encoding="utf-8"))
        spec = ModelSpec.from_params(saved["model"])
        model = build_model(spec)
        apply_state_dict(model, torch.load(engine_dir / WEIGHTS, map_location="cpu", weights_only=True), f"engine weights {engine_dir / WEIGHTS}")
        return EagerSession(model.eval(), spec, saved["outputs"], bf16=target.precision == "bf16")


RUNTIME = TorchRuntime()
