"""OpenVINO: the ONNX graph converted to IR (fp32 weights kept), compiled for a device with an explicit precision hint.

OpenVINO's CPU plugin runs bf16 on AMX/AVX512-BF16 CPUs unless told otherwise, and
`ov.save_model` compresses weights to fp16 by default: both are pinned here, and the
precision the compiled model really executes is read back and recorded.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import numpy as np
import openvino as ov

from kiln.config.views import Target, default_threads
from kiln.runtimes import Boundaries, BuildSource, InstancePool, Knob, RegisteredRuntime, runtime_options

if TYPE_CHECKING:
    from kiln.data.calibration_set import CalibrationSet, CalibrationSettings
from kiln.core.errors import KilnError

IR = "model.xml"
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8: quantized layers run int8, the rest f32
# OPTIMIZATION_CAPABILITIES a device must list to really run a precision (else it silently runs f32).
CAPABILITY = {"bf16": "BF16", "fp16": "FP16", "int8": "INT8"}
COMPUTE_LAYERS = {"Convolution", "FullyConnected", "MatMul", "GroupConvolution", "Deconvolution"}


def _device(target: Target) -> str:
    return target.device.upper() if target.device in ("cpu", "gpu", "npu") else target.device


@dataclass(frozen=True)
class OpenVinoOptions:
    """`targets.<name>.options` of an openvino target. The benchmark's latency is one synchronous request;
    its throughput mode compiles the engine once more with the THROUGHPUT hint (and these streams, pinning
    and threads) and keeps `num_requests` requests in flight."""

    performance_hint: Literal["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"] = "LATENCY"
    num_streams: int | None = field(default=None, metadata={"doc": "CPU streams; null: what the hint picks"})
    enable_cpu_pinning: bool | None = field(default=None, metadata={"doc": "pin inference threads to cores; null: OpenVINO's default"})
    num_requests: int | None = field(default=None, metadata={"doc": "throughput mode's requests in flight; null: the optimal number"})

    def check(self, where: str) -> None:
        for key in ("num_streams", "num_requests"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise KilnError(f"{where}.{key} must be a positive integer or null, got {value}")


def knobs(target: Target) -> tuple[Knob, ...]:
    """What kiln.measure.tuning may try for an openvino target (its `tune: true`): the CPU plugin's scheduling settings.
    The precision hint is never tuned: a faster but lower precision is a different target."""
    hint = (Knob("performance_hint", ("LATENCY", "THROUGHPUT"), doc="LATENCY: one stream of all cores; THROUGHPUT: several"),)
    if _device(target) != "CPU":
        return hint
    cores = default_threads()
    return (
        *hint,
        Knob("num_streams", tuple(sorted({1, cores})), doc="1..cores streams, each with cores/streams threads"),
        Knob("enable_cpu_pinning", (True, False)),
        Knob("threads", tuple(sorted({cores, max(1, cores // 2)})), doc="INFERENCE_NUM_THREADS"),
    )


@dataclass(frozen=True)
class OpenVinoCalibration:
    """`targets.<name>.calibration.options` of an openvino int8 target (NNCF's)."""

    preset: Literal["performance", "mixed"] = "performance"  # symmetric, or asymmetric activations
    # {max_drop: 1.0}: NNCF returns layers to float until the top-1 drop on labelled data/eval is at most 1 point.
    accuracy_aware: dict[str, Any] | None = None
    # NNCF's transformer scheme (SmoothQuant, attention's MatMuls quantized, LayerNorm/Softmax kept float);
    # auto: on when the graph has attention (kiln.export.graphs.has_attention)
    model_type: Literal["auto", "cnn", "transformer"] = "auto"
    # SmoothQuant on convolutions too (NNCF's alpha, 0..1; null: off): an activation channel's outliers move into the
    # weights that read it before anything is quantized (kiln debug --repair tries it before any layer goes to float).
    # NNCF runs SmoothQuant with its transformer scheme only, so this turns that on.
    smooth_quant: float | None = None
    # NNCF's overflow fix (7-bit weights, against the saturating u8 x s8 int16 sums of CPUs without VNNI): "auto" is
    # every layer on such a CPU (as ONNX Runtime's reduce_range), NNCF's own default (the first layer only) elsewhere
    overflow_fix: Literal["auto", "enable", "first_layer", "disable"] = "auto"

    def check(self, where: str) -> None:
        if self.smooth_quant is not None and not 0.0 <= self.smooth_quant <= 1.0:
            raise KilnError(f"{where}.smooth_quant must be an alpha between 0 and 1 (or null: off), got {self.smooth_quant!r}")


def _config(target: Target, hint: str | None = None) -> dict[str, Any]:
    options: OpenVinoOptions = runtime_options(RUNTIME, target)
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": HINTS[target.precision],
        "PERFORMANCE_HINT": hint or options.performance_hint,
    }
    if options.num_streams is not None:
        config["NUM_STREAMS"] = options.num_streams
    if _device(target) == "CPU":
        config["INFERENCE_NUM_THREADS"] = target.effective_threads
        if options.enable_cpu_pinning is not None:
            config["ENABLE_CPU_PINNING"] = options.enable_cpu_pinning
    return config


def executed_precision(compiled: ov.CompiledModel) -> str:
    """The precisions the compiled model's compute layers really run in, e.g. 'f32' or 'bf16 (40/42), f32 (2)'."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in COMPUTE_LAYERS and "runtimePrecision" in info:
            counts[info["runtimePrecision"].astype(str).lower()] += 1
    if not counts:
        return str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    if len(counts) == 1:
        return next(iter(counts))
    total = sum(counts.values())
    return ", ".join(f"{p} ({n}/{total})" for p, n in counts.most_common())


def float_layers(model: ov.Model) -> list[str]:
    """Compute layers a quantizer left in float: their weights come straight from a float constant,
    where quantized ones get int8 weights through a dequantizing Convert/Multiply (or a FakeQuantize)."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "MatMul", "GroupConvolution") and op.get_input_size() > 1:
            source = op.input_value(1).get_node()
            if source.get_type_name() == "Constant" and source.get_output_element_type(0).is_real():
                names.append(op.get_friendly_name().removesuffix("/WithoutBiases"))
    return names


def graph_info(model: ov.Model, compiled: ov.CompiledModel) -> dict[str, Any]:
    """What OpenVINO's CPU plugin made of the graph: its runtime model names, per node, the original
    operations fused into it (`originalLayersNames`) and the precision it runs in."""
    from kiln.export.graphs import attention_summary

    skip = {"Parameter", "Result", "Constant"}
    original = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    nodes_in = sum(op.get_type_name() not in skip for op in model.get_ordered_ops())
    fusions: Counter[str] = Counter()
    precisions: Counter[str] = Counter()
    nodes_out = 0
    kinds: list[str] = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind in ("Input", "Output", "Parameter", "Result", "Constant"):
            continue
        nodes_out += 1
        kinds.append(kind)
        if "runtimePrecision" in info:
            precisions[info["runtimePrecision"].astype(str).lower()] += 1
        names = [n for n in (info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else []) if n]
        types = [original[n] for n in names if n in original and original[n] not in skip]
        if len(types) > 1:
            fusions["+".join(dict.fromkeys(types))] += 1
    return {
        "nodes_in": nodes_in,
        "nodes_out": nodes_out,
        "fusions": dict(fusions),
        "attention": attention_summary([op.get_type_name() for op in model.get_ordered_ops()], kinds, fusions),
        "layer_precisions": dict(precisions),
        "source": "OpenVINO runtime model (rt_info originalLayersNames, runtimePrecision)",
    }


class OpenVinoSession:
    """A compiled model is safe to share between threads, an InferRequest is not (it holds the input and output
    tensors of one inference): each concurrent caller of `infer` gets an infer request of its own from a pool."""

    max_concurrent: int | None = None  # any number of threads: one infer request each

    def __init__(
        self, compiled: ov.CompiledModel, throughput_model: Callable[[], ov.CompiledModel] | None = None, requests: int | None = None
    ):
        self.compiled = compiled
        self.requests: InstancePool[ov.InferRequest] = InstancePool(compiled.create_infer_request)
        with self.requests.take():  # the first request now: a compiled model that cannot make one fails at load
            pass
        self.input_names = [i.get_any_name() for i in compiled.inputs]
        self.output_names = [o.get_any_name() for o in compiled.outputs]
        self._throughput_model = throughput_model
        self._requests = requests

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.requests.take() as request:
            # share_outputs=False: the arrays are copies, so the request can serve the next caller while they are read.
            result = request.infer(dict(feeds), share_outputs=False)
            return {name: result[i] for i, name in enumerate(self.output_names)}

    def throughput(self, feeds: Mapping[str, np.ndarray], seconds: float, min_runs: int) -> dict[str, Any]:
        """benchmark_app's throughput method: the engine compiled with the THROUGHPUT hint, an AsyncInferQueue of
        the compiled model's optimal number of requests (or `num_requests`), kept full for `seconds`."""
        compiled = self._throughput_model() if self._throughput_model else self.compiled
        jobs = self._requests or int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue = ov.AsyncInferQueue(compiled, jobs)
        inputs = dict(feeds)
        for _ in range(2 * jobs):  # warm-up: every request runs at least once
            queue.start_async(inputs)
        queue.wait_all()
        runs, start = 0, time.perf_counter()
        while runs < min_runs or time.perf_counter() - start < seconds:
            queue.start_async(inputs)  # blocks while every request is busy: the queue stays full
            runs += 1
        queue.wait_all()
        elapsed = time.perf_counter() - start
        batch = next(iter(inputs.values())).shape[0]
        return {
            "images_per_s": runs * batch / elapsed,
            "runs": runs,
            "requests_in_flight": jobs,
            "streams": int(compiled.get_property("NUM_STREAMS")),
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS"))
            if "CPU" in str(compiled.get_property("EXECUTION_DEVICES"))
            else None,
            "method": "OpenVINO AsyncInferQueue, THROUGHPUT hint",
        }


class OpenVinoRuntime(RegisteredRuntime):
    name = "openvino"
    options_type = OpenVinoOptions
    calibration_options_type = OpenVinoCalibration

    def unavailable_reason(self, target: Target) -> str | None:
        core = ov.Core()
        device = _device(target)
        if device not in core.available_devices:
            return f"OpenVINO {ov.__version__} sees no device '{device}' here (available: {', '.join(core.available_devices)})"
        needed = CAPABILITY.get(target.precision)
        if needed:
            caps = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
            if needed not in caps:
                return (
                    f"{device} ({core.get_property(device, 'FULL_DEVICE_NAME')}) cannot execute {target.precision}: its "
                    f"OPTIMIZATION_CAPABILITIES are {', '.join(caps)}, so OpenVINO would silently run f32"
                )
        return None

    def calibrate(
        self, target: Target, onnx_path: Path, calib: CalibrationSet, settings: CalibrationSettings, out_dir: Path
    ) -> dict[str, Any]:
        """NNCF post-training quantization of the OpenVINO model, statistics gathered image by image."""
        import nncf
        from tqdm import tqdm

        if settings.method == "entropy":
            raise KilnError(
                f"targets.{target.name}: OpenVINO's quantizer (NNCF) has no entropy calibration; use method minmax or percentile"
            )
        presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
        options: OpenVinoCalibration = settings.options
        model = ov.Core().read_model(str(onnx_path))
        # ignored_scope holds ONNX node names; OpenVINO splits some nodes (a Conv's bias becomes an Add),
        # naming the parts "<node>/...": take every part.
        names = [op.get_friendly_name() for op in model.get_ordered_ops()]
        matched = {n: [f for f in names if f == n or f.startswith(n + "/")] for n in settings.ignored_scope}
        unknown = [n for n, found in matched.items() if not found]
        if unknown:
            raise KilnError(f"targets.{target.name}: ignored_scope names no layer of the model: {', '.join(unknown)}")
        ignored = sorted({f for found in matched.values() for f in found})
        from kiln.export.graphs import declared_float_nodes, tail_nodes

        # The tail after the last Conv/MatMul (box decoding, NMS) stays float: see kiln.export.graphs.tail_nodes; so do
        # the nodes the export marked (YOLO's DFL box decoding).
        tail = set(tail_nodes(onnx_path)) | set(declared_float_nodes(onnx_path))
        tail_ops = sorted({f for f in names for n in tail if f == n or f.startswith(n + "/")})
        advanced = None
        if settings.method == "percentile":
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
            from nncf.quantization.range_estimator import RangeEstimatorParametersSet

            # NNCF 3.x names it MEAN_QUANTILE (per-batch quantiles, averaged); older releases QUANTILE.
            quantile = getattr(RangeEstimatorParametersSet, "MEAN_QUANTILE", None) or RangeEstimatorParametersSet.QUANTILE
            advanced = AdvancedQuantizationParameters(activations_range_estimator_params=quantile)
        samples = list(tqdm(calib.samples(), total=len(calib), desc="reading calibration images", unit="img", mininterval=2.0))
        from kiln.export.graphs import has_attention

        transformer = (
            options.model_type == "transformer"
            or (options.model_type == "auto" and has_attention(onnx_path))
            or options.smooth_quant is not None
        )
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        overflow = options.overflow_fix
        if overflow == "auto":
            from kiln.runtimes.fingerprint import collect, has_vnni

            overflow = "first_layer" if has_vnni(collect()["hardware"]["cpu"]["features"]) else "enable"
        advanced = advanced or AdvancedQuantizationParameters()
        advanced.overflow_fix = {"enable": OverflowFix.ENABLE, "first_layer": OverflowFix.FIRST_LAYER, "disable": OverflowFix.DISABLE}[
            overflow
        ]
        if options.smooth_quant is not None:
            from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

            advanced.smooth_quant_alphas = AdvancedSmoothQuantParameters(convolution=options.smooth_quant)
        common = {
            "model_type": nncf.ModelType.TRANSFORMER if transformer else None,
            "preset": presets[options.preset],
            "subset_size": len(samples),
            "ignored_scope": nncf.IgnoredScope(names=sorted({*ignored, *tail_ops}), validate=False) if ignored or tail_ops else None,
        }
        accuracy_aware = options.accuracy_aware
        extra: dict[str, Any] = {}
        if accuracy_aware:
            # NNCF quantizes, measures top-1 on labelled held-out images, and returns layers to float
            # (most damaging first) until the drop is within max_drop points.
            max_drop = float(accuracy_aware.get("max_drop", 1.0))
            validation = calib.labelled_eval()

            def top1(compiled: ov.CompiledModel, items: Any) -> tuple[float, list[float]]:
                output = compiled.outputs[0]
                hits = [float(np.argmax(compiled(x)[output]) == label) for x, label in items]
                return float(np.mean(hits)), hits

            quantized = nncf.quantize_with_accuracy_control(
                model,
                nncf.Dataset(samples),
                nncf.Dataset(validation, lambda item: item[0]),
                top1,
                max_drop=max_drop / 100.0,
                drop_type=nncf.DropType.ABSOLUTE,
                advanced_quantization_parameters=advanced,
                **common,
            )
            extra = {"accuracy_aware": {"max_drop_points": max_drop, "eval_images": len(validation)}}
        else:
            quantized = nncf.quantize(model, nncf.Dataset(samples), advanced_parameters=advanced, **common)
        ov.save_model(quantized, str(out_dir / IR), compress_to_fp16=False)
        return {
            "artifact": IR,
            "method": settings.method,
            "preset": options.preset,
            "model_type": "transformer" if transformer else "default (cnn)",
            "smooth_quant": options.smooth_quant,
            "overflow_fix": overflow,
            "float_tail": len(tail_ops),
            "quantizer": f"nncf {nncf.__version__}",
            "float_layers": float_layers(quantized),
            **extra,
        }

    def layer_activations(
        self, onnx_path: Path, calibration_dir: Path, feeds: Mapping[str, np.ndarray]
    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Outputs of each compute layer (matched by name) in the fp32 model and in NNCF's quantized model, run in f32."""
        core = ov.Core()
        fp32, quantized = core.read_model(str(onnx_path)), core.read_model(str(calibration_dir / IR))
        fp32_ops = {op.get_friendly_name(): op for op in fp32.get_ordered_ops()}
        quantized_ops = {op.get_friendly_name(): op for op in quantized.get_ordered_ops()}
        layers = []
        for op in quantized.get_ordered_ops():
            if op.get_type_name() not in ("Convolution", "MatMul", "GroupConvolution"):
                continue
            # A Conv/Gemm with bias is split into "<node>/WithoutBiases" + an Add named "<node>": compare after the bias.
            name = op.get_friendly_name().removesuffix("/WithoutBiases")
            name = name if name in quantized_ops and name in fp32_ops else op.get_friendly_name()
            if name in fp32_ops:
                layers.append(name)

        def run(model: ov.Model, ops: dict[str, Any]) -> list[np.ndarray]:
            model.add_outputs([ops[name].output(0) for name in layers])
            # With low-precision transformations on, the CPU plugin fuses Conv+FakeQuantize and returns zeros
            # for outputs added inside the fused int8 chain (seen with OpenVINO 2026.4); off, it simulates the
            # quantization in f32, which is what a per-layer error needs.
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "LP_TRANSFORMS_MODE": "NO"})
            result = compiled.create_infer_request().infer(dict(feeds))
            # Match results to layers by the node that produces them: the plugin may order outputs its own way.
            by_producer = {}
            for port, result_node in zip(compiled.outputs, model.get_results()):
                by_producer[result_node.input_value(0).get_node().get_friendly_name()] = np.asarray(result[port])
            return [by_producer[name] for name in layers]

        ref, got = run(fp32, fp32_ops), run(quantized, quantized_ops)
        return list(zip(layers, ref, got))

    def boundary_activations(self, engine_dir: Path, target: Target, source_onnx: Path, feeds: Mapping[str, np.ndarray]) -> Boundaries:
        from kiln.runtimes.openvino.boundaries import ov_boundaries

        mode, names, arrays, note = ov_boundaries(engine_dir, source_onnx, target, feeds)
        return Boundaries(mode, note, dict(zip(names, arrays)))

    def build(self, target: Target, source: BuildSource, engine_dir: Path) -> dict[str, Any]:
        core = ov.Core()
        model = core.read_model(str(source.onnx_path if target.precision != "int8" else Path(source.calibration_dir or ".") / IR))
        # fp32 weights in the IR: precision is decided at compile time by the hint, not by lossy storage.
        ov.save_model(model, str(engine_dir / IR), compress_to_fp16=False)
        compiled = core.compile_model(model, _device(target), _config(target))
        executed = executed_precision(compiled)
        return {
            "executed_precision": executed,
            "device_name": core.get_property(_device(target), "FULL_DEVICE_NAME"),
            "compile_config": {k: str(v) for k, v in _config(target).items()},
            "graph": graph_info(model, compiled),
        }

    def knobs(self, target: Target) -> tuple[Knob, ...]:
        return knobs(target)

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> OpenVinoSession:
        # A failure here reaches the user through engine.load_engine, with OpenVINO's whole message.
        core = ov.Core()
        path, device = str(engine_dir / IR), _device(target)
        options: OpenVinoOptions = runtime_options(self, target)
        # The throughput mode's model: the THROUGHPUT hint picks streams unless the target sets them.
        throughput_hint = options.performance_hint if options.performance_hint != "LATENCY" else "THROUGHPUT"
        return OpenVinoSession(
            core.compile_model(path, device, _config(target)),
            lambda: core.compile_model(path, device, _config(target, throughput_hint)),
            options.num_requests,
        )


RUNTIME = OpenVinoRuntime()
