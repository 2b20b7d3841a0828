"""ONNX Runtime on the CPU: the graph optimised offline for this machine and saved in the engine folder."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import numpy as np
import onnxruntime as ort

from kiln.config.views import Target, default_threads
from kiln.core.errors import KilnError, first_line
from kiln.export.graphs import COMPUTE_OPS
from kiln.runtimes import Boundaries, BuildSource, Knob, RegisteredRuntime, runtime_options
from kiln.runtimes.qdq import PREPROCESSED, QDQ, check_ignored_scope, quantize_qdq

if TYPE_CHECKING:
    from kiln.data.calibration_set import CalibrationSet, CalibrationSettings

OPTIMIZED = "model.optimized.onnx"
# The compute ops ONNX Runtime's QDQ quantizer gives int8 weights (Einsum and the attention ops keep float
# inputs on the CPU): a float one left in a quantized graph is a layer kept in float.
QUANTIZABLE_OPS = COMPUTE_OPS - {"Einsum", "Attention", "MultiHeadAttention"}
INT8_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool"}
log = logging.getLogger(__name__)

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """`targets.<name>.options` of an onnxruntime target."""

    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    execution_mode: Literal["sequential", "parallel"] = field(
        default="sequential", metadata={"doc": "parallel: independent branches of the graph run at once (inter-op threads)"}
    )
    allow_spinning: bool = field(default=True, metadata={"doc": "intra-op threads spin-wait for work instead of sleeping"})
    parallel_runs: int | None = field(default=None, metadata={"doc": "throughput mode's sessions in flight; null: one per core"})

    def check(self, where: str) -> None:
        if self.parallel_runs is not None and self.parallel_runs < 1:
            raise KilnError(f"{where}.parallel_runs must be a positive integer or null, got {self.parallel_runs}")


def knobs(target: Target) -> tuple[Knob, ...]:
    """What kiln.measure.tuning may try for an onnxruntime target: session options, and the level of the graph
    optimisers (which rewrite the saved graph, so a new level is a new build)."""
    cores = default_threads()
    return (
        Knob("allow_spinning", (False,)),
        Knob("execution_mode", ("parallel",)),
        Knob("graph_optimization_level", ("extended",), rebuild=True),
        Knob("threads", tuple(sorted({cores, max(1, cores // 2)})), doc="intra-op threads"),
    )


@dataclass(frozen=True)
class OnnxRuntimeCalibration:
    """`targets.<name>.calibration.options` of an onnxruntime int8 target."""

    # 7-bit weights: "auto" turns them on for CPUs without VNNI, whose u8 x s8 kernels saturate int16.
    reduce_range: bool | Literal["auto"] = "auto"
    # Cross-layer equalization of Conv -> ReLU -> Conv pairs before quantizing (kiln.runtimes.equalize): an outlier
    # channel's range moves into the weights that read it (kiln debug --repair tries it before any layer goes to float)
    equalize: bool = False


def _options(target: Target, level: ort.GraphOptimizationLevel, threads: int | None = None) -> ort.SessionOptions:
    options: OnnxRuntimeOptions = runtime_options(RUNTIME, target)
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = threads or target.effective_threads
    if options.execution_mode == "parallel":
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        so.inter_op_num_threads = min(2, target.effective_threads)
    else:
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
    so.log_severity_level = 3
    return so


class OrtSession:
    """One InferenceSession; its `run` is thread-safe (ONNX Runtime documents concurrent Run calls on one session
    as supported: each call gets its own execution frame), so serving workers share it."""

    max_concurrent: int | None = None

    def __init__(self, session: ort.InferenceSession, parallel: Callable[[int], ort.InferenceSession] | None = None, runs: int = 1):
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._parallel = parallel
        self._runs = runs

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(feeds))))

    def throughput(self, feeds: Mapping[str, np.ndarray], seconds: float, min_runs: int) -> dict[str, Any]:
        """Several sessions of the engine, the cores split between them, each run in a loop by its own thread
        (ONNX Runtime releases the GIL while it runs): the requests in flight of a CPU server."""
        from concurrent.futures import ThreadPoolExecutor

        n = self._runs
        sessions = [self._parallel(n) for _ in range(n)] if self._parallel and n > 1 else [self.session]
        inputs = dict(feeds)
        for s in sessions:
            s.run(self.output_names, inputs)
        deadline = time.perf_counter() + seconds
        each = max(1, -(-min_runs // len(sessions)))

        def loop(s: ort.InferenceSession) -> int:
            runs = 0
            while runs < each or time.perf_counter() < deadline:
                s.run(self.output_names, inputs)
                runs += 1
            return runs

        start = time.perf_counter()
        with ThreadPoolExecutor(len(sessions)) as pool:
            runs = sum(pool.map(loop, sessions))
        elapsed = time.perf_counter() - start
        batch = next(iter(inputs.values())).shape[0]
        return {
            "images_per_s": runs * batch / elapsed,
            "runs": runs,
            "requests_in_flight": len(sessions),
            "threads_per_request": sessions[0].get_session_options().intra_op_num_threads,
            "method": "ONNX Runtime: one session per request in flight, cores split between them, a thread each",
        }


def layer_precisions(nodes: Any) -> dict[str, int]:
    """Compute layers per precision in an (optimised) graph: quantized kernels are int8, the rest fp32."""
    int8 = sum(n.op_type in INT8_OPS or n.op_type.startswith("QLinear") for n in nodes)
    fp = sum(n.op_type in QUANTIZABLE_OPS or n.op_type.startswith("Fused") for n in nodes)
    return {k: v for k, v in (("int8", int8), ("fp32", fp)) if v}


def executed_precision(precisions: Mapping[str, int]) -> str:
    """int8 when the optimised graph runs its convolutions/matmuls as quantized kernels."""
    if "int8" not in precisions:
        return "fp32"
    return "int8" if "fp32" not in precisions else f"int8 ({precisions['int8']} ops), fp32 ({precisions['fp32']} ops)"


def graph_info(given: Path, optimized: Path) -> dict[str, Any]:
    """Nodes before and after ONNX Runtime's graph optimisers. Its CPU kernels fuse an activation (and a
    residual Add) into the convolution (FusedConv, or NCHWc Conv with an `activation` attribute and a Sum input)."""
    from collections import Counter

    import onnx

    given_nodes = onnx.load(str(given), load_external_data=False).graph.node
    out_nodes = onnx.load(str(optimized), load_external_data=False).graph.node
    fusions: Counter[str] = Counter()
    for n in out_nodes:
        if n.op_type in ("Conv", "FusedConv") and n.domain.startswith("com.microsoft"):
            activation = next((a.s.decode() for a in n.attribute if a.name == "activation"), None)
            parts = ["Conv", *(["Add"] if len(n.input) > 3 and n.input[3] else []), *([activation] if activation else [])]
            if len(parts) > 1:
                fusions["+".join(parts)] += 1
        elif n.op_type in ("ReorderInput", "ReorderOutput"):
            fusions["NCHWc layout reorder (added)"] += 1
    removed = Counter(n.op_type for n in given_nodes) - Counter(n.op_type for n in out_nodes)
    for op in ("BatchNormalization", "Identity"):
        if removed.get(op):
            fusions[f"{op} folded away"] += removed[op]
    from kiln.export.graphs import attention_summary

    return {
        "nodes_in": len(given_nodes),
        "nodes_out": len(out_nodes),
        "fusions": dict(fusions),
        "attention": attention_summary([n.op_type for n in given_nodes], [n.op_type for n in out_nodes], fusions),
        "layer_precisions": layer_precisions(out_nodes),
        "source": "ONNX graph vs ONNX Runtime's optimised graph (compute layers for precisions)",
    }


class OnnxRuntimeRuntime(RegisteredRuntime):
    name = "onnxruntime"
    options_type = OnnxRuntimeOptions
    calibration_options_type = OnnxRuntimeCalibration

    def unavailable_reason(self, target: Target) -> str | None:
        if target.device != "cpu":
            return f"kiln's onnxruntime targets use the CPU execution provider; device '{target.device}' is not supported yet"
        return None

    def calibrate(
        self, target: Target, onnx_path: Path, calib: CalibrationSet, settings: CalibrationSettings, out_dir: Path
    ) -> dict[str, Any]:
        """Static QDQ quantization: per-channel int8 weights, activations calibrated on `calib`."""
        import onnx
        from onnxruntime.quantization import QuantType

        from kiln.runtimes.fingerprint import collect, has_vnni

        check_ignored_scope(onnx_path, settings, target.name)
        # Without VNNI, x86 int8 kernels multiply u8 x s8 pairs into saturating int16 (vpmaddubsw);
        # 7-bit weights avoid the overflow that otherwise wrecks accuracy.
        reduce_range = settings.options.reduce_range
        if reduce_range == "auto":
            reduce_range = not has_vnni(collect()["hardware"]["cpu"]["features"])
        equalized: list[int] = []

        def equalize(pre: Path) -> None:
            from kiln.runtimes.equalize import equalize_file

            equalized.append(equalize_file(pre))

        quantize_qdq(
            onnx_path,
            out_dir,
            calib,
            settings,
            self.name,
            prepare=equalize if settings.options.equalize else None,
            per_channel=True,
            reduce_range=bool(reduce_range),
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        qdq = onnx.load(str(out_dir / QDQ), load_external_data=False)
        dequantized = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
        # A compute node whose weights do not come through DequantizeLinear stayed in float.
        float_nodes = [
            n.name for n in qdq.graph.node if n.op_type in QUANTIZABLE_OPS and len(n.input) > 1 and n.input[1] not in dequantized
        ]
        return {
            "artifact": QDQ,
            "method": settings.method,
            "per_channel": True,
            "reduce_range": bool(reduce_range),
            "format": "QDQ u8s8",
            "float_layers": float_nodes,
            "equalized_pairs": equalized[0] if equalized else None,
        }

    def layer_activations(
        self, onnx_path: Path, calibration_dir: Path, feeds: Mapping[str, np.ndarray]
    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Outputs of each quantized compute node, in the fp32 graph and in the QDQ graph (same tensor names)."""
        import onnx

        qdq = onnx.load(str(calibration_dir / QDQ))
        # Pre-processing fused some nodes (Conv+BatchNorm): compare with the graph it produced, not the export.
        fp32 = onnx.load(str(calibration_dir / PREPROCESSED))
        produced = {o for n in fp32.graph.node for o in n.output}
        qdq_tensors = {o for n in qdq.graph.node for o in n.output}
        layers: list[tuple[str, str, str]] = []  # (node, tensor in the fp32 graph, tensor in the QDQ graph)
        for n in qdq.graph.node:
            if n.op_type not in QUANTIZABLE_OPS:
                continue
            # The quantizer folds a following Relu into the output quantization and renames final outputs;
            # compare what the next layer really sees: the dequantized tensor of the original name.
            name = n.output[0].removesuffix("_QuantizeLinear_Input")
            seen = f"{name}_DequantizeLinear_Output" if f"{name}_DequantizeLinear_Output" in qdq_tensors else name
            if name in produced and seen in qdq_tensors | {o.name for o in qdq.graph.output}:
                layers.append((n.name, name, seen))

        def run(model: Any, names: list[str]) -> list[np.ndarray]:
            existing = {o.name for o in model.graph.output}
            model.graph.output.extend(
                onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names if t not in existing
            )
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return sess.run(names, dict(feeds))

        ref = run(fp32, [t for _, t, _ in layers])
        got = run(qdq, [t for _, _, t in layers])
        return [(node, r, g) for (node, _, _), r, g in zip(layers, ref, got)]

    def boundary_activations(self, engine_dir: Path, target: Target, source_onnx: Path, feeds: Mapping[str, np.ndarray]) -> Boundaries:
        from kiln.runtimes.onnxruntime.boundaries import ort_boundaries

        mode, names, arrays, note = ort_boundaries(engine_dir, source_onnx, feeds, threads=target.effective_threads)
        return Boundaries(mode, note, dict(zip(names, arrays)))

    def build(self, target: Target, source: BuildSource, engine_dir: Path) -> dict[str, Any]:
        level_name = runtime_options(self, target).graph_optimization_level
        so = _options(target, LEVELS[level_name])
        so.optimized_model_filepath = str(engine_dir / OPTIMIZED)
        # Creating the session runs the optimisers and writes the optimised graph.
        model = source.onnx_path if target.precision == "fp32" else Path(source.calibration_dir or ".") / QDQ
        ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        graph = graph_info(model, engine_dir / OPTIMIZED)
        rejected = None
        try:  # the saved graph must load as it is: that is what the engine is
            ort.InferenceSession(str(engine_dir / OPTIMIZED), _options(target, LEVELS["disable"]), providers=["CPUExecutionProvider"])
        except Exception as e:
            # Seen on Mask R-CNN: the optimised graph of a model with ONNX Loops is saved with a subgraph name twice ("Graph
            # must be in single static assignment form"). The engine keeps the graph it was given, optimised at each load.
            rejected = first_line(e)[:300]
            shutil.copyfile(model, engine_dir / OPTIMIZED)
            log.warning("ONNX Runtime's saved optimised graph does not load again (%s): the engine optimises at load instead", rejected)
        return {
            "executed_precision": executed_precision(graph["layer_precisions"]),
            "graph_optimization_level": level_name,
            "provider": "CPUExecutionProvider",
            "graph": graph,
            "optimize_at_load": level_name if rejected else None,
            "optimized_graph_rejected": rejected,
        }

    def knobs(self, target: Target) -> tuple[Knob, ...]:
        return knobs(target)

    def load(self, engine_dir: Path, manifest: Mapping[str, Any], target: Target) -> OrtSession:
        # The saved graph is already optimised (with layouts for this CPU): optimising it again is wasted work; unless
        # ONNX Runtime could not save it in a form it loads (build: optimize_at_load).
        at_load = manifest.get("optimize_at_load")
        path, off = str(engine_dir / OPTIMIZED), LEVELS[at_load] if at_load else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        cores = target.effective_threads
        runs = runtime_options(self, target).parallel_runs or cores

        def parallel(n: int) -> ort.InferenceSession:
            return ort.InferenceSession(path, _options(target, off, max(1, cores // n)), providers=["CPUExecutionProvider"])

        return OrtSession(ort.InferenceSession(path, _options(target, off), providers=["CPUExecutionProvider"]), parallel, runs)


RUNTIME = OnnxRuntimeRuntime()
