"""TensorRT's plain-Python side: shape profiles, builder options, precision plans, what the engine inspector
says, GPU checks. Tested without TensorRT or a GPU; kiln.runtimes.tensorrt holds the bindings."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kiln.config.views import InputSpec, Target
from kiln.core.errors import KilnError, close_matches
from kiln.core.settings import parse

ENGINE = "model.engine"
DEFAULT_TIMING_CACHE = ".cache/kiln/tensorrt/timing.cache"  # outside DVC outputs: shared by every build here
INSTALL = "`pip install '.[tensorrt]'` (TensorRT's wheels come from NVIDIA's package index, pypi.nvidia.com)"
# Lowest compute capability that runs each precision natively.
MIN_CAPABILITY = {"fp16": (6, 0), "int8": (6, 1), "bf16": (8, 0), "fp8": (8, 9)}
QUANTIZED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "AveragePool", "GlobalAveragePool", "MaxPool"]
TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}
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
        for i in graph.input
        if i.name not in initializers
    }


def _shape(value: Any, where: str, rank: int) -> Shape:
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
        raise KilnError(f"{where} must be a list of {rank} positive integers (a full shape, batch first), got {value!r}")
    if len(value) != rank:
        raise KilnError(f"{where} has {len(value)} dims, but the ONNX input has {rank}: give a full shape of rank {rank}")
    return tuple(value)


def shape_profiles(
    target: Target, graph_inputs: Mapping[str, tuple[int | None, ...]], spec_inputs: Sequence[InputSpec] = ()
) -> list[Profile]:
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
        raise KilnError(
            f"{where} must be a non-empty list of profiles, each mapping an input name to {{min: [...], opt: [...], max: [...]}}"
        )
    profiles = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping):
            raise KilnError(f"{at} must map input names to {{min, opt, max}} shapes, got {entry!r}")
        profile = {}
        for name, shapes in entry.items():
            if name not in graph_inputs:
                raise KilnError(
                    f"{at} names input '{name}', which the ONNX graph does not have{close_matches(str(name), graph_inputs)}; "
                    f"its inputs: {names}"
                )
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
            raise KilnError(
                f"{at} gives no shapes for the dynamic input(s) {', '.join(missing)}: every profile must cover all of {', '.join(dynamic)}"
            )
        profiles.append(profile)
    return profiles


def profiles_to_params(profiles: Sequence[Profile]) -> list[dict[str, dict[str, list[int]]]]:
    return [{n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in p.items()} for p in profiles]


def select_profile(profiles: Sequence[Mapping[str, Mapping[str, Sequence[int]]]], shapes: Mapping[str, Shape]) -> int:
    """The first profile (as in the manifest) whose ranges hold these input shapes; a KilnError quoting them when none does."""
    for index, profile in enumerate(profiles):
        if all(
            name not in shapes
            or (len(shapes[name]) == len(r["min"]) and all(lo <= s <= hi for s, lo, hi in zip(shapes[name], r["min"], r["max"])))
            for name, r in profile.items()
        ):
            return index
    given = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    quoted = "; ".join(
        f"profile {i}: " + ", ".join(f"{n} min {r['min']} opt {r['opt']} max {r['max']}" for n, r in p.items())
        for i, p in enumerate(profiles)
    )
    raise KilnError(
        f"input shapes {given} are outside the engine's optimization profiles ({quoted}): feed a batch inside them, "
        f"or widen the target's profile (targets.<name>.profile or options.profiles) and rebuild"
    )


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
            raise KilnError(
                f"{where}.builder_optimization_level must be an integer from 0 (fast build) to 5 (slow build, maybe faster "
                f"engine), got {self.builder_optimization_level!r}"
            )
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise KilnError(
                f"{where}.workspace_mib must be a positive number of MiB, or null for TensorRT's default (all device memory), "
                f"got {self.workspace_mib!r}"
            )
        cache = self.timing_cache
        if cache is not None and cache is not False and not (isinstance(cache, str) and cache):
            raise KilnError(f"{where}.timing_cache must be a file path, or false to build without a timing cache, got {cache!r}")


def builder_settings(target: Target) -> dict[str, Any]:
    """`targets.<name>.options` checked and completed with defaults, as the builder reads them."""
    o = parse(TensorRTOptions, target.options, f"targets.{target.name}.options")
    return {
        "builder_optimization_level": o.builder_optimization_level,
        "workspace_mib": o.workspace_mib,
        "timing_cache": o.timing_cache or None,
        "tf32": o.tf32,
        "autocast": dict(o.autocast),
    }


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
        raise KilnError(
            f"{precision} with this TensorRT (no weakly typed BuilderFlag.{precision.upper()}: removed in 11.x) needs a graph converted "
            f"to {precision} by NVIDIA ModelOpt's AutoCast, which does not import here: {INSTALL} brings it"
        )
    return PrecisionPlan("onnx", True)


def precision_problem(precision: str, capability: tuple[int, int], gpu: str) -> str | None:
    need = MIN_CAPABILITY.get(precision)
    if need and tuple(capability) < need:
        return (
            f"{gpu} (compute capability {capability[0]}.{capability[1]}) cannot run {precision}: it needs compute capability "
            f"{need[0]}.{need[1]} or newer"
        )
    return None


def gpu_mismatch(built: Mapping[str, Any], here: Mapping[str, Any]) -> str | None:
    """What differs between the GPU/TensorRT an engine was built for and this machine's, or None."""
    keys = {"name": "GPU", "compute_capability": "compute capability", "tensorrt": "TensorRT"}
    diffs = [f"{label} {built.get(k)} (here: {here.get(k)})" for k, label in keys.items() if built.get(k) != here.get(k)]
    return ", ".join(diffs) or None


# ---- plain Python: what the engine inspector says ----


def _precision(fmt: str) -> str:
    f = fmt.lower()
    for key, name in (
        ("bfloat16", "bf16"),
        ("bf16", "bf16"),
        ("fp8", "fp8"),
        ("e4m3", "fp8"),
        ("fp16", "fp16"),
        ("half", "fp16"),
        ("fp32", "fp32"),
        ("float", "fp32"),
        ("uint8", "uint8"),
        ("int8", "int8"),
        ("int32", "int32"),
        ("int64", "int64"),
        ("bool", "bool"),
    ):
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
    return {
        "nodes_out": len(layers),
        "fusions": dict(fusions.most_common()),
        "layer_precisions": dict(precisions.most_common()),
        "reformats": reformats,
        "source": "engine layers from IEngineInspector (JSON, ProfilingVerbosity.DETAILED)",
    }


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
