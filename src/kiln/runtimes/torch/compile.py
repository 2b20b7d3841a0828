"""The torch runtime's compiler side: the module a compiled engine runs (EngineModule), torch.compile with
the profile's batches compiled up front, and what Inductor did (its counters, as the report's "graph").
kiln.runtimes.torch holds the modes, the sessions and the engine files."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tarfile
import tempfile
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from kiln.config.views import ModelSpec, ShapeProfile, Target
from kiln.core.errors import KilnError, first_line
from kiln.export.models import flatten_outputs

if TYPE_CHECKING:
    from kiln.runtimes.torch import TorchOptions


class EngineModule(torch.nn.Module):
    """The model as a compiled engine serves it: positional inputs, autocast inside the graph (so
    torch.export and dynamo both capture it), float outputs as a tuple in the ONNX names' order."""

    def __init__(self, model: torch.nn.Module, output_names: list[str], device_type: str, dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.output_names = tuple(output_names)
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.model(*inputs)
        tensors = flatten_outputs(out, self.output_names).values()
        return tuple(t.float() if t.is_floating_point() else t for t in tensors)


def example_batch(profile: ShapeProfile) -> int:
    """The batch to compile and export at: opt, but never 1 when the profile allows more (torch
    specialises size-1 dims to a constant)."""
    return profile.opt if profile.opt > 1 or profile.max == 1 else min(2, profile.max)


def example_inputs(spec: ModelSpec, batch: int, device: torch.device) -> list[torch.Tensor]:
    from kiln.data.inputs import make_inputs

    feeds = make_inputs(spec.inputs, batch, seed=0)
    return [torch.from_numpy(feeds[i.name]).to(device) for i in spec.inputs]


def inductor_counters() -> dict[str, int]:
    """Inductor's process-wide counters, to diff around one compile."""
    from torch._dynamo.utils import counters
    from torch._inductor import metrics

    inductor = counters["inductor"]
    # Per-pass rewrite counts: binary_folding (Conv+BatchNorm/Add/Mul folded into weights),
    # mkldnn_conv_weight_pack, mkldnn_unary_fusion (Conv+ReLU), ...
    fusions = {
        f"fusion:{k[: -len('_matcher_count')]}": int(v)
        for k, v in inductor.items()
        if k.endswith("_matcher_count") and k != "pattern_matcher_count"
    }
    if inductor.get("binary_folding"):
        fusions["fusion:binary_folding"] = int(inductor["binary_folding"])
    return {
        "kernels": int(metrics.generated_kernel_count),
        "extern_calls": int(inductor.get("extern_calls", 0)),
        "pattern_matcher_count": int(inductor.get("pattern_matcher_count", 0)),
        "calls_captured": int(counters["stats"].get("calls_captured", 0)),
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        **fusions,
    }


def counter_diff(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    # Some torch entry points reset the counters: a negative difference means "counted from zero".
    return {k: after[k] - before.get(k, 0) if after[k] >= before.get(k, 0) else after[k] for k in after}


def compile_graph_info(nodes_in: int | None, c: Mapping[str, int], what: str) -> dict[str, Any]:
    graph: dict[str, Any] = {}
    if nodes_in:
        graph["nodes_in"] = nodes_in
    if c["kernels"] or c["extern_calls"]:
        graph["nodes_out"] = c["kernels"] + c["extern_calls"]
    fusions = {k[len("fusion:") :]: v for k, v in c.items() if k.startswith("fusion:") and v}
    if fusions:
        graph["fusions"] = fusions
    graph["source"] = (
        f"nodes_in: ATen ops in {what}; nodes_out: kernels inductor generated ({c['kernels']}) plus calls into "
        f"library kernels such as oneDNN/BLAS ({c['extern_calls']}), from torch._inductor.metrics and dynamo counters; "
        f"fusions: inductor's pattern-matcher passes (binary_folding: Conv+BatchNorm folded into the weights)"
    )
    return graph


def aten_ops(gm: torch.fx.GraphModule) -> int:
    """ATen operators in an exported graph, inside higher-order ops' subgraphs too."""
    n = 0
    for m in gm.modules():
        if isinstance(m, torch.fx.GraphModule):
            n += sum(
                1
                for node in m.graph.nodes
                if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and "assert" not in str(node.target)
            )
    return n


@contextlib.contextmanager
def fresh_cache_artifacts():
    """Collect only this compile's cache artifacts (save_cache_artifacts otherwise returns everything the process compiled)."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        ctx = CacheArtifactManager.with_fresh_cache()
    except (ImportError, AttributeError):  # private API moved: fall back to the process-wide set
        ctx = contextlib.nullcontext()
    with ctx:
        yield


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@contextlib.contextmanager
def inductor_cache_dir(folder: Path) -> Iterator[Path]:
    """Inductor's on-disk cache in `folder` for what runs inside. The C++ it generates is compiled to a shared
    object named by the source's hash, and skipped when that object exists: with freezing on the CPU nothing
    else can be cached (the FX graph cache bypasses graphs holding oneDNN-packed weights), so this is what lets
    a load skip the C++ compiler. Inductor reads the variable on every use (cache_dir_utils.cache_dir)."""
    before = os.environ.get(INDUCTOR_CACHE_ENV)
    _clear_memory_caches()
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)
    try:
        yield folder
    finally:
        _clear_memory_caches()
        if before is None:
            os.environ.pop(INDUCTOR_CACHE_ENV, None)
        else:
            os.environ[INDUCTOR_CACHE_ENV] = before


def _clear_memory_caches() -> None:
    """Inductor keeps the kernels it loaded in memory, keyed by source hash: a kernel an earlier compile in this
    process made (another engine, a test) is then not written to the new folder, and a later load misses it.
    torch's own fresh_cache() clears the same registry."""
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:  # private API moved: the folder may then miss a kernel, which only costs a compile at load
        return
    clear_caches()


def pack_inductor_cache(folder: Path, archive: Path) -> int:
    """The compiled kernels of `folder` (shared objects and their sources; no locks, no Triton) as one file."""
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.endswith(".lock"):
                tar.add(path, arcname=str(path.relative_to(folder)))
    return archive.stat().st_size


def unpack_inductor_cache(archive: Path) -> Path:
    """A private copy of an engine's packed cache (the engine folder stays as built: its files are hashed),
    removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="kiln-inductor-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder


class FrozenCall:
    """Calls a torch.compile'd module with inductor's global `freezing` flag set as the target says.

    torch.compile(options={"freezing": True}) alone does not freeze a module's weights: dynamo reads
    the global flag while tracing (torch._dynamo.utils.is_parameter_freezing) to treat parameters
    as constants and guard on their identity; with only the per-compile option, the weights stay
    graph inputs and nothing is folded into them (measured: a second module of the same class reused
    the first one's graph). Any recompile, at load or later, happens under the same flag."""

    def __init__(self, compiled: Any, freezing: bool):
        self.compiled = compiled
        self.freezing = freezing

    def __call__(self, *inputs: torch.Tensor) -> Any:
        config = torch._inductor.config
        before = config.freezing
        if before == self.freezing:
            return self.compiled(*inputs)
        config.freezing = self.freezing  # config.patch does the same, at ~40 us a call
        try:
            return self.compiled(*inputs)
        finally:
            config.freezing = before


def compile_engine(
    served: EngineModule, spec: ModelSpec, target: Target, settings: TorchOptions, device: torch.device
) -> tuple[Any, float, dict[str, int]]:
    """torch.compile `served` and run the profile's example, min and max batches, so every graph
    the profile needs is compiled now; returns (compiled module, seconds, inductor counters)."""
    # Dynamo keeps compiled graphs per code object and stops compiling a code object after 8 of them
    # (recompile_limit), silently running eager from then on. Every engine is 1-3 graphs, and a process
    # (the benchmark, the tests) may compile several engines: give each its own copy of forward's code.
    forward = EngineModule.forward
    served.__class__ = type(
        "EngineModule",
        (EngineModule,),
        {
            "forward": types.FunctionType(
                forward.__code__.replace(), forward.__globals__, forward.__name__, forward.__defaults__, forward.__closure__
            )
        },
    )
    options = {**torch._inductor.list_mode_options(settings.compile_mode_or_default), "freezing": settings.freeze}
    compiled = FrozenCall(torch.compile(served, options=options), settings.freeze)
    p = target.profile
    example = example_batch(p)
    batches = [example] + [b for b in sorted({p.min, p.max}) if b != example]
    before = inductor_counters()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for i, b in enumerate(batches):
                tensors = example_inputs(spec, b, device)
                if i == 0 and p.min < p.max and b > 1:
                    for t in tensors:
                        torch._dynamo.mark_dynamic(t, 0)
                compiled(*tensors)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except KilnError:
        raise
    except Exception as e:
        first = first_line(e)
        raise KilnError(
            f"targets.{target.name}: torch.compile failed ({settings.compile_mode_or_default}, freezing={settings.freeze}): {first}"
        ) from e
    seconds = time.perf_counter() - start
    counts = counter_diff(before, inductor_counters())
    if not counts["unique_graphs"]:
        raise KilnError(f"targets.{target.name}: torch.compile compiled no graph (dynamo fell back to eager; its warnings above say why)")
    return compiled, seconds, counts
