"""PyTorch in three modes, chosen by the target's `options.mode`:

- `eager` (the default): the fp32 baseline every speed-up is measured against. The engine folder
  holds the model's spec and weights; loading rebuilds the module from the spec (eager execution
  needs the model's Python code anyway) and loads the weights.
- `compile`: `torch.compile` with inductor. Same engine files as eager plus torch's portable
  compile caches (`torch.compiler.save_cache_artifacts()`) and Inductor's compiled C++ kernels
  (`inductor_kernels.tar`, the build's TORCHINDUCTOR_CACHE_DIR): the build compiles once and times it,
  loading rebuilds the module, hot-loads the caches and compiles again, warm. (With freezing on the
  CPU the FX graph cache keeps nothing: oneDNN-packed weights cannot be pickled; the manifest's
  `compile_cache.why` says so. Tracing and lowering then run again at load, the C++ compiler does not.)
- `aoti`: `torch.export` + AOTInductor. The engine folder holds a `.pt2` package (compiled code
  and frozen weights); loading it needs neither the model's code nor a compiler.

Options (`targets.<name>.options`):

- `mode`: eager | compile | aoti
- `compile_mode` (compile only): torch.compile's mode: default | reduce-overhead | max-autotune |
  max-autotune-no-cudagraphs
- `freezing` (compile, aoti; default true): inductor freezing: weights become constants, so
  Conv+BatchNorm fold and oneDNN weights are pre-packed at compile time.

Precisions: fp32 everywhere, bf16 on CPUs with native bf16 and on CUDA, fp16 on CUDA. Reduced
precision is autocast, traced into the compiled graph (the way PyTorch's own inductor benchmarks
run bf16, `--amp`): weights stay fp32 in the model and, with freezing, inductor constant-folds
their casts, so the compiled engine holds bf16 weights without kiln converting the model by hand;
numerically sensitive ops (softmax, norms, reductions) stay fp32 as autocast's op lists say.

Batch sizes: compiled engines accept exactly the target's profile [min, max]; `infer` refuses a
batch outside it before calling into torch (AOTInductor itself does not check the upper bound).
AOTInductor declares the batch axis as `torch.export.Dim("batch", min, max)`. torch.compile
marks it dynamic without bounds: dynamo's guards split a range anyway (CPU convolutions guard on
batch >= 16 when choosing their backend, batch 1 is specialised), and bounded `mark_dynamic` turns
such a guard into an error. Instead the build and the load compile the profile's min, opt and max
up front, so every graph a profile batch needs exists before the first timed inference.

Devices: cpu, cuda, cuda:N. CUDA sessions move inputs to the device, return CPU arrays, and offer
`time_ms` (CUDA events around the forward pass only, inputs already on the device).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from kiln.config.views import Target, default_threads
from kiln.core.errors import KilnError
from kiln.runtimes import BuildSource, Knob, RegisteredRuntime, runtime_options

if TYPE_CHECKING:
    from kiln.runtimes.torch.engine import TorchSession

# The runtime object and its options import no torch: the configure stage checks every target's options, and
# importing torch for that cost it ~2 s a run. Building and loading engines (kiln.runtimes.torch.engine) import it.


@dataclass(frozen=True)
class TorchOptions:
    """`targets.<name>.options` of a torch target."""

    mode: Literal["eager", "compile", "aoti"] = field(default="eager", metadata={"doc": "eager, compile or aoti"})
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = field(
        default=None, metadata={"doc": "mode compile only; null: torch.compile's default"}
    )
    freezing: bool | None = field(default=None, metadata={"doc": "modes compile and aoti; null: true"})
    channels_last: bool | None = field(
        default=None, metadata={"doc": "mode eager: NHWC weights and inputs; null: on for bf16 on the CPU (oneDNN's bf16 layout)"}
    )

    def check(self, where: str) -> None:
        if self.channels_last is not None and self.mode != "eager":
            raise KilnError(f"{where}.channels_last applies to mode eager only (this target's mode is {self.mode})")
        if self.compile_mode is not None and self.mode != "compile":
            raise KilnError(f"{where}.compile_mode applies to mode compile only (this target's mode is {self.mode})")
        if self.freezing is not None and self.mode == "eager":
            raise KilnError(f"{where}.freezing applies to modes compile and aoti only (this target's mode is eager)")

    @property
    def compile_mode_or_default(self) -> str:
        return self.compile_mode or "default"

    @property
    def freeze(self) -> bool:
        return self.freezing is not False


def knobs(target: Target) -> tuple[Knob, ...]:
    """What kiln.measure.tuning may try for a torch target. Compiler settings are new builds, each a full compile:
    the tuning budget decides whether there is time for them."""
    cores = default_threads()
    threads = Knob("threads", tuple(sorted({cores, max(1, cores // 2)})), doc="torch.set_num_threads")
    settings = runtime_options(RUNTIME, target)
    mode = settings.mode
    if mode == "eager":
        return (Knob("channels_last", (not channels_last_for(settings, target),)), threads)
    if mode == "compile":
        return (Knob("compile_mode", ("max-autotune-no-cudagraphs",), rebuild=True), Knob("freezing", (False,), rebuild=True), threads)
    return (Knob("freezing", (False,), rebuild=True), threads)


def channels_last_for(settings: TorchOptions, target: Target) -> bool:
    if settings.channels_last is not None:
        return settings.channels_last
    return device_type(target) == "cpu" and target.precision == "bf16"


def device_type(target: Target) -> str:
    """'cpu' or 'cuda', from the target's device ('cpu', 'cuda', 'cuda:N')."""
    d = target.device
    if d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        return d.partition(":")[0]
    raise KilnError(f"targets.{target.name}.device '{d}' is not one the torch runtime knows: cpu, cuda or cuda:N")


def _has_cxx() -> str | None:
    names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return next((p for p in (shutil.which(n) for n in names if n) if p), None)


def executed_precision(precision: str) -> str:
    return "fp32" if precision == "fp32" else f"{precision} autocast"


class TorchRuntime(RegisteredRuntime):
    name = "torch"
    options_type = TorchOptions

    def unavailable_reason(self, target: Target) -> str | None:
        settings = runtime_options(self, target)  # a bad option is a config error on every machine
        if device_type(target) == "cuda":
            from kiln.runtimes.torch.engine import cuda_unavailable_reason

            return cuda_unavailable_reason(target, settings)
        if target.precision == "fp16":
            return (
                "fp16 runs on CUDA only in the torch runtime (PyTorch's CPU fp16 kernels are slow fallbacks): "
                "use bf16 or fp32 on CPU, or device cuda"
            )
        if target.precision == "bf16":
            from kiln.runtimes.fingerprint import collect

            cpu = collect()["hardware"]["cpu"]
            if not set(cpu["features"]) & {"avx512_bf16", "amx_bf16", "bf16"}:
                # oneDNN then emulates bf16: measured here ~7x slower than fp32 on ResNet-18.
                return f"{cpu['model']} has no native bf16 (no AVX512-BF16/AMX/Arm BF16): PyTorch would emulate it, slower than fp32"
        if settings.mode in ("compile", "aoti") and not _has_cxx():
            return f"torch {settings.mode} on CPU needs a C++ compiler (inductor compiles C++): none found (CXX, g++, c++, clang++)"
        return None

    def build(self, target: Target, source: BuildSource, engine_dir: Path) -> dict[str, Any]:
        from kiln.runtimes.torch.engine import build

        return build(target, runtime_options(self, target), source, engine_dir)

    def knobs(self, target: Target) -> tuple[Knob, ...]:
        return knobs(target)

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> TorchSession:
        from kiln.runtimes.torch.engine import load

        return load(engine_dir, manifest, target, runtime_options(self, target))


RUNTIME = TorchRuntime()
