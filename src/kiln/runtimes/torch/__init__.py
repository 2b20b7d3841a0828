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

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch

from kiln.config.views import ModelSpec, ShapeProfile, Target, default_threads
from kiln.core.errors import KilnError, first_line
from kiln.export.models import apply_state_dict, build_model
from kiln.runtimes import BuildSource, Knob, RegisteredRuntime, runtime_options
from kiln.runtimes.torch.compile import (
    EngineModule,
    aten_ops,
    compile_engine,
    compile_graph_info,
    counter_diff,
    example_batch,
    example_inputs,
    fresh_cache_artifacts,
    inductor_cache_dir,
    inductor_counters,
    pack_inductor_cache,
    unpack_inductor_cache,
)

log = logging.getLogger(__name__)

WEIGHTS = "state_dict.pt"
SPEC = "model.json"
PACKAGE = "model.pt2"  # aoti: the AOTInductor package
COMPILE_CACHE = "compile_cache.bin"  # compile: torch.compiler.save_cache_artifacts() bytes
KERNELS = "inductor_kernels.tar"  # compile: Inductor's compiled C++ kernels, so a load skips the C++ compiler

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        return (Knob("channels_last", (not _channels_last(settings, target),)), threads)
    if mode == "compile":
        return (Knob("compile_mode", ("max-autotune-no-cudagraphs",), rebuild=True), Knob("freezing", (False,), rebuild=True), threads)
    return (Knob("freezing", (False,), rebuild=True), threads)


def _channels_last(settings: TorchOptions, target: Target) -> bool:
    if settings.channels_last is not None:
        return settings.channels_last
    return _device(target).type == "cpu" and target.precision == "bf16"


def _device(target: Target) -> torch.device:
    d = target.device
    if d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        return torch.device(d)
    raise KilnError(f"targets.{target.name}.device '{d}' is not one the torch runtime knows: cpu, cuda or cuda:N")


def _has_cxx() -> str | None:
    names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return next((p for p in (shutil.which(n) for n in names if n) if p), None)


def _executed(precision: str) -> str:
    return "fp32" if precision == "fp32" else f"{precision} autocast"


class TorchSession:
    """One `infer` for every mode: inputs to the device, a batch check for compiled engines, CPU arrays out."""

    def __init__(
        self,
        fn: Callable[..., Any],
        input_names: list[str],
        output_names: list[str],
        device: torch.device,
        target: Target,
        mode: str,
        channels_last: bool = False,
    ):
        self.fn = fn
        self.input_names = input_names
        self.output_names = output_names
        self.device = device
        self.mode = mode
        self.target_name = target.name
        # Compiled engines were compiled for the profile's batch sizes; eager runs any batch.
        self.profile: ShapeProfile | None = None if mode == "eager" else target.profile
        self.channels_last = channels_last
        # torch's thread count is per process: a session sets its own before each call, so two sessions
        # with different threads (kiln.measure.tuning compares them in turns) each run with theirs.
        self.threads = target.effective_threads if device.type == "cpu" else None
        self.load_seconds: float | None = None  # set by load: rebuild + (re)compile or package load + warm-up
        # Eager forward passes in inference mode are safe from several threads. A torch.compile'd function may
        # re-trace or re-compile on a call (dynamo's caches are not documented as thread-safe) and an AOTInductor
        # package is loaded here with one runner: compiled engines take one call at a time.
        self.max_concurrent: int | None = None if mode == "eager" else 1

    def _tensors(self, feeds: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KilnError(f"engine '{self.target_name}' needs inputs {self.input_names}; missing {missing}")
        arrays = [np.asarray(feeds[n]) for n in self.input_names]
        if self.profile is not None:
            batches = {a.shape[0] if a.ndim else None for a in arrays}
            batch = next(iter(batches))
            if len(batches) != 1 or batch is None or not self.profile.contains(batch):
                p = self.profile
                got = ", ".join(f"{n} {list(a.shape)}" for n, a in zip(self.input_names, arrays))
                raise KilnError(
                    f"engine '{self.target_name}' (torch {self.mode}) was compiled for batch sizes {p.min}..{p.max} "
                    f"(targets.{self.target_name}.profile min={p.min} opt={p.opt} max={p.max}); got {got}: "
                    f"feed a batch inside the profile or widen the profile and rebuild"
                )
        tensors = []
        for a in arrays:
            t = torch.from_numpy(np.ascontiguousarray(a))
            if self.device.type != "cpu":
                t = t.to(self.device, non_blocking=True)
            if self.channels_last and t.dim() == 4:
                t = t.to(memory_format=torch.channels_last)
            tensors.append(t)
        return tensors

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Inputs are made inside inference mode too, like the compile's warm-up batches: dynamo
        # guards on a tensor's dispatch keys, and a plain tensor after inference ones recompiles.
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.fn(*self._tensors(feeds))
        if isinstance(out, torch.Tensor):
            out = (out,)
        # .cpu() waits for a CUDA stream; on CPU it is a no-op.
        return {
            n: t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
            for n, t in zip(self.output_names, out)
        }


class CudaTorchSession(TorchSession):
    def time_ms(self, feeds: Mapping[str, np.ndarray]) -> float:
        """One forward pass timed with CUDA events on the session's stream (copies to and from the host excluded)."""
        with torch.inference_mode(), torch.cuda.device(self.device):
            tensors = self._tensors(feeds)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.fn(*tensors)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))


class _AotiPackage:
    """An AOTInductor package, run through torch's C++ loader directly.

    torch._inductor.aoti_load_package wraps the same loader, but importing torch._inductor costs
    ~2 s of Python imports (measured here) before the first batch, and its wrapper re-parses the
    call spec on every call. kiln's compiled graph takes positional tensors and returns a flat
    tuple, so the wrapper's pytree handling is not needed."""

    def __init__(self, path: Path, device: torch.device):
        index = device.index if device.index is not None else -1
        try:
            self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
            self.run = self.loader.boxed_run
        except (AttributeError, TypeError, RuntimeError):  # another torch's loader: use the public API
            loaded = torch._inductor.aoti_load_package(str(path), device_index=index)
            self.run = lambda flat: loaded(*flat)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.run(list(inputs)))


class TorchRuntime(RegisteredRuntime):
    name = "torch"
    options_type = TorchOptions

    def unavailable_reason(self, target: Target) -> str | None:
        settings = runtime_options(self, target)  # a bad option is a config error on every machine
        device = _device(target)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return (
                    f"no CUDA device here (torch.cuda.is_available() is False; torch {torch.__version__}, CUDA build {torch.version.cuda})"
                )
            index = device.index or 0
            if index >= torch.cuda.device_count():
                return f"device '{target.device}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            if target.precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
                return f"{torch.cuda.get_device_name(index)} has no native bf16"
            if settings.mode in ("compile", "aoti"):
                from torch.utils._triton import has_triton

                if not has_triton():
                    return f"torch {settings.mode} on CUDA needs Triton, which is not installed"
            return None
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

    # ---- build ---------------------------------------------------------------------------------

    def build(self, target: Target, source: BuildSource, engine_dir: Path) -> dict[str, Any]:
        import onnx

        settings = runtime_options(self, target)
        device = _device(target)
        model = build_model(source.model)
        # The engine's saved weights already hold the checkpoint and any demo_weights: loading rebuilds the
        # architecture only, instead of re-estimating BatchNorm on every load.
        spec = {**source.model.to_params(), "checkpoint": None, "weights": None, "demo": None}
        # The ONNX graph's output names are the names every runtime answers with.
        outputs = [o.name for o in onnx.load(str(source.onnx_path), load_external_data=False).graph.output]
        (engine_dir / SPEC).write_text(json.dumps({"model": spec, "outputs": outputs}, indent=2) + "\n", encoding="utf-8")
        extra: dict[str, Any] = {"executed_precision": _executed(target.precision), "mode": settings.mode}
        if settings.mode != "aoti":  # an AOTInductor package carries its own (frozen) weights
            torch.save(model.state_dict(), engine_dir / WEIGHTS)
        if settings.mode == "eager":
            return extra
        torch.set_num_threads(target.effective_threads)
        served = EngineModule(model, outputs, device.type, DTYPES[target.precision]).to(device).eval()
        p = target.profile
        extra.update(freezing=settings.freeze, batch={"min": p.min, "max": p.max, "example": example_batch(p)})
        if settings.mode == "compile":
            extra.update(self._build_compiled(served, source.model, target, settings, device, engine_dir))
        else:
            extra.update(self._build_aoti(served, source.model, target, settings, device, engine_dir))
        return extra

    def _build_compiled(
        self, served: EngineModule, spec: ModelSpec, target: Target, settings: TorchOptions, device: torch.device, engine_dir: Path
    ) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="kiln-inductor-") as tmp, inductor_cache_dir(Path(tmp)), fresh_cache_artifacts():
            _, seconds, counts = compile_engine(served, spec, target, settings, device)
            saved = torch.compiler.save_cache_artifacts()
            kernels = pack_inductor_cache(Path(tmp), engine_dir / KERNELS)
        if saved:
            (engine_dir / COMPILE_CACHE).write_bytes(saved[0])
            cache: dict[str, Any] = {"file": COMPILE_CACHE, "bytes": len(saved[0])}
        else:
            why = "torch.compiler.save_cache_artifacts() returned nothing: inductor's FX graph cache bypassed these graphs"
            if settings.freeze and device.type == "cpu":
                why += " (with freezing on CPU they hold oneDNN-packed weights, which cannot be pickled); loading recompiles from scratch"
            cache = {"file": None, "why": why}
        cache["kernels"] = {"file": KERNELS, "bytes": kernels}
        return {
            "compile_mode": settings.compile_mode_or_default,
            "compile_seconds": round(seconds, 3),
            "compiled_graphs": counts["unique_graphs"] or None,
            "compile_cache": cache,
            "graph": compile_graph_info(counts["calls_captured"], counts, "the graphs dynamo captured"),
        }

    def _build_aoti(
        self, served: EngineModule, spec: ModelSpec, target: Target, settings: TorchOptions, device: torch.device, engine_dir: Path
    ) -> dict[str, Any]:
        p = target.profile
        example = example_inputs(spec, example_batch(p), device)
        dynamic_shapes = None
        if p.min < p.max:
            batch = torch.export.Dim("batch", min=p.min, max=p.max)
            dynamic_shapes = (tuple({0: batch} for _ in example),)  # forward(*inputs): one tuple for the varargs
        start = time.perf_counter()
        try:
            exported = torch.export.export(served, tuple(example), dynamic_shapes=dynamic_shapes)
        except Exception as e:
            first = first_line(e)
            raise KilnError(f"targets.{target.name}: torch.export could not export the model with batch {p.min}..{p.max}: {first}") from e
        export_seconds = time.perf_counter() - start
        before = inductor_counters()
        package = engine_dir / PACKAGE
        # Inductor freezes only without autograd (compile_fx checks torch.is_grad_enabled()): with grad
        # on, `freezing: True` is silently ignored (measured: no Conv+BN folding, no oneDNN weight packing).
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package), inductor_configs={"freezing": settings.freeze})
        seconds = time.perf_counter() - start
        counts = counter_diff(before, inductor_counters())
        # What serving pays before its first answer: load the package and run one batch.
        start = time.perf_counter()
        loaded = _AotiPackage(package, device)
        with torch.inference_mode():
            loaded(*example)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first = time.perf_counter() - start
        return {
            "export_seconds": round(export_seconds, 3),
            "compile_seconds": round(seconds, 3),
            "load_first_batch_seconds": round(first, 3),
            "package_bytes": package.stat().st_size,
            "graph": compile_graph_info(aten_ops(exported.graph_module), counts, "the exported program"),
        }

    # ---- load ----------------------------------------------------------------------------------

    def knobs(self, target: Target) -> tuple[Knob, ...]:
        return knobs(target)

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> TorchSession:
        start = time.perf_counter()
        settings = runtime_options(self, target)
        if settings.mode != manifest.get("mode", "eager"):
            raise KilnError(
                f"engine '{manifest.get('target')}' was built in torch mode '{manifest.get('mode', 'eager')}', "
                f"but targets.{target.name}.options.mode is now '{settings.mode}': rebuild it"
            )
        device = _device(target)
        torch.set_num_threads(target.effective_threads)
        saved = json.loads((engine_dir / SPEC).read_text(encoding="utf-8"))
        input_names = list(saved["model"]["inputs"])  # ModelSpec.to_params: name -> {shape, dtype}, in order
        cls = CudaTorchSession if device.type == "cuda" else TorchSession
        if settings.mode == "aoti":
            # No model code here: the package holds the compiled graph and its weights.
            path = engine_dir / PACKAGE
            if not path.is_file():
                raise KilnError(f"{engine_dir} has no {PACKAGE}: rebuild it with `dvc repro build@{target.name}`")
            session = cls(_AotiPackage(path, device), input_names, saved["outputs"], device, target, "aoti")
            if manifest.get("profile"):  # the batch range the package was exported with, whatever params say now
                session.profile = ShapeProfile(**manifest["profile"])
            session.load_seconds = time.perf_counter() - start
            return session
        spec = ModelSpec.from_params(saved["model"])
        model = build_model(spec)
        apply_state_dict(
            model, torch.load(engine_dir / WEIGHTS, map_location="cpu", weights_only=True), f"engine weights {engine_dir / WEIGHTS}"
        )
        model.eval()
        dtype = DTYPES[target.precision]
        if settings.mode == "eager":
            # bf16 on CPU: autocast on channels-last tensors, the layout oneDNN's bf16 kernels want.
            channels_last = _channels_last(settings, target)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            served = EngineModule(model, saved["outputs"], device.type, dtype).to(device).eval()
            session = cls(served, input_names, saved["outputs"], device, target, "eager", channels_last=channels_last)
        else:
            served = EngineModule(model, saved["outputs"], device.type, dtype).to(device).eval()
            cache = engine_dir / COMPILE_CACHE
            if cache.is_file():
                torch.compiler.load_cache_artifacts(cache.read_bytes())
            kernels = engine_dir / KERNELS
            # The build's compiled kernels: tracing and lowering run again, the C++ compiler does not.
            warm = inductor_cache_dir(unpack_inductor_cache(kernels)) if kernels.is_file() else contextlib.nullcontext()
            with warm:
                compiled, seconds, _ = compile_engine(served, spec, target, settings, device)
            session = cls(compiled, input_names, saved["outputs"], device, target, "compile")
            session.compile_seconds = seconds  # type: ignore[attr-defined]
        session.load_seconds = time.perf_counter() - start
        return session


RUNTIME = TorchRuntime()
