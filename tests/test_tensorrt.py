"""The TensorRT runtime: its plain-Python parts run everywhere; engines need TensorRT and an NVIDIA GPU.

Tests marked `gpu` skip with a reason where TensorRT or a CUDA GPU is missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import unavailable

from kiln.config.views import InputSpec, Target
from kiln.core.errors import KilnError
from kiln.data.calibration_set import CalibrationSettings
from kiln.pipeline.engine import build_engine, load_engine
from kiln.runtimes import BuildSource, get_runtime
from kiln.runtimes import tensorrt as trt_runtime
from kiln.runtimes.tensorrt import plan
from kiln.runtimes.tensorrt.plan import (
    builder_settings,
    executed_precision,
    gpu_mismatch,
    onnx_graph_inputs,
    precision_plan,
    precision_problem,
    select_profile,
    shape_profiles,
    summarize_layers,
)

ROOT = Path(__file__).resolve().parents[1]
GRAPH = {"input": (None, 3, 16, 16)}


def target(name: str = "trt", **raw) -> Target:
    return Target.from_params(name, {"targets": {name: {"runtime": "tensorrt", "device": "cuda", **raw}}})


def _can_run_tensorrt() -> str | None:
    import torch

    if trt_runtime.tensorrt_version() is None:
        return "TensorRT is not installed (pip install '.[tensorrt]', from NVIDIA's index pypi.nvidia.com)"
    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is false)"
    return None


GPU_SKIP = _can_run_tensorrt()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=f"needs TensorRT and an NVIDIA GPU: {GPU_SKIP}")


def test_module_imports_without_tensorrt_and_is_registered():
    runtime = get_runtime("tensorrt")
    assert runtime is trt_runtime.RUNTIME
    assert runtime.name == "tensorrt" and runtime.libraries == ("tensorrt",)
    assert runtime.precisions == ("fp32", "fp16", "bf16", "int8", "fp8")


# ---- shape profiles ----


def test_graph_inputs_of_a_real_export(tiny_onnx):
    path, _, _ = tiny_onnx
    assert onnx_graph_inputs(path) == GRAPH


def test_batch_profile_goes_on_axis_0_of_every_input(tiny_onnx):
    path, spec, _ = tiny_onnx
    profiles = shape_profiles(target(profile={"min": 2, "opt": 4, "max": 16}), onnx_graph_inputs(path), spec.inputs)
    assert profiles == [{"input": ((2, 3, 16, 16), (4, 3, 16, 16), (16, 3, 16, 16))}]


def test_dynamic_dims_other_than_batch_come_from_the_model_spec():
    graph = {"image": (None, 3, None, None)}
    spec = [InputSpec("image", (3, 224, 224))]
    assert shape_profiles(target(), graph, spec) == [{"image": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))}]
    with pytest.raises(
        KilnError, match=r"'image' has dynamic dim 2 .*set model.inputs.image.shape or list full shapes in targets.trt.options.profiles"
    ):
        shape_profiles(target(), graph, [])


def test_explicit_profiles_several(tiny_onnx):
    path, spec, _ = tiny_onnx
    raw = [
        {"input": {"min": [1, 3, 16, 16], "opt": [1, 3, 16, 16], "max": [4, 3, 16, 16]}},
        {"input": {"min": [8, 3, 16, 16], "opt": [32, 3, 16, 16], "max": [64, 3, 16, 16]}},
    ]
    profiles = shape_profiles(target(options={"profiles": raw}), onnx_graph_inputs(path), spec.inputs)
    assert profiles == [
        {"input": ((1, 3, 16, 16), (1, 3, 16, 16), (4, 3, 16, 16))},
        {"input": ((8, 3, 16, 16), (32, 3, 16, 16), (64, 3, 16, 16))},
    ]
    as_params = plan.profiles_to_params(profiles)
    assert as_params[1] == {"input": {"min": [8, 3, 16, 16], "opt": [32, 3, 16, 16], "max": [64, 3, 16, 16]}}
    assert select_profile(as_params, {"input": (2, 3, 16, 16)}) == 0
    assert select_profile(as_params, {"input": (48, 3, 16, 16)}) == 1
    with pytest.raises(
        KilnError,
        match=re.escape(
            "input shapes input [6, 3, 16, 16] are outside the engine's optimization profiles "
            "(profile 0: input min [1, 3, 16, 16] opt [1, 3, 16, 16] max [4, 3, 16, 16]; profile 1:"
        ),
    ):
        select_profile(as_params, {"input": (6, 3, 16, 16)})


def one(shapes: dict) -> dict:
    return {"profiles": [{"input": shapes}]}


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"profiles": [{"inputs": {"min": [1, 3, 16, 16], "opt": [1, 3, 16, 16], "max": [1, 3, 16, 16]}}]},
            r"profiles\[0\] names input 'inputs', which the ONNX graph does not have \(did you mean 'input'\?\); its inputs: input",
        ),
        (one({"min": [1, 3, 16], "opt": [1, 3, 16], "max": [1, 3, 16]}), r"profiles\[0\].input.min has 3 dims, but the ONNX input has 4"),
        (one({"min": [4, 3, 16, 16], "opt": [2, 3, 16, 16], "max": [8, 3, 16, 16]}), r"dim 0 must satisfy min <= opt <= max, got 4, 2, 8"),
        (
            one({"min": [1, 3, 8, 8], "opt": [1, 3, 16, 16], "max": [1, 3, 16, 16]}),
            r"dim 2 is fixed to 16 in the ONNX graph, the profile gives 8..16",
        ),
        (one({"min": [1, 3, 16, 16], "max": [1, 3, 16, 16]}), r"must have exactly the keys min, opt and max"),
        (one({"min": [0, 3, 16, 16], "opt": [1, 3, 16, 16], "max": [1, 3, 16, 16]}), r"input.min must be a list of 4 positive integers"),
        ({"profiles": [{}]}, r"gives no shapes for the dynamic input\(s\) input"),
        ({"profiles": {"input": {}}}, r"must be a non-empty list of profiles"),
    ],
)
def test_bad_profiles_say_what_is_wrong(options, message):
    with pytest.raises(KilnError, match=message):
        shape_profiles(target(options=options), GRAPH)


def test_gpu_target_set_parses():
    from kiln.config.params import compose

    raw = compose(["targets=gpu"], ROOT / "conf")["targets"]
    targets = {name: Target.from_params(name, {"targets": raw}) for name in raw}
    assert {"torch-eager", "tensorrt-fp16", "tensorrt-int8", "torch-cuda-fp16", "torch-compile-cuda"} <= set(targets)
    assert targets["torch-eager"].precision == "fp32" and targets["torch-eager"].device == "cuda"  # the report's baseline
    for t in targets.values():
        assert t.device == "cuda"
        if t.runtime == "tensorrt":
            assert t.precision in trt_runtime.RUNTIME.precisions
            assert builder_settings(t)["workspace_mib"] == 4096
            assert shape_profiles(t, GRAPH) == [{"input": ((1, 3, 16, 16), (8, 3, 16, 16), (32, 3, 16, 16))}]


# ---- builder options ----


def test_builder_settings_defaults_and_values():
    assert builder_settings(target()) == {
        "builder_optimization_level": 3,
        "workspace_mib": None,
        "timing_cache": ".cache/kiln/tensorrt/timing.cache",
        "tf32": True,
        "autocast": {},
    }
    s = builder_settings(target(options={"builder_optimization_level": 5, "workspace_mib": 4096, "timing_cache": False, "tf32": False}))
    assert s["builder_optimization_level"] == 5 and s["workspace_mib"] == 4096 and s["timing_cache"] is None and s["tf32"] is False


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"builder_optimisation_level": 3},
            r"has unknown keys \['builder_optimisation_level'\] \(did you mean 'builder_optimization_level'\?\); known:",
        ),
        ({"builder_optimization_level": 7}, r"builder_optimization_level must be an integer from 0 .* to 5"),
        ({"workspace_mib": 0}, r"workspace_mib must be a positive number of MiB"),
        ({"timing_cache": 3}, r"timing_cache must be a file path, or false"),
        ({"tf32": "yes"}, r"tf32 must be true"),
    ],
)
def test_bad_builder_options_say_what_is_wrong(options, message):
    with pytest.raises(KilnError, match=message):
        builder_settings(target(options=options))


# ---- precision, GPU checks ----


def test_precision_needs_a_capable_gpu():
    assert (
        precision_problem("bf16", (7, 5), "Tesla T4")
        == "Tesla T4 (compute capability 7.5) cannot run bf16: it needs compute capability 8.0 or newer"
    )
    assert "needs compute capability 8.9" in precision_problem("fp8", (8, 6), "NVIDIA A10")
    assert precision_problem("fp8", (9, 0), "NVIDIA H100") is None and precision_problem("fp32", (5, 0), "old") is None


def test_precision_plan_prefers_strong_typing():
    assert precision_plan("int8", True, False) == plan.PrecisionPlan("qdq", True)
    assert precision_plan("fp8", False, False).strongly_typed
    assert precision_plan("fp16", True, True) == plan.PrecisionPlan("autocast", True)
    assert precision_plan("bf16", True, False) == plan.PrecisionPlan("onnx", False, "BF16")  # TensorRT 10.x, deprecated path
    with pytest.raises(
        KilnError,
        match=r"needs a graph converted to fp16 by NVIDIA ModelOpt's AutoCast, which does not import here: `pip install '.\[tensorrt\]'`",
    ):
        precision_plan("fp16", False, False)  # TensorRT 11.x without ModelOpt
    assert precision_plan("fp32", False, False) == plan.PrecisionPlan("onnx", True)


def test_gpu_mismatch_says_what_differs():
    built = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.13.0.35", "driver": "x"}
    assert gpu_mismatch(built, {**built, "driver": "y"}) is None
    here = {**built, "name": "NVIDIA L4", "compute_capability": "8.9"}
    assert gpu_mismatch(built, here) == "GPU NVIDIA H100 80GB HBM3 (here: NVIDIA L4), compute capability 9.0 (here: 8.9)"


# ---- engine inspector JSON ----

INSPECTOR_JSON = {
    "Layers": [
        {
            "Name": "Reformatting CopyNode for Input Tensor 0 to node_Conv_19 + node_relu",
            "LayerType": "Reformat",
            "Inputs": [{"Name": "input", "Location": "Device", "Dimensions": [8, 3, 16, 16], "Format/Datatype": "Row major linear FP32"}],
            "Outputs": [
                {
                    "Name": "Reformatted Input Tensor 0",
                    "Location": "Device",
                    "Dimensions": [8, 3, 16, 16],
                    "Format/Datatype": "Channel major FP16 format where channel % 8 == 0",
                }
            ],
        },
        {
            "Name": "node_Conv_19 + node_relu",
            "LayerType": "CaskConvolution",
            "Metadata": "[ONNX Layer: node_Conv_19]\u001e[ONNX Layer: node_relu]",
            "Inputs": [
                {
                    "Name": "Reformatted Input Tensor 0",
                    "Dimensions": [8, 3, 16, 16],
                    "Format/Datatype": "Channel major FP16 format where channel % 8 == 0",
                }
            ],
            "Outputs": [
                {"Name": "relu", "Dimensions": [8, 8, 16, 16], "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}
            ],
            "ParameterType": "Convolution",
            "Kernel": [3, 3],
            "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16",
            "TacticValue": "0x1",
        },
        {
            "Name": "/features/features.3/Conv + /features/features.5/Relu",
            "LayerType": "CaskConvolution",
            "Outputs": [
                {"Name": "relu_1", "Dimensions": [8, 8, 16, 16], "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}
            ],
        },
        {
            "Name": "node_avg_pool2d",
            "LayerType": "CaskPooling",
            "Outputs": [{"Name": "avg", "Dimensions": [8, 8, 4, 4], "Format/Datatype": "Half"}],
        },
        {
            "Name": "{ForeignNode[node_Reshape_23...node_linear]}",
            "LayerType": "Myelin",
            "Outputs": [{"Name": "output", "Dimensions": [8, 10], "Format/Datatype": "Row major linear FP32"}],
        },
    ],
    "Bindings": ["input", "output"],
}


def test_inspector_json_is_summarized():
    ops = {"node_Conv_19": "Conv", "node_relu": "Relu", "node_avg_pool2d": "AveragePool"}
    graph = summarize_layers(json.dumps(INSPECTOR_JSON), ops)
    assert graph["nodes_out"] == 5 and graph["reformats"] == 1
    # fused from Metadata, from ' + ' in the name (op kinds from the path), and a Myelin region
    assert graph["fusions"] == {"Conv+Relu": 2, "ForeignNode (Myelin)": 1}
    assert graph["layer_precisions"] == {"fp16": 4, "fp32": 1}
    assert executed_precision(graph["layer_precisions"], "fp16") == "fp16 (4/5), fp32 (1/5)"
    # engines built with LAYER_NAMES_ONLY list bare names: counts still work, precisions are unknown
    names_only = summarize_layers(json.dumps({"Layers": ["a + b", "c"]}))
    assert names_only["nodes_out"] == 2 and names_only["fusions"] == {"a+b": 1} and names_only["layer_precisions"] == {}
    assert executed_precision({}, "fp32") == "fp32 (not inspected)"
    assert executed_precision({"int8": 30, "int32": 2}, "int8") == "int8"
    # TensorRT 11 replaced the top-level "Bindings" with "I/O Tensors"; the layers read the same
    v11 = {"Layers": INSPECTOR_JSON["Layers"], "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Float"}]}
    assert summarize_layers(json.dumps(v11), ops) == graph


@pytest.mark.parametrize(
    "fmt, precision",
    [
        ("Thirty-two wide channel vectorized row major Int8 format", "int8"),
        ("Row major linear BFloat16 format", "bf16"),
        ("Row major linear FP8 format", "fp8"),
        ("Float", "fp32"),
        ("Row major linear UInt8 format", "uint8"),
        ("Row major linear Int32", "int32"),
        ("Row major linear FP32 format (kLINEAR)", "fp32"),
    ],
)
def test_inspector_datatypes(fmt, precision):
    assert plan._precision(fmt) == precision


# ---- this machine ----


@pytest.mark.skipif(GPU_SKIP is None, reason="this machine can run TensorRT")
def test_unavailable_reason_names_what_is_missing():
    import torch

    reason = trt_runtime.RUNTIME.unavailable_reason(target())
    if trt_runtime.tensorrt_version() is None:
        assert "TensorRT is not installed: `pip install '.[tensorrt]'`" in reason and "pypi.nvidia.com" in reason
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in reason and "torch.cuda.is_available() is false" in reason
    cpu = trt_runtime.RUNTIME.unavailable_reason(target(device="cpu"))
    assert cpu == "TensorRT runs on NVIDIA GPUs: device must be 'cuda' or 'cuda:N', not 'cpu'"


@pytest.mark.skipif(GPU_SKIP is None, reason="this machine can run TensorRT")
def test_building_here_fails_with_the_reason_not_an_import_error(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    reason = trt_runtime.RUNTIME.unavailable_reason(target("tensorrt-fp16", precision="fp16"))
    with pytest.raises(KilnError) as e:
        build_engine(target("tensorrt-fp16", precision="fp16"), BuildSource(path, spec), tmp_path / "e")
    assert (
        str(e.value)
        == f"targets.tensorrt-fp16: cannot build on this machine: {reason} (mark the target `required: false` to skip it on such machines)"
    )
    assert not (tmp_path / "e").exists()
    # the runtime's own build refuses too (for callers that skip kiln.pipeline.engine)
    with pytest.raises(KilnError, match="cannot build with TensorRT here"):
        trt_runtime.RUNTIME.build(target(), BuildSource(path, spec), tmp_path)


@pytest.mark.skipif(GPU_SKIP is None, reason="this machine can run TensorRT")
def test_optional_target_is_skipped_with_the_reason(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    manifest = build_engine(target("tensorrt-int8", precision="int8", required=False), BuildSource(path, spec), tmp_path / "e")
    assert manifest["skipped"] == trt_runtime.RUNTIME.unavailable_reason(target(precision="int8"))
    with pytest.raises(KilnError, match="was skipped when built"):
        load_engine(tmp_path / "e", target("tensorrt-int8", precision="int8", required=False))


# ---- explicit quantization (runs in ONNX Runtime) ----


class RandomImages:
    """Stands in for kiln's CalibrationSet: a few batches of images."""

    def __init__(self, n: int = 32, batch: int = 8, seed: int = 0):
        self.data = np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)
        self.batch = batch

    def __len__(self) -> int:
        return len(self.data)

    def batches(self):
        for i in range(0, len(self.data), self.batch):
            yield {"input": self.data[i : i + self.batch]}


def _run(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    # The graph as written: ONNX Runtime 1.32's CPU graph optimizations (ORT_ENABLE_ALL) miscompute float8 Q/DQ
    # graphs (cosine 0.93 to fp32 where the unoptimized graph gives 0.9995), its own float8 quantizer's included.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def test_int8_calibration_writes_a_symmetric_qdq_graph_close_to_fp32(tmp_path, tiny_onnx):
    path, _, _ = tiny_onnx
    info = trt_runtime.RUNTIME.calibrate(target(precision="int8"), path, RandomImages(), CalibrationSettings(), tmp_path)
    assert info["artifact"] == "model.qdq.onnx" and info["method"] == "minmax" and info["symmetric"]
    qdq = onnx.load(str(tmp_path / "model.qdq.onnx"))
    onnx.checker.check_model(qdq, full_check=True)
    inits = _initializers(qdq)
    quantize = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    assert quantize and len(quantize) == len(dequantize)  # Q/DQ pairs, weights included (TensorRT's explicit quantization)
    for node in quantize + dequantize:
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name  # symmetric int8
    # every Conv/Gemm takes its weight from a DQ, per output channel for the convolutions
    produced_by = {o: n for n in qdq.graph.node for o in n.output}
    for node in (n for n in qdq.graph.node if n.op_type in ("Conv", "Gemm")):
        dq = produced_by[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        if node.op_type == "Conv":
            assert inits[dq.input[1]].shape == (inits[produced_by[dq.input[0]].input[0]].shape[0],)
        assert len(node.input) < 3 or node.input[2] in inits and inits[node.input[2]].dtype == np.float32  # float bias
    x = RandomImages(8, seed=1).data
    ref, got = _run(path, x), _run(tmp_path / "model.qdq.onnx", x)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.99 and (ref.argmax(1) == got.argmax(1)).mean() >= 0.75, (cosine, np.abs(ref - got).max())


def test_fp8_calibration_writes_e4m3_qdq_scaled_by_amax(tmp_path, tiny_onnx):
    path, _, _ = tiny_onnx
    info = trt_runtime.RUNTIME.calibrate(target(precision="fp8"), path, RandomImages(), CalibrationSettings(), tmp_path)
    assert info["method"] == "minmax" and "float8 e4m3fn (amax/448)" in info["format"]
    qdq = onnx.load(str(tmp_path / "model.qdq.onnx"))
    onnx.checker.check_model(qdq, full_check=True)
    assert plan._opset(qdq) >= 19
    inits = _initializers(qdq)
    types = {i.name: i.data_type for i in qdq.graph.initializer}
    quantize = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and {types[n.input[2]] for n in quantize} == {onnx.TensorProto.FLOAT8E4M3FN}
    assert all(not inits[n.input[2]].astype(np.float32).any() for n in quantize)
    # weights: scale = per-channel amax / 448, so the largest weight of each channel lands on e4m3's largest value
    weight_q = next(n for n in quantize if n.input[0] in inits and inits[n.input[0]].ndim == 4)
    amax = np.abs(inits[weight_q.input[0]]).reshape(inits[weight_q.input[0]].shape[0], -1).max(1)
    np.testing.assert_allclose(inits[weight_q.input[1]], amax / 448, rtol=1e-5)
    x = RandomImages(8, seed=1).data
    ref, got = _run(path, x), _run(tmp_path / "model.qdq.onnx", x)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.99, cosine


def test_int8_to_fp8_needs_opset_19():
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []), opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(KilnError, match="float8 Q/DQ needs ONNX opset 19 or newer; this graph has opset 17"):
        plan.int8_qdq_to_fp8(model)


def test_build_without_calibration_says_how_to_get_it(tmp_path, tiny_onnx):
    path, spec, _ = tiny_onnx
    settings = builder_settings(target(precision="fp8"))
    with pytest.raises(
        KilnError, match=r"fp8 builds from calibrate's Q/DQ graph, and .*model.qdq.onnx is missing: run `dvc repro calibrate@trt`"
    ):
        trt_runtime.RUNTIME._graph(
            target(precision="fp8"), BuildSource(path, spec, tmp_path), precision_plan("fp8", False, False), settings, tmp_path
        )


@pytest.mark.parametrize("precision, dtype", [("fp16", onnx.TensorProto.FLOAT16), ("bf16", onnx.TensorProto.BFLOAT16)])
def test_fp16_and_bf16_graphs_come_from_modelopt_autocast(tmp_path, tiny_onnx, precision, dtype):
    """The strongly typed fp16/bf16 path: ModelOpt's AutoCast converts the graph (on the CPU), keeping fp32 inputs/outputs."""
    if trt_runtime.autocast_error():
        pytest.skip(f"NVIDIA ModelOpt's AutoCast is not available: {trt_runtime.autocast_error()}")
    path, spec, _ = tiny_onnx
    t = target(precision=precision)
    converted = trt_runtime.RUNTIME._graph(
        t, BuildSource(path, spec), precision_plan(precision, False, True), builder_settings(t), tmp_path
    )
    model = onnx.load(str(converted))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert weights and {w.data_type for w in weights} == {dtype}
    assert plan.onnx_graph_inputs(converted) == GRAPH
    if precision == "fp16":  # ONNX Runtime's CPU provider has no bf16 Conv
        x = RandomImages(8, seed=1).data
        np.testing.assert_allclose(_run(converted, x), _run(path, x), atol=2e-3)


# ---- typing against the published stubs ----


def _repaired_stubs(dest: Path) -> Path:
    """tensorrt-stubs 10.13.0.35.1 as published does not parse: it names parameters `in` (a keyword), puts a
    parameter without default after defaulted ones (INetworkDefinition.add_scale_nd), imports an unstubbed
    `tensorrt_libs`, and lacks a py.typed marker, so mypy ignores it. Copy it and repair exactly those."""
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        unavailable("tensorrt-stubs is not installed (.ci/test-deps installs it: pip install --no-deps tensorrt-stubs==10.13.0.35.1)")
    site = Path(spec.origin).parent.parent
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / package, dest / package, ignore=shutil.ignore_patterns("*.py", "*.so", "__pycache__"))
    (dest / "tensorrt_libs.pyi").write_text("")
    bindings = dest / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"([(,] ?)in: ", r"\1in_: ", bindings.read_text())
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    bindings.write_text(text)
    return dest


def test_mypy_passes_against_tensorrt_stubs(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        unavailable("mypy (a test dependency) is not installed: pip install -e '.[test]'")
    stubs = _repaired_stubs(tmp_path / "stubs")
    config = tmp_path / "mypy.ini"
    config.write_text(
        f"[mypy]\nmypy_path = {stubs}\nfollow_imports = silent\nfollow_imports_for_stubs = True\ndisallow_untyped_defs = True\n"
        "check_untyped_defs = True\nwarn_unused_ignores = True\nwarn_redundant_casts = True\nno_implicit_optional = True\n"
        f"cache_dir = {tmp_path / 'cache'}\n[mypy-onnxruntime.*]\nignore_missing_imports = True\n"
    )
    # a call the stubs type (Builder -> INetworkDefinition): proves mypy reads them instead of treating tensorrt as Any
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\nx: int = trt.Builder(trt.Logger()).create_network(0)\n")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config)]
    seen = subprocess.run([*cmd, str(probe)], capture_output=True, text=True, cwd=ROOT)
    assert 'has type "INetworkDefinition"' in seen.stdout, seen.stdout + seen.stderr
    result = subprocess.run(
        [*cmd, "src/kiln/runtimes/tensorrt/__init__.py", "src/kiln/runtimes/tensorrt/plan.py"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- on a GPU with TensorRT ----


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_loads_and_matches_onnxruntime(tmp_path, tiny_onnx, precision, monkeypatch):
    path, spec, _ = tiny_onnx
    monkeypatch.chdir(tmp_path)  # the default timing cache lands in ./.cache
    t = target(precision=precision, profile={"min": 1, "opt": 4, "max": 8})
    if trt_runtime.RUNTIME.unavailable_reason(t):
        pytest.skip(trt_runtime.RUNTIME.unavailable_reason(t))
    manifest = build_engine(t, BuildSource(path, spec), tmp_path / "e")
    assert (tmp_path / "e" / "model.engine").stat().st_size > 0
    assert manifest["gpu"]["tensorrt"] == trt_runtime.tensorrt_version() and manifest["graph"]["nodes_in"] == 7
    assert manifest["profiles"] == [{"input": {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [8, 3, 16, 16]}}]
    assert manifest["timing_cache"]["reused"] is False and Path(".cache/kiln/tensorrt/timing.cache").is_file()
    again = build_engine(t, BuildSource(path, spec), tmp_path / "e2")
    assert again["timing_cache"]["reused"] is True
    session, _ = load_engine(tmp_path / "e", t)
    x = RandomImages(8, seed=2).data
    got = session.infer({"input": x})
    assert list(got) == ["output"]
    np.testing.assert_allclose(got["output"], _run(path, x), atol=1e-2 if precision == "fp32" else 5e-2, rtol=1e-2)
    assert session.time_ms({"input": x}) > 0
    with pytest.raises(KilnError, match=r"outside the engine's optimization profiles \(profile 0: input min \[1, 3, 16, 16\]"):
        session.infer({"input": RandomImages(16).data})


@pytest.mark.gpu
@needs_gpu
def test_int8_engine_from_qdq_and_mismatch_refused(tmp_path, tiny_onnx, monkeypatch):
    from kiln.core.errors import EngineMismatch

    path, spec, _ = tiny_onnx
    monkeypatch.chdir(tmp_path)
    t = target("tensorrt-int8", precision="int8")
    trt_runtime.RUNTIME.calibrate(t, path, RandomImages(), CalibrationSettings(), tmp_path)
    manifest = build_engine(t, BuildSource(path, spec, tmp_path), tmp_path / "e")
    assert manifest["builder"]["strongly_typed"] and "int8" in manifest["graph"]["layer_precisions"]
    session, _ = load_engine(tmp_path / "e", t)
    x = RandomImages(8, seed=2).data
    ref = _run(tmp_path / "model.qdq.onnx", x)
    assert (session.infer({"input": x})["output"].argmax(1) == ref.argmax(1)).mean() >= 0.75
    manifest_path = tmp_path / "e" / "manifest.json"
    saved = json.loads(manifest_path.read_text())
    saved["gpu"]["name"] = "NVIDIA Other GPU"
    manifest_path.write_text(json.dumps(saved))
    with pytest.raises(EngineMismatch, match=r"GPU NVIDIA Other GPU \(here: .*rebuild it with `dvc repro build@tensorrt-int8`"):
        load_engine(tmp_path / "e", t)
