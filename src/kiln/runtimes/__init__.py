"""Runtimes behind one protocol.

Each runtime is one module here exposing `RUNTIME`, an object with:

- `name`, `precisions` (what it can be asked for), `libraries` (the packages whose
  versions an engine depends on);
- `unavailable_reason(target) -> str | None`: why it cannot build/run `target` here;
- `build(target, source, engine_dir) -> dict`: write the engine files into `engine_dir`
  and return manifest fields (at least `executed_precision`);
- `load(engine_dir, manifest, target) -> Session`: a session with
  `input_names`, `output_names` and `infer(feeds) -> dict[str, np.ndarray]`;
- for runtimes offering int8: `calibrate(target, onnx_path, calibration_set, settings, out_dir) -> dict`,
  which writes the runtime's quantized model into `out_dir` for `build` to pick up.

Optional parts of the protocol, used where present:

- `build` may return `graph`: what the compiler did, for the report's "where did the speed come
  from" table: `{"nodes_in": int, "nodes_out": int, "fusions": {"Conv+BatchNorm+Relu": 12, ...},
  "layer_precisions": {"f32": 40, "u8": 12}, "source": "how nodes_out was counted"}` (any key may be
  missing where the runtime cannot say), and `compile_seconds` for ahead-of-time compilers;
- a session may have `time_ms(feeds) -> float`: run one inference and return its time measured on
  the device (CUDA events); the benchmark then uses it instead of the host clock.

Stages and the benchmark only talk to this protocol; adding a runtime is adding a module
and a line in RUNTIMES. Importing this package imports no framework.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from ..config import ModelSpec, Target, close_matches
from ..errors import KilnError

# runtime name -> module; modules are imported only when a target uses them.
RUNTIMES = {
    "torch": "kiln.runtimes.torch",
    "onnxruntime": "kiln.runtimes.onnxruntime",
    "openvino": "kiln.runtimes.openvino",
    "tensorrt": "kiln.runtimes.tensorrt",
}


@dataclass(frozen=True)
class BuildSource:
    """What a build starts from: the validated ONNX graph, the model spec for runtimes that run PyTorch,
    and the target's calibration folder for precisions that need one."""

    onnx_path: Path
    model: ModelSpec
    calibration_dir: Path | None = None


class Session(Protocol):
    input_names: list[str]
    output_names: list[str]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Runtime(Protocol):
    name: str
    precisions: tuple[str, ...]
    libraries: tuple[str, ...]

    def unavailable_reason(self, target: Target) -> str | None: ...

    def build(self, target: Target, source: BuildSource, engine_dir: Path) -> dict[str, Any]: ...

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> Session: ...


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise KilnError(f"unknown runtime '{name}'{close_matches(name, RUNTIMES)}; runtimes: {', '.join(RUNTIMES)}")
    module = importlib.import_module(RUNTIMES[name])
    return module.RUNTIME  # type: ignore[no-any-return]
