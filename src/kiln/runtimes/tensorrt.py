"""TensorRT: the ONNX graph built into a serialized engine for one NVIDIA GPU.

Precision lives in the graph (strong typing, TensorRT's recommended mode since 10.12 and the only
one in 11.x): int8 and fp8 come from explicit Q/DQ nodes written by `calibrate`, fp16 and bf16 from
a graph converted by NVIDIA ModelOpt's AutoCast. Without ModelOpt, TensorRT 10.x still takes the
deprecated weakly typed builder flags (BuilderFlag.FP16/BF16, removed in 11.x); the manifest says
which way was used. `import tensorrt` happens only inside functions: this module imports on machines
without TensorRT, and builds there fail with `unavailable_reason`'s message.

The plain-Python parts (shape profiles, builder options, engine-inspector JSON, GPU checks) are
separate functions, tested without TensorRT.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..config import InputSpec, Target
from ..errors import EngineMismatch, KilnError, close_matches
from . import RUNTIMES, BuildSource, NoOptions, runtime_options
from .qdq import QDQ

if TYPE_CHECKING:  # for annotations only: at run time tensorrt is imported inside the functions that need it
    import tensorrt as trt

    from ..calibration import CalibrationSet, CalibrationSettings

ENGINE = "model.engine"
DEFAULT_TIMING_CACHE = ".cache/kiln/tensorrt/timing.cache"  # outside DVC outputs: shared by every build here
INSTALL = "`pip install '.[tensorrt]'` (TensorRT's wheels come from NVIDIA's package index, pypi.nvidia.com)"
# Lowest compute capability that runs each precision natively.
MIN_CAPABILITY = {"fp16": (6, 0), "int8": (6, 1), "bf16": (8, 0), "fp8": (8, 9)}
QUANTIZED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "AveragePool", "GlobalAveragePool", "MaxPool"]
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8_e4m3fn"}
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) full shapes


# ---- plain Python: graph inputs, shape profiles, builder options ----

def onnx_graph_inputs(onnx_path: Path) -> dict[str, tuple[int | None, ...]]:
    """The graph's real inputs (initializers excluded) and their dims, None where dynamic."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return {
        i.name: tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in i.type.tensor_type.shape.dim)
        for i in graph.input if i.name not in initializers
    }


def _shape(value: Any, where: str, rank: int) -> Shape:
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
        raise KilnError(f"{where} must be a list of {rank} positive integers (a full shape, batch first), got {value!r}")
    if len(value) != rank:
        raise KilnError(f"{where} has {len(value)} dims, but the ONNX input has {rank}: give a full shape of rank {rank}")
    return tuple(value)


def shape_profiles(target: Target, graph_inputs: Mapping[str, tuple[int | None, ...]], spec_inputs: Sequence[InputSpec] = ()) -> list[Profile]:
    """One {input: (min, opt, max)} per TensorRT optimization profile.

    `targets.<name>.options.profiles` (a list of {input: {min: [shape], opt: [...], max: [...]}}) when
    given; else `targets.<name>.profile`'s batch sizes on axis 0 of every input, the other dims from
    the graph, or from model.inputs where the graph leaves them dynamic."""
    where = f"targets.{target.name}.options.profiles"
    names = ", ".join(graph_inputs) or "none"
    dynamic = [n for n, dims in graph_inputs.items() if None in dims]
    raw = target.options.get("profiles")
    if raw is None:
        specs = {s.name: s for s in spec_inputs}
        profile: Profile = {}
        for name, dims in graph_inputs.items():
            if not dims:
                continue  # a scalar input has no batch axis
            rest: list[int] = []
            for k, d in enumerate(dims[1:]):
                if d is None:
                    spec = specs.get(name)
                    if spec is None or len(spec.shape) != len(dims) - 1:
                        raise KilnError(
                            f"ONNX input '{name}' has dynamic dim {k + 1} and model.inputs gives no shape of rank {len(dims) - 1} for it: "
                            f"set model.inputs.{name}.shape or list full shapes in {where}"
                        )
                    d = spec.shape[k]
                rest.append(d)
            p = target.profile
            profile[name] = ((p.min, *rest), (p.opt, *rest), (p.max, *rest))
        return [profile]
    if not isinstance(raw, list) or not raw:
        raise KilnError(f"{where} must be a non-empty list of profiles, each mapping an input name to {{min: [...], opt: [...], max: [...]}}")
    profiles = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping):
            raise KilnError(f"{at} must map input names to {{min, opt, max}} shapes, got {entry!r}")
        profile = {}
        for name, shapes in entry.items():
            if name not in graph_inputs:
                raise KilnError(f"{at} names input '{name}', which the ONNX graph does not have{close_matches(str(name), graph_inputs)}; its inputs: {names}")
            dims = graph_inputs[name]
            if not isinstance(shapes, Mapping) or set(shapes) != {"min", "opt", "max"}:
                raise KilnError(f"{at}.{name} must have exactly the keys min, opt and max (full shapes), got {shapes!r}")
            mn, opt, mx = (_shape(shapes[k], f"{at}.{name}.{k}", len(dims)) for k in ("min", "opt", "max"))
            for axis, d in enumerate(dims):
                if not mn[axis] <= opt[axis] <= mx[axis]:
                    raise KilnError(f"{at}.{name}: dim {axis} must satisfy min <= opt <= max, got {mn[axis]}, {opt[axis]}, {mx[axis]}")
                if d is not None and not d == mn[axis] == mx[axis]:
                    raise KilnError(f"{at}.{name}: dim {axis} is fixed to {d} in the ONNX graph, the profile gives {mn[axis]}..{mx[axis]}")
            profile[name] = (mn, opt, mx)
        missing = [n for n in dynamic if n not in profile]
        if missing:
            raise KilnError(f"{at} gives no shapes for the dynamic input(s) {', '.join(missing)}: every profile must cover all of {', '.join(dynamic)}")
        profiles.append(profile)
    return profiles


def profiles_to_params(profiles: Sequence[Profile]) -> list[dict[str, dict[str, list[int]]]]:
    return [{n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in p.items()} for p in profiles]


def select_profile(profiles: Sequence[Mapping[str, Mapping[str, Sequence[int]]]], shapes: Mapping[str, Shape]) -> int:
    """The first profile (as in the manifest) whose ranges hold these input shapes; a KilnError quoting them when none does."""
    for index, profile in enumerate(profiles):
        if all(
            name not in shapes or (len(shapes[name]) == len(r["min"]) and all(lo <= s <= hi for s, lo, hi in zip(shapes[name], r["min"], r["max"])))
            for name, r in profile.items()
        ):
            return index
    given = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    quoted = "; ".join(f"profile {i}: " + ", ".join(f"{n} min {r['min']} opt {r['opt']} max {r['max']}" for n, r in p.items()) for i, p in enumerate(profiles))
    raise KilnError(f"input shapes {given} are outside the engine's optimization profiles ({quoted}): feed a batch inside them, "
                    f"or widen the target's profile (targets.<name>.profile or options.profiles) and rebuild")


@dataclass(frozen=True)
class TensorRTOptions:
    """`targets.<name>.options` of a tensorrt target (profiles are read by shape_profiles)."""

    builder_optimization_level: int = 3  # 0 (fast build) .. 5 (slowest build, maybe a faster engine)
    workspace_mib: int | None = None  # scratch memory TensorRT's tactics may use; null: all device memory
    timing_cache: Any = DEFAULT_TIMING_CACHE  # a file path kept across builds, or false for none
    tf32: bool = True  # fp32 convolutions/matmuls may use TF32 (TensorRT's default)
    profiles: tuple[dict[str, Any], ...] | None = None  # several optimization profiles: [{input: {min, opt, max}}]
    autocast: dict[str, Any] = field(default_factory=dict)  # ModelOpt AutoCast arguments, e.g. op_types_to_exclude

    def check(self, where: str) -> None:
        if not 0 <= self.builder_optimization_level <= 5:
            raise KilnError(f"{where}.builder_optimization_level must be an integer from 0 (fast build) to 5 (slow build, maybe faster "
                            f"engine), got {self.builder_optimization_level!r}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise KilnError(f"{where}.workspace_mib must be a positive number of MiB, or null for TensorRT's default (all device memory), "
                            f"got {self.workspace_mib!r}")
        cache = self.timing_cache
        if cache is not None and cache is not False and not (isinstance(cache, str) and cache):
            raise KilnError(f"{where}.timing_cache must be a file path, or false to build without a timing cache, got {cache!r}")


def builder_settings(target: Target) -> dict[str, Any]:
    """`targets.<name>.options` checked and completed with defaults, as the builder reads them."""
    o = runtime_options(RUNTIME, target)
    return {"builder_optimization_level": o.builder_optimization_level, "workspace_mib": o.workspace_mib,
            "timing_cache": o.timing_cache or None, "tf32": o.tf32, "autocast": dict(o.autocast)}


@dataclass(frozen=True)
class PrecisionPlan:
    graph: str  # "onnx" (as exported), "qdq" (calibrate's Q/DQ graph) or "autocast" (converted to fp16/bf16)
    strongly_typed: bool
    flag: str | None = None  # a weakly typed builder flag (TensorRT 10.x only)


def precision_plan(precision: str, has_weak_flags: bool, has_autocast: bool) -> PrecisionPlan:
    if precision in ("int8", "fp8"):
        return PrecisionPlan("qdq", True)
    if precision in ("fp16", "bf16"):
        if has_autocast:
            return PrecisionPlan("autocast", True)
        if has_weak_flags:
            return PrecisionPlan("onnx", False, precision.upper())
        raise KilnError(f"{precision} with this TensorRT (no weakly typed BuilderFlag.{precision.upper()}: removed in 11.x) needs a graph converted "
                        f"to {precision} by NVIDIA ModelOpt's AutoCast, which does not import here: {INSTALL} brings it")
    return PrecisionPlan("onnx", True)


def precision_problem(precision: str, capability: tuple[int, int], gpu: str) -> str | None:
    need = MIN_CAPABILITY.get(precision)
    if need and tuple(capability) < need:
        return (f"{gpu} (compute capability {capability[0]}.{capability[1]}) cannot run {precision}: it needs compute capability "
                f"{need[0]}.{need[1]} or newer")
    return None


def gpu_mismatch(built: Mapping[str, Any], here: Mapping[str, Any]) -> str | None:
    """What differs between the GPU/TensorRT an engine was built for and this machine's, or None."""
    keys = {"name": "GPU", "compute_capability": "compute capability", "tensorrt": "TensorRT"}
    diffs = [f"{label} {built.get(k)} (here: {here.get(k)})" for k, label in keys.items() if built.get(k) != here.get(k)]
    return ", ".join(diffs) or None


# ---- plain Python: what the engine inspector says ----

def _precision(fmt: str) -> str:
    f = fmt.lower()
    for key, name in (("bfloat16", "bf16"), ("bf16", "bf16"), ("fp8", "fp8"), ("e4m3", "fp8"), ("fp16", "fp16"), ("half", "fp16"),
                      ("fp32", "fp32"), ("float", "fp32"), ("uint8", "uint8"), ("int8", "int8"), ("int32", "int32"), ("int64", "int64"), ("bool", "bool")):
        if key in f:
            return name
    return "unknown"


def _op_kind(part: str, node_ops: Mapping[str, str]) -> str:
    if part in node_ops:
        return node_ops[part]
    last = part.rsplit("/", 1)[-1]
    return re.sub(r"[_.:]?\d+$", "", last) or part


def summarize_layers(info_json: str, node_ops: Mapping[str, str] | None = None) -> dict[str, Any]:
    """nodes_out, fusions and layer_precisions from IEngineInspector's JSON (LayerInformationFormat.JSON).

    Fused layers are named by joining their parts with ' + ' (and, built with ProfilingVerbosity.DETAILED,
    list them as '[ONNX Layer: <node>]' in Metadata); Myelin regions are '{ForeignNode[first...last]}'.
    A layer's precision is the datatype of its first output ('Format/Datatype')."""
    node_ops = node_ops or {}
    layers = json.loads(info_json).get("Layers", [])
    fusions: Counter[str] = Counter()
    precisions: Counter[str] = Counter()
    reformats = 0
    for layer in layers:
        layer = {"Name": layer} if isinstance(layer, str) else layer  # LAYER_NAMES_ONLY engines list bare names
        name, kind = str(layer.get("Name", "")), str(layer.get("LayerType", ""))
        reformats += kind == "Reformat" or name.startswith("Reformatting CopyNode")
        nodes = re.findall(r"\[ONNX Layer: ([^\]]+)\]", str(layer.get("Metadata", "")))
        if kind == "Reformat" or name.startswith("Reformatting CopyNode"):
            pass  # a reformat names the layer it feeds, ' + ' and all: not a fusion
        elif name.startswith("{ForeignNode["):
            fusions["ForeignNode (Myelin)"] += 1
        elif len(nodes) > 1:
            fusions["+".join(node_ops.get(n, _op_kind(n, node_ops)) for n in nodes)] += 1
        elif " + " in name:
            fusions["+".join(_op_kind(p.strip(), node_ops) for p in name.split(" + "))] += 1
        outputs = layer.get("Outputs") or []
        if outputs and isinstance(outputs[0], Mapping) and "Format/Datatype" in outputs[0]:
            precisions[_precision(str(outputs[0]["Format/Datatype"]))] += 1
    return {"nodes_out": len(layers), "fusions": dict(fusions.most_common()), "layer_precisions": dict(precisions.most_common()),
            "reformats": reformats, "source": "engine layers from IEngineInspector (JSON, ProfilingVerbosity.DETAILED)"}


def executed_precision(layer_precisions: Mapping[str, int], requested: str) -> str:
    counts = {k: v for k, v in layer_precisions.items() if k in ("fp32", "fp16", "bf16", "int8", "fp8")}
    if not counts:
        return f"{requested} (not inspected)"
    if len(counts) == 1:
        return next(iter(counts))
    total = sum(counts.values())
    return ", ".join(f"{p} ({n}/{total})" for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _opset(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def int8_qdq_to_fp8(model: Any) -> Any:
    """A symmetric int8 Q/DQ graph (scale = amax / 127, zero points 0) rewritten to float8 e4m3fn Q/DQ
    (scale = amax / 448, the largest e4m3fn value; zero points float8 zeros). Needs opset 19 or newer."""
    import onnx
    from onnx import numpy_helper

    if _opset(model) < 19:
        raise KilnError(f"float8 Q/DQ needs ONNX opset 19 or newer; this graph has opset {_opset(model)}")
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for name in {n.input[1] for n in qdq}:
        scale = numpy_helper.to_array(inits[name]) * np.float32(127.0 / 448.0)
        inits[name].CopyFrom(numpy_helper.from_array(scale.astype(np.float32), name))
    for name in {n.input[2] for n in qdq if len(n.input) > 2}:
        dims = list(inits[name].dims)
        zeros = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT8E4M3FN, dims, [0.0] * int(np.prod(dims, dtype=np.int64)))
        inits[name].CopyFrom(zeros)
    return model


# ---- the machine ----

def _cuda_index(device: str) -> int | None:
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    return None if m is None else int(m.group(1) or 0)


def tensorrt_version() -> str | None:
    """TensorRT's version, None when it is not installed (a stubs-only `tensorrt` folder imports as an empty namespace)."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    return trt.__version__ if hasattr(trt, "Builder") else None


def autocast_error() -> str | None:
    """Why ModelOpt's AutoCast (modelopt.onnx.autocast) cannot be imported here, or None."""
    if importlib.util.find_spec("modelopt") is None:
        return "nvidia-modelopt is not installed"
    try:
        importlib.import_module("modelopt.onnx.autocast")
    except ImportError as e:
        return f"modelopt.onnx.autocast does not import: {str(e).splitlines()[0]}"
    return None


def gpu_info(index: int) -> dict[str, Any]:
    import torch

    from ..fingerprint import collect

    major, minor = torch.cuda.get_device_capability(index)
    gpus = collect()["hardware"]["gpus"]
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "driver": gpus[0]["driver"] if gpus else None, "cuda": torch.version.cuda, "tensorrt": tensorrt_version()}


def _make_logger() -> Any:
    """A TensorRT logger that prints warnings and errors and keeps the errors, for KilnError messages."""
    import tensorrt as trt

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", flush=True)

    return Logger()


class TensorRTSession:
    """Device buffers are torch CUDA tensors; execute_async_v3 runs on a torch CUDA stream."""

    def __init__(self, engine: trt.ICudaEngine, manifest: Mapping[str, Any], index: int):
        import tensorrt as trt
        import torch

        self.engine, self.device = engine, torch.device("cuda", index)
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        io = manifest["io"]
        self.input_names, self.output_names = list(io["inputs"]), list(io["outputs"])
        engine_io = {engine.get_tensor_name(i): engine.get_tensor_mode(engine.get_tensor_name(i)) for i in range(engine.num_io_tensors)}
        expected = {**{n: trt.TensorIOMode.INPUT for n in self.input_names}, **{n: trt.TensorIOMode.OUTPUT for n in self.output_names}}
        if engine_io != expected:
            raise KilnError(f"the engine's inputs/outputs {sorted(engine_io)} are not the manifest's {sorted(expected)}: rebuild it")
        self.dtypes = {n: getattr(torch, TORCH_DTYPES[engine.get_tensor_dtype(n).name]) for n in engine_io}
        self.profiles = manifest["profiles"]
        self.active = 0

    def _prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        import torch

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KilnError(f"the engine needs inputs {', '.join(self.input_names)}; missing: {', '.join(missing)}")
        index = select_profile(self.profiles, {n: tuple(feeds[n].shape) for n in self.input_names})
        buffers: dict[str, Any] = {}
        with torch.cuda.stream(self.stream):
            if index != self.active:
                self.context.set_optimization_profile_async(index, self.stream.cuda_stream)
                self.active = index
            for name in self.input_names:
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device).to(self.dtypes[name])
                if not self.context.set_input_shape(name, tuple(t.shape)):
                    raise KilnError(f"TensorRT refused shape {list(t.shape)} for input '{name}' (profile {index}: {self.profiles[index].get(name)})")
                buffers[name] = t
            for name in self.output_names:
                dims = self.context.get_tensor_shape(name)
                buffers[name] = torch.empty(tuple(dims[i] for i in range(len(dims))), dtype=self.dtypes[name], device=self.device)
            for name, t in buffers.items():
                self.context.set_tensor_address(name, t.data_ptr())
        return buffers

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise KilnError("TensorRT failed to enqueue the engine (execute_async_v3 returned false; see the TensorRT log above)")

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        buffers = self._prepare(feeds)
        self._execute()
        self.stream.synchronize()
        # numpy has no bfloat16: such outputs come back as float32
        return {n: (buffers[n].float() if self.dtypes[n] == torch.bfloat16 else buffers[n]).cpu().numpy() for n in self.output_names}

    def time_ms(self, feeds: Mapping[str, np.ndarray]) -> float:
        """One inference timed on the GPU with CUDA events (host-to-device copies not included)."""
        import torch

        self._prepare(feeds)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        self._execute()
        end.record(self.stream)
        end.synchronize()
        return float(start.elapsed_time(end))


class TensorRTRuntime:
    name = "tensorrt"
    info = RUNTIMES[name]
    precisions = info.precisions
    libraries = tuple(info.libraries)
    options_type = TensorRTOptions
    calibration_options_type = NoOptions

    def unavailable_reason(self, target: Target) -> str | None:
        index = _cuda_index(target.device)
        if index is None:
            return f"TensorRT runs on NVIDIA GPUs: device must be 'cuda' or 'cuda:N', not '{target.device}'"
        import torch

        reasons = []
        version = tensorrt_version()
        if version is None:
            reasons.append(f"TensorRT is not installed: {INSTALL}")
        if not torch.cuda.is_available():
            reasons.append(f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda or 'none, a CPU-only build'}) says torch.cuda.is_available() is false")
        elif index >= torch.cuda.device_count():
            reasons.append(f"no GPU '{target.device}': this machine has {torch.cuda.device_count()} (cuda:0..cuda:{torch.cuda.device_count() - 1})")
        else:
            problem = precision_problem(target.precision, torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index))
            if problem:
                reasons.append(problem)
        if not reasons and target.precision in ("fp16", "bf16"):
            import tensorrt as trt

            try:
                precision_plan(target.precision, hasattr(trt.BuilderFlag, "FP16"), autocast_error() is None)
            except KilnError as e:
                reasons.append(f"{e} ({autocast_error()})")
        return "; ".join(reasons) or None

    def calibrate(self, target: Target, onnx_path: Path, calib: CalibrationSet, settings: CalibrationSettings, out_dir: Path) -> dict[str, Any]:
        """A Q/DQ graph for TensorRT's explicit quantization, as TensorRT's docs place it: Q/DQ on the inputs of
        quantizable ops only (not their outputs), symmetric per-tensor activations, symmetric per-channel weights
        (float weights behind Q/DQ pairs, float biases), one Q/DQ pair per consumer. fp8 is the same graph with
        e4m3 scales amax / 448 (as NVIDIA ModelOpt makes them), from the target's calibration method. ONNX Runtime's
        own QFLOAT8E4M3FN works too, but fits scales to a distribution and accepts no other calibration method."""
        import onnx
        from onnxruntime.quantization import QuantType

        from .qdq import quantize_qdq

        if target.precision not in ("int8", "fp8"):
            raise KilnError(f"targets.{target.name}: TensorRT calibrates int8 and fp8 targets, not {target.precision}")

        def to_opset_19(pre: Path) -> None:  # float8 Q/DQ types arrived in opset 19
            if target.precision == "fp8" and _opset(onnx.load(str(pre))) < 19:
                onnx.save(onnx.version_converter.convert_version(onnx.load(str(pre)), 19), str(pre))

        quantize_qdq(
            onnx_path, out_dir, calib, settings, self.name, prepare=to_opset_19, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "AddQDQPairToWeight": True, "DedicatedQDQPair": True,
                           "QuantizeBias": False, "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS,
                           "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}},
        )
        if target.precision == "fp8":
            onnx.save(int8_qdq_to_fp8(onnx.load(str(out_dir / QDQ))), str(out_dir / QDQ))
        return {"artifact": QDQ, "method": settings.method, "per_channel": True, "symmetric": True,
                "format": f"QDQ {'float8 e4m3fn (amax/448)' if target.precision == 'fp8' else 's8s8'} for TensorRT explicit quantization"}

    def _graph(self, target: Target, source: BuildSource, plan: PrecisionPlan, settings: Mapping[str, Any], tmp: Path) -> Path:
        if plan.graph == "qdq":
            qdq = Path(source.calibration_dir or ".") / QDQ
            if source.calibration_dir is None or not qdq.is_file():
                raise KilnError(f"targets.{target.name}: {target.precision} builds from calibrate's Q/DQ graph, and {qdq} is missing: run "
                                f"`dvc repro calibrate@{target.name}` (kiln.calibration must list {target.precision} as a calibrated precision)")
            return qdq
        if plan.graph == "autocast":
            import onnx

            autocast = importlib.import_module("modelopt.onnx.autocast")
            model = autocast.convert_to_mixed_precision(onnx_path=str(source.onnx_path), low_precision_type=target.precision,
                                                        keep_io_types=True, **settings["autocast"])
            onnx.save(model, str(tmp / f"model.{target.precision}.onnx"))
            return tmp / f"model.{target.precision}.onnx"
        return Path(source.onnx_path)

    def build(self, target: Target, source: BuildSource, engine_dir: Path) -> dict[str, Any]:
        reason = self.unavailable_reason(target)
        if reason:
            raise KilnError(f"targets.{target.name}: cannot build with TensorRT here: {reason}")
        with tempfile.TemporaryDirectory() as tmp:  # a converted fp16/bf16 graph lives here while TensorRT reads it
            return self._build(target, source, engine_dir, Path(tmp))

    def _build(self, target: Target, source: BuildSource, engine_dir: Path, tmp: Path) -> dict[str, Any]:
        import onnx
        import tensorrt as trt

        settings = builder_settings(target)
        plan = precision_plan(target.precision, hasattr(trt.BuilderFlag, "FP16"), autocast_error() is None)
        index = _cuda_index(target.device) or 0
        onnx_file = self._graph(target, source, plan, settings, tmp)
        model = onnx.load(str(onnx_file), load_external_data=False)
        node_ops = {n.name: n.op_type for n in model.graph.node}
        profiles = shape_profiles(target, onnx_graph_inputs(onnx_file), source.model.inputs)
        logger = _make_logger()
        builder = trt.Builder(logger)
        # Strongly typed: tensor types follow the graph (its Q/DQ nodes and casts), as in every TensorRT 11 network.
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0)
        parser = trt.OnnxParser(network, logger)  # owns the parsed weights: kept alive until the engine is built
        if not parser.parse_from_file(str(onnx_file)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise KilnError(f"TensorRT {trt.__version__} cannot parse {onnx_file.name} ({len(errors)} error(s)): " + " | ".join(errors[:5]))
        config = builder.create_builder_config()
        config.builder_optimization_level = settings["builder_optimization_level"]
        if settings["workspace_mib"]:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_mib"] << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then reports formats and fused ONNX nodes
        if not settings["tf32"]:
            config.clear_flag(trt.BuilderFlag.TF32)
        if plan.flag:
            config.set_flag(getattr(trt.BuilderFlag, plan.flag))
        for profile in profiles:
            p = builder.create_optimization_profile()
            for name, (mn, opt, mx) in profile.items():
                p.set_shape(name, trt.Dims(list(mn)), trt.Dims(list(opt)), trt.Dims(list(mx)))
            config.add_optimization_profile(p)
        cache_path = Path(settings["timing_cache"]) if settings["timing_cache"] else None
        cache_info: dict[str, Any] = {"path": str(cache_path) if cache_path else None, "reused": False}
        if cache_path:
            old = cache_path.read_bytes() if cache_path.is_file() else b""
            try:
                cache_info["reused"] = bool(old) and bool(config.set_timing_cache(config.create_timing_cache(old), False))
            except (RuntimeError, TypeError):  # unreadable by this TensorRT
                pass
            if not cache_info["reused"]:  # none yet, or one made for another GPU or TensorRT: start afresh
                config.set_timing_cache(config.create_timing_cache(b""), False)
            cache_info["bytes_before"] = len(old)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise KilnError(f"TensorRT {trt.__version__} failed to build targets.{target.name}: " + (" | ".join(logger.errors[-5:]) or "see the TensorRT log above"))
        plan_bytes = bytes(memoryview(serialized))
        (engine_dir / ENGINE).write_bytes(plan_bytes)
        if cache_path:
            data = bytes(memoryview(config.get_timing_cache().serialize()))
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=cache_path.parent, prefix=cache_path.name + ".")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(partial, cache_path)  # atomic: a concurrent build reads the old or the new cache, never half of one
            cache_info["bytes_after"] = len(data)
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan_bytes)
        context = engine.create_execution_context()
        for name, (_, opt, _) in profiles[0].items():
            context.set_input_shape(name, trt.Dims(list(opt)))
        inspector = engine.create_engine_inspector()
        # With an execution context (and its input shapes) the inspector reports each layer's formats and datatypes;
        # TensorRT 10.13+ and 11.x name that attribute execution_context, earlier 10.x releases context.
        setattr(inspector, "execution_context" if hasattr(inspector, "execution_context") else "context", context)
        layers = summarize_layers(inspector.get_engine_information(trt.LayerInformationFormat.JSON), node_ops)
        exported = len(onnx.load(str(source.onnx_path), load_external_data=False).graph.node)
        initializers = {t.name for t in model.graph.initializer}
        return {
            "executed_precision": executed_precision(layers["layer_precisions"], target.precision),
            "gpu": gpu_info(index),
            "profiles": profiles_to_params(profiles),
            "builder": {**{k: v for k, v in settings.items() if k != "timing_cache"}, "strongly_typed": plan.strongly_typed,
                        "graph": plan.graph, "weakly_typed_flag": plan.flag},
            "timing_cache": cache_info,
            # nodes_in counts the exported graph (as for every runtime); parsed_nodes the graph TensorRT read (Q/DQ or casts added)
            "graph": {"nodes_in": exported, "parsed_nodes": len(node_ops), **layers},
            "io": {"inputs": [i.name for i in model.graph.input if i.name not in initializers], "outputs": [o.name for o in model.graph.output]},
            "engine_bytes": len(plan_bytes),
        }

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> TensorRTSession:
        reason = self.unavailable_reason(target)
        if reason:
            raise KilnError(f"cannot load TensorRT engine {engine_dir} here: {reason}")
        import tensorrt as trt

        index = _cuda_index(target.device) or 0
        diff = gpu_mismatch(manifest.get("gpu") or {}, gpu_info(index))
        if diff:
            raise EngineMismatch(f"TensorRT engine '{manifest.get('target')}' was built for another GPU or TensorRT: {diff}; "
                                 f"rebuild it with `dvc repro build@{manifest.get('target', target.name)}`")
        if not (engine_dir / ENGINE).is_file():
            raise KilnError(f"{engine_dir} holds no {ENGINE}: rebuild it with `dvc repro build@{target.name}`")
        logger = _make_logger()
        engine = trt.Runtime(logger).deserialize_cuda_engine((engine_dir / ENGINE).read_bytes())
        if engine is None:
            raise KilnError(f"TensorRT {trt.__version__} cannot deserialize {engine_dir / ENGINE}: {' | '.join(logger.errors[-3:])}; "
                            f"rebuild it with `dvc repro build@{target.name}`")
        return TensorRTSession(engine, manifest, index)


RUNTIME = TensorRTRuntime()
