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
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from kiln.config.views import Target
from kiln.core.errors import EngineMismatch, KilnError
from kiln.runtimes import BuildSource, InstancePool, NoOptions, RegisteredRuntime
from kiln.runtimes.qdq import QDQ
from kiln.runtimes.tensorrt.plan import (
    ENGINE,
    INSTALL,
    QUANTIZED_OPS,
    TORCH_DTYPES,
    PrecisionPlan,
    TensorRTOptions,
    _opset,
    builder_settings,
    executed_precision,
    gpu_mismatch,
    int8_qdq_to_fp8,
    onnx_graph_inputs,
    precision_plan,
    precision_problem,
    profiles_to_params,
    select_profile,
    shape_profiles,
    summarize_layers,
)

if TYPE_CHECKING:  # for annotations only: at run time tensorrt is imported inside the functions that need it
    import tensorrt as trt

    from kiln.data.calibration_set import CalibrationSet, CalibrationSettings

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

    from kiln.runtimes.fingerprint import collect

    major, minor = torch.cuda.get_device_capability(index)
    gpus = collect()["hardware"]["gpus"]
    return {
        "name": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
        "driver": gpus[0]["driver"] if gpus else None,
        "cuda": torch.version.cuda,
        "tensorrt": tensorrt_version(),
    }


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


class _Context:
    """What one inference in flight needs of its own: an execution context (TensorRT's IExecutionContext is not
    thread-safe: it holds the input shapes, tensor addresses and active profile of one enqueue), its CUDA stream,
    and the optimization profile it has active."""

    def __init__(self, engine: trt.ICudaEngine, device: Any) -> None:
        import torch

        self.context = engine.create_execution_context()
        if self.context is None:
            raise KilnError("TensorRT could not create an execution context (out of GPU memory? see the TensorRT log above)")
        self.stream = torch.cuda.Stream(device)
        self.active = 0


class TensorRTSession:
    """Device buffers are torch CUDA tensors; execute_async_v3 runs on a torch CUDA stream.

    Several threads may call `infer` at once (kiln.serving's workers): each call takes an execution context of
    its own, with its own stream, from a pool (one is made per call in flight, as TensorRT's guide advises for
    concurrent inference: contexts from one engine share its weights). Contexts may select the same optimization
    profile: profile sharing is TensorRT 10's default (PreviewFeature.PROFILE_SHARING_0806 in 8.6)."""

    max_concurrent: int | None = None

    def __init__(self, engine: trt.ICudaEngine, manifest: Mapping[str, Any], index: int):
        import tensorrt as trt
        import torch

        self.engine, self.device = engine, torch.device("cuda", index)
        self.contexts: InstancePool[_Context] = InstancePool(lambda: _Context(engine, self.device))
        with self.contexts.take():  # the first context now: an engine that cannot make one fails at load
            pass
        io = manifest["io"]
        self.input_names, self.output_names = list(io["inputs"]), list(io["outputs"])
        engine_io = {engine.get_tensor_name(i): engine.get_tensor_mode(engine.get_tensor_name(i)) for i in range(engine.num_io_tensors)}
        expected = {**{n: trt.TensorIOMode.INPUT for n in self.input_names}, **{n: trt.TensorIOMode.OUTPUT for n in self.output_names}}
        if engine_io != expected:
            raise KilnError(f"the engine's inputs/outputs {sorted(engine_io)} are not the manifest's {sorted(expected)}: rebuild it")
        self.dtypes = {n: getattr(torch, TORCH_DTYPES[engine.get_tensor_dtype(n).name]) for n in engine_io}
        self.profiles = manifest["profiles"]

    def _prepare(self, slot: _Context, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        import torch

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KilnError(f"the engine needs inputs {', '.join(self.input_names)}; missing: {', '.join(missing)}")
        index = select_profile(self.profiles, {n: tuple(feeds[n].shape) for n in self.input_names})
        buffers: dict[str, Any] = {}
        context = slot.context
        with torch.cuda.stream(slot.stream):
            if index != slot.active:
                context.set_optimization_profile_async(index, slot.stream.cuda_stream)
                slot.active = index
            for name in self.input_names:
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device).to(self.dtypes[name])
                if not context.set_input_shape(name, tuple(t.shape)):
                    raise KilnError(
                        f"TensorRT refused shape {list(t.shape)} for input '{name}' (profile {index}: {self.profiles[index].get(name)})"
                    )
                buffers[name] = t
            for name in self.output_names:
                dims = context.get_tensor_shape(name)
                buffers[name] = torch.empty(tuple(dims[i] for i in range(len(dims))), dtype=self.dtypes[name], device=self.device)
            for name, t in buffers.items():
                context.set_tensor_address(name, t.data_ptr())
        return buffers

    def _execute(self, slot: _Context) -> None:
        if not slot.context.execute_async_v3(slot.stream.cuda_stream):
            raise KilnError("TensorRT failed to enqueue the engine (execute_async_v3 returned false; see the TensorRT log above)")

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with self.contexts.take() as slot:
            buffers = self._prepare(slot, feeds)
            self._execute(slot)
            slot.stream.synchronize()
        # numpy has no bfloat16: such outputs come back as float32
        return {n: (buffers[n].float() if self.dtypes[n] == torch.bfloat16 else buffers[n]).cpu().numpy() for n in self.output_names}

    def time_ms(self, feeds: Mapping[str, np.ndarray]) -> float:
        """One inference timed on the GPU with CUDA events (host-to-device copies not included)."""
        import torch

        with self.contexts.take() as slot:
            self._prepare(slot, feeds)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(slot.stream)
            self._execute(slot)
            end.record(slot.stream)
            end.synchronize()
            return float(start.elapsed_time(end))


class TensorRTRuntime(RegisteredRuntime):
    name = "tensorrt"
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
            reasons.append(
                f"no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda or 'none, a CPU-only build'}) "
                "says torch.cuda.is_available() is false"
            )
        elif index >= torch.cuda.device_count():
            reasons.append(
                f"no GPU '{target.device}': this machine has {torch.cuda.device_count()} (cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
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

    def calibrate(
        self, target: Target, onnx_path: Path, calib: CalibrationSet, settings: CalibrationSettings, out_dir: Path
    ) -> dict[str, Any]:
        """A Q/DQ graph for TensorRT's explicit quantization, as TensorRT's docs place it: Q/DQ on the inputs of
        quantizable ops only (not their outputs), symmetric per-tensor activations, symmetric per-channel weights
        (float weights behind Q/DQ pairs, float biases), one Q/DQ pair per consumer. fp8 is the same graph with
        e4m3 scales amax / 448 (as NVIDIA ModelOpt makes them), from the target's calibration method. ONNX Runtime's
        own QFLOAT8E4M3FN works too, but fits scales to a distribution and accepts no other calibration method."""
        import onnx
        from onnxruntime.quantization import QuantType

        from kiln.runtimes.qdq import quantize_qdq

        if target.precision not in ("int8", "fp8"):
            raise KilnError(f"targets.{target.name}: TensorRT calibrates int8 and fp8 targets, not {target.precision}")

        def to_opset_19(pre: Path) -> None:  # float8 Q/DQ types arrived in opset 19
            if target.precision == "fp8" and _opset(onnx.load(str(pre))) < 19:
                onnx.save(onnx.version_converter.convert_version(onnx.load(str(pre)), 19), str(pre))

        quantize_qdq(
            onnx_path,
            out_dir,
            calib,
            settings,
            self.name,
            prepare=to_opset_19,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OPS,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "AddQDQPairToWeight": True,
                "DedicatedQDQPair": True,
                "QuantizeBias": False,
                "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            },
        )
        if target.precision == "fp8":
            onnx.save(int8_qdq_to_fp8(onnx.load(str(out_dir / QDQ))), str(out_dir / QDQ))
        return {
            "artifact": QDQ,
            "method": settings.method,
            "per_channel": True,
            "symmetric": True,
            "format": f"QDQ {'float8 e4m3fn (amax/448)' if target.precision == 'fp8' else 's8s8'} for TensorRT explicit quantization",
        }

    def _graph(self, target: Target, source: BuildSource, plan: PrecisionPlan, settings: Mapping[str, Any], tmp: Path) -> Path:
        if plan.graph == "qdq":
            qdq = Path(source.calibration_dir or ".") / QDQ
            if source.calibration_dir is None or not qdq.is_file():
                raise KilnError(
                    f"targets.{target.name}: {target.precision} builds from calibrate's Q/DQ graph, and {qdq} is missing: run "
                    f"`dvc repro calibrate@{target.name}` (kiln.pipeline.calibrate must list {target.precision} as a calibrated precision)"
                )
            return qdq
        if plan.graph == "autocast":
            import onnx

            autocast = importlib.import_module("modelopt.onnx.autocast")
            model = autocast.convert_to_mixed_precision(
                onnx_path=str(source.onnx_path), low_precision_type=target.precision, keep_io_types=True, **settings["autocast"]
            )
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
            raise KilnError(
                f"TensorRT {trt.__version__} failed to build targets.{target.name}: "
                + (" | ".join(logger.errors[-5:]) or "see the TensorRT log above")
            )
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
            "builder": {
                **{k: v for k, v in settings.items() if k != "timing_cache"},
                "strongly_typed": plan.strongly_typed,
                "graph": plan.graph,
                "weakly_typed_flag": plan.flag,
            },
            "timing_cache": cache_info,
            # nodes_in counts the exported graph (as for every runtime); parsed_nodes the graph TensorRT read (Q/DQ or casts added)
            "graph": {"nodes_in": exported, "parsed_nodes": len(node_ops), **layers},
            "io": {
                "inputs": [i.name for i in model.graph.input if i.name not in initializers],
                "outputs": [o.name for o in model.graph.output],
            },
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
            raise EngineMismatch(
                f"TensorRT engine '{manifest.get('target')}' was built for another GPU or TensorRT: {diff}; "
                f"rebuild it with `dvc repro build@{manifest.get('target', target.name)}`"
            )
        if not (engine_dir / ENGINE).is_file():
            raise KilnError(f"{engine_dir} holds no {ENGINE}: rebuild it with `dvc repro build@{target.name}`")
        logger = _make_logger()
        engine = trt.Runtime(logger).deserialize_cuda_engine((engine_dir / ENGINE).read_bytes())
        if engine is None:
            raise KilnError(
                f"TensorRT {trt.__version__} cannot deserialize {engine_dir / ENGINE}: {' | '.join(logger.errors[-3:])}; "
                f"rebuild it with `dvc repro build@{target.name}`"
            )
        return TensorRTSession(engine, manifest, index)


RUNTIME = TensorRTRuntime()
