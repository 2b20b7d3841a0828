"""Runtimes behind one protocol. Adding a runtime is one module here and one line in RUNTIMES.

The line (a `RuntimeInfo`) holds what kiln must know without importing the runtime's framework:
the precisions it can be asked for, which of them need calibration data, and the libraries an
engine depends on with the pip distributions each ships as (the probe records their versions, so
engines re-build when one changes, and loading refuses an engine built with other versions).

The module exposes `RUNTIME`, an object that satisfies `Runtime`:

- `name`, `info` (its RuntimeInfo), `precisions` and `libraries` (from `info`);
- `options_type`: the dataclass its `targets.<name>.options` parse into (kiln.core.settings: unknown keys,
  types and defaults come from it, and the configure stage checks every target's options);
- `unavailable_reason(target) -> str | None`: why it cannot build/run `target` on this machine;
- `build(target, source, engine_dir) -> dict`: write the engine files into `engine_dir` and return
  manifest fields (at least `executed_precision`; optionally `graph`, what the compiler did:
  `{"nodes_in", "nodes_out", "fusions", "layer_precisions", "source"}`, and `compile_seconds`);
- `load(engine_dir, manifest, target) -> Session`: `input_names`, `output_names` and
  `infer(feeds) -> dict[str, np.ndarray]`, and `max_concurrent`: how many threads may be inside `infer` at
  once (None: any number; 1: one at a time). kiln.serving runs `serving.workers` threads on one session
  and refuses more than a session declares (`concurrency_limit`); a session keeps per-call state (an
  infer request, an execution context) per caller, e.g. in an `InstancePool`, so that several are safe.

Optional capabilities, each a protocol of its own that callers test with isinstance:

- `CalibratingRuntime`: `calibration_options_type` and `calibrate(...)`, which writes the runtime's
  quantized model for `build` to pick up; required of a runtime whose info lists calibrated precisions;
- `LayerInspectingRuntime`: `layer_activations(...)`, per-layer outputs of the fp32 and the quantized
  model, for the quantization sensitivity ranking;
- `DeviceTimedSession`: a session's `time_ms(feeds)`, one inference timed on the device (CUDA events),
  which the benchmark then uses instead of the host clock;
- `TunableRuntime`: `knobs(target) -> tuple[Knob, ...]`, the options (and thread counts) kiln.measure.tuning may
  search on this machine, declared next to the runtime's options dataclass;
- `ThroughputSession`: a session's `throughput(feeds, seconds, min_runs)`, images/s with several requests
  in flight (the runtime's own asynchronous or parallel API), for the benchmark's throughput mode;
- `BoundaryInspectingRuntime`: `boundary_activations(engine_dir, target, source_onnx, feeds) -> Boundaries`,
  a built engine's intermediate tensors where its fusions leave them, keyed by the source graph's tensor
  names, for kiln.diagnose.debug's first-divergence search (and how they were read: the engine's own kernels, or
  quantization simulated in f32 where the runtime cannot expose its fused kernels' outputs).

Stages and the benchmark only talk to these protocols. Importing this package imports no framework
(the probe reads RUNTIMES on every `dvc repro`).
"""

from __future__ import annotations

import importlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, Mapping, Protocol, TypeVar, runtime_checkable

from kiln.core.errors import KilnError, close_matches

if TYPE_CHECKING:
    import numpy as np

    from kiln.config.views import ModelSpec, Target
    from kiln.data.calibration_set import CalibrationSet, CalibrationSettings


@dataclass(frozen=True)
class RuntimeInfo:
    """What kiln knows of a runtime without importing it."""

    module: str
    precisions: tuple[str, ...]
    calibrated: tuple[str, ...] = ()  # precisions whose calibrate@<target> runs the runtime's quantizer
    libraries: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # library -> pip distributions it ships as
    # Shape profiles one engine can hold (TensorRT's optimization profiles, `options.profiles`); 1: only targets.<name>.profile.
    profiles: int = 1
    # Builds from the PyTorch model (its code and weights) rather than from the ONNX graph alone: its builds
    # depend on the model's files (artifacts/model-files.json), not only on the graph.
    from_model: bool = False


RUNTIMES: dict[str, RuntimeInfo] = {
    "torch": RuntimeInfo(
        "kiln.runtimes.torch", ("fp32", "bf16", "fp16"), libraries={"torch": ("torch",), "torchvision": ("torchvision",)}, from_model=True
    ),
    "onnxruntime": RuntimeInfo(
        "kiln.runtimes.onnxruntime",
        ("fp32", "int8"),
        ("int8",),
        {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")},
    ),
    "openvino": RuntimeInfo("kiln.runtimes.openvino", ("fp32", "bf16", "fp16", "int8"), ("int8",), {"openvino": ("openvino",)}),
    "tensorrt": RuntimeInfo(
        "kiln.runtimes.tensorrt",
        ("fp32", "fp16", "bf16", "int8", "fp8"),
        ("int8", "fp8"),
        {"tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")},
        profiles=8,  # TensorRT allows more; the serving advice never asks for more than a few
    ),
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


def concurrency_limit(session: Any) -> int | None:
    """How many threads may call `session.infer` at once: its `max_concurrent` (None: any number). kiln's
    runtimes all declare it; a session from elsewhere (a test's fake, a remote endpoint) that does not is
    taken as safe with any number, as an HTTP client is."""
    limit = getattr(session, "max_concurrent", None)
    return None if limit is None else int(limit)


T = TypeVar("T")


class InstancePool(Generic[T]):
    """Per-call state (an OpenVINO infer request, a TensorRT execution context and its stream) for sessions
    called from several threads: `with pool.take() as item:` hands each caller an instance no other caller
    holds, making a new one when all are busy and keeping it for later callers. As many exist as calls were
    ever in flight at once (the serving workers), and they outlive the threads (a run's workers are new
    threads each time, so thread-local state would be made again on every run)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._free: list[T] = []
        self._lock = threading.Lock()
        self.made = 0

    def _get(self) -> T:
        with self._lock:
            if self._free:
                return self._free.pop()
        item = self._make()
        with self._lock:
            self.made += 1
        return item

    @contextmanager
    def take(self) -> Iterator[T]:
        item = self._get()
        try:
            yield item
        finally:
            with self._lock:
                self._free.append(item)


@runtime_checkable
class DeviceTimedSession(Protocol):
    def time_ms(self, feeds: Mapping[str, np.ndarray]) -> float: ...


class Runtime(Protocol):
    name: str
    info: RuntimeInfo
    precisions: tuple[str, ...]
    libraries: tuple[str, ...]

    @property
    def options_type(self) -> type: ...  # read-only: a runtime's own dataclass is a subtype of `type`

    def unavailable_reason(self, target: Target) -> str | None: ...

    def build(self, target: Target, source: BuildSource, engine_dir: Path) -> dict[str, Any]: ...

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> Session: ...


@runtime_checkable
class CalibratingRuntime(Protocol):
    @property
    def calibration_options_type(self) -> type: ...

    def calibrate(
        self, target: Target, onnx_path: Path, calib: CalibrationSet, settings: CalibrationSettings, out_dir: Path
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Knob:
    """One setting kiln.measure.tuning may change: a field of the runtime's options dataclass, or `threads` (the target's).

    `values` are the candidates besides the target's own value; `rebuild` says a value takes effect only in a
    new build (a compiler setting), where the others take effect when the engine is loaded."""

    name: str
    values: tuple[Any, ...]
    rebuild: bool = False
    doc: str = ""


@runtime_checkable
class TunableRuntime(Protocol):
    def knobs(self, target: Target) -> tuple[Knob, ...]: ...


@runtime_checkable
class ThroughputSession(Protocol):
    def throughput(self, feeds: Mapping[str, np.ndarray], seconds: float, min_runs: int) -> dict[str, Any]: ...


@dataclass
class Boundaries:
    """Intermediate tensors of one engine (or of the fp32 graph), keyed by the source ONNX graph's tensor names.

    `mode`: "engine" (read from the engine's own kernels; its final outputs were checked unchanged by the reading),
    "simulated" (quantization simulated in f32: same scales, not the same kernels) or "outputs only"; `note` says
    how, in a sentence the report shows."""

    mode: str
    note: str
    tensors: dict[str, Any]


@runtime_checkable
class BoundaryInspectingRuntime(Protocol):
    def boundary_activations(self, engine_dir: Path, target: Target, source_onnx: Path, feeds: Mapping[str, np.ndarray]) -> Boundaries: ...


@runtime_checkable
class LayerInspectingRuntime(Protocol):
    def layer_activations(
        self, onnx_path: Path, calibration_dir: Path, feeds: Mapping[str, np.ndarray]
    ) -> list[tuple[str, np.ndarray, np.ndarray]]: ...


class RegisteredRuntime:
    """Base of the runtime classes: `name` picks the registry line, which gives `info`, `precisions` and `libraries`."""

    name: str
    info: RuntimeInfo
    precisions: tuple[str, ...]
    libraries: tuple[str, ...]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.info = RUNTIMES[cls.name]
        cls.precisions = cls.info.precisions
        cls.libraries = tuple(cls.info.libraries)


def runtime_info(name: str) -> RuntimeInfo:
    if name not in RUNTIMES:
        raise KilnError(f"unknown runtime '{name}'{close_matches(name, RUNTIMES)}; runtimes: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def get_runtime(name: str) -> Runtime:
    module = importlib.import_module(runtime_info(name).module)
    return module.RUNTIME  # type: ignore[no-any-return]


def runtime_options(runtime: Runtime, target: Target) -> Any:
    """`targets.<name>.options` parsed into the runtime's options dataclass (defaults filled, types checked)."""
    from kiln.core.settings import parse

    return parse(runtime.options_type, target.options, f"targets.{target.name}.options")


# The precision of a target that names none: the reference every other precision is judged against.
DEFAULT_PRECISION = "fp32"


def is_calibrated(runtime: str, precision: str | None = None) -> bool:
    """Whether `precision` (DEFAULT_PRECISION when a target names none) on `runtime` needs calibration data
    (False for a runtime kiln does not know: Target.from_params and configure name that)."""
    info = RUNTIMES.get(runtime)
    return info is not None and (precision or DEFAULT_PRECISION) in info.calibrated


def needs_calibration(target: Target) -> bool:
    return is_calibrated(target.runtime, target.precision)


def check_precision(target: Target) -> None:
    """A precision the runtime never offers is a config error on every machine."""
    offered = runtime_info(target.runtime).precisions
    if target.precision not in offered:
        raise KilnError(
            f"targets.{target.name}.precision '{target.precision}': runtime '{target.runtime}' does not offer precision "
            f"'{target.precision}'; it offers {', '.join(offered)}"
        )


@dataclass(frozen=True)
class NoOptions:
    """A runtime (or its calibration) that takes no options: any key is refused."""


def skip_reason(target: Target) -> str | None:
    """Why this machine cannot run `target`, for a target marked `required: false`; None when it can.

    A precision the runtime never offers is a config error and raises for every target; a
    target this machine cannot run raises unless it is optional (a CPU set shared by machines
    with and without bf16, say), in which case it is skipped and the report says why.
    """
    check_precision(target)
    reason = get_runtime(target.runtime).unavailable_reason(target)
    if reason and target.required:
        raise KilnError(
            f"targets.{target.name}: cannot build on this machine: {reason} (mark the target `required: false` to skip it on such machines)"
        )
    return reason
