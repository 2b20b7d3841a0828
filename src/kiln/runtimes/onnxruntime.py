"""ONNX Runtime on the CPU: the graph optimised offline for this machine and saved in the engine folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort

from ..config import Target
from ..errors import KilnError

OPTIMIZED = "model.optimized.onnx"
LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _options(target: Target, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = target.effective_threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


class OrtSession:
    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(feeds))))


class OnnxRuntimeRuntime:
    name = "onnxruntime"
    precisions = ("fp32",)
    libraries = ("onnxruntime",)

    def unavailable_reason(self, target: Target) -> str | None:
        if target.device != "cpu":
            return f"kiln's onnxruntime targets use the CPU execution provider; device '{target.device}' is not supported yet"
        return None

    def build(self, target: Target, source: Any, engine_dir: Path) -> dict[str, Any]:
        level_name = str(target.options.get("graph_optimization_level", "all"))
        if level_name not in LEVELS:
            raise KilnError(f"targets.{target.name}.options.graph_optimization_level '{level_name}' is not one of {', '.join(LEVELS)}")
        so = _options(target, LEVELS[level_name])
        so.optimized_model_filepath = str(engine_dir / OPTIMIZED)
        # Creating the session runs the optimisers and writes the optimised graph.
        ort.InferenceSession(str(source.onnx_path), so, providers=["CPUExecutionProvider"])
        return {"executed_precision": "fp32", "graph_optimization_level": level_name, "provider": "CPUExecutionProvider"}

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> OrtSession:
        # The saved graph is already optimised (with layouts for this CPU): optimising it again is wasted work.
        so = _options(target, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        return OrtSession(ort.InferenceSession(str(engine_dir / OPTIMIZED), so, providers=["CPUExecutionProvider"]))


RUNTIME = OnnxRuntimeRuntime()
