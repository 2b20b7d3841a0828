"""The torch runtime's engines: build, load and the sessions (kiln.runtimes.torch holds the runtime object and its options,
which the configure stage checks without importing torch: ~2 s a run)."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from kiln.config.views import ModelSpec, ShapeProfile, Target
from kiln.core.errors import KilnError, first_line
from kiln.export.models import apply_state_dict, build_model
from kiln.runtimes import BuildSource
from kiln.runtimes.torch import TorchOptions, channels_last_for, device_type, executed_precision
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

WEIGHTS = "state_dict.pt"
SPEC = "model.json"
PACKAGE = "model.pt2"  # aoti: the AOTInductor package
COMPILE_CACHE = "compile_cache.bin"  # compile: torch.compiler.save_cache_artifacts() bytes
KERNELS = "inductor_kernels.tar"  # compile: Inductor's compiled C++ kernels, so a load skips the C++ compiler

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_device(target: Target) -> torch.device:
    device_type(target)  # a device the runtime does not know: its error
    return torch.device(target.device)


def cuda_unavailable_reason(target: Target, settings: TorchOptions) -> str | None:
    """Why `target` (device cuda or cuda:N) cannot run here, or None."""
    device = torch_device(target)
    if not torch.cuda.is_available():
        return f"no CUDA device here (torch.cuda.is_available() is False; torch {torch.__version__}, CUDA build {torch.version.cuda})"
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


def build(target: Target, settings: TorchOptions, source: BuildSource, engine_dir: Path) -> dict[str, Any]:
    """The torch runtime's build (kiln.runtimes.torch.TorchRuntime.build): the engine files and the manifest's fields."""
    import onnx

    device = torch_device(target)
    model = build_model(source.model)
    # The engine's saved weights already hold the checkpoint and any demo_weights: loading rebuilds the
    # architecture only, instead of re-estimating BatchNorm on every load.
    spec = {**source.model.to_params(), "checkpoint": None, "weights": None, "demo": None}
    # The ONNX graph's output names are the names every runtime answers with.
    outputs = [o.name for o in onnx.load(str(source.onnx_path), load_external_data=False).graph.output]
    (engine_dir / SPEC).write_text(json.dumps({"model": spec, "outputs": outputs}, indent=2) + "\n", encoding="utf-8")
    extra: dict[str, Any] = {"executed_precision": executed_precision(target.precision), "mode": settings.mode}
    if settings.mode != "aoti":  # an AOTInductor package carries its own (frozen) weights
        torch.save(model.state_dict(), engine_dir / WEIGHTS)
    if settings.mode == "eager":
        return extra
    torch.set_num_threads(target.effective_threads)
    served = EngineModule(model, outputs, device.type, DTYPES[target.precision]).to(device).eval()
    p = target.profile
    extra.update(freezing=settings.freeze, batch={"min": p.min, "max": p.max, "example": example_batch(p)})
    if settings.mode == "compile":
        extra.update(_build_compiled(served, source.model, target, settings, device, engine_dir))
    else:
        extra.update(_build_aoti(served, source.model, target, settings, device, engine_dir))
    return extra


def _build_compiled(
    served: EngineModule, spec: ModelSpec, target: Target, settings: TorchOptions, device: torch.device, engine_dir: Path
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
    served: EngineModule, spec: ModelSpec, target: Target, settings: TorchOptions, device: torch.device, engine_dir: Path
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


def load(engine_dir: Path, manifest: Mapping[str, Any], target: Target, settings: TorchOptions) -> TorchSession:
    """The torch runtime's load (kiln.runtimes.torch.TorchRuntime.load)."""
    start = time.perf_counter()
    if settings.mode != manifest.get("mode", "eager"):
        raise KilnError(
            f"engine '{manifest.get('target')}' was built in torch mode '{manifest.get('mode', 'eager')}', "
            f"but targets.{target.name}.options.mode is now '{settings.mode}': rebuild it"
        )
    device = torch_device(target)
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
        channels_last = channels_last_for(settings, target)
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
