"""The machine's peak multiply-accumulate rate per precision: the roof of the report's roofline.

Measured, not looked up: large matrix products run through the runtimes kiln builds engines for, so
the roof is what those runtimes' kernels reach on this CPU (its clock, its cores, its other tenants).
Next to it stands the bound the ISA allows, from the CPU's feature flags and its measured clock.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterable

import numpy as np

PRECISIONS = ("fp32", "bf16", "int8")
# [M, K, N]: activations [M,K] times a constant [K,N]. Large enough that a call takes milliseconds even in int8.
SHAPES = ((256, 1024, 1024), (1024, 1024, 1024), (1024, 2048, 2048))
# [B, C, HW]: a 3x3 convolution, C -> C channels on HW x HW, batch B: the implicit GEMM that CNN engines run,
# where the runtimes' best int8 kernels live (measured here: OpenVINO's int8 MatMul reached about a third of
# what its int8 convolutions reach inside ResNet-18, so GEMMs alone under-state the roof).
CONVS = ((8, 256, 28), (8, 512, 14))
# The precision a runtime's words for what it executed stand for.
EXECUTED = {"f32": "fp32", "fp32": "fp32", "bf16": "bf16", "u8": "int8", "i8": "int8", "int8": "int8"}
ORT_INT8_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "QGemm", "QLinearConv", "ConvInteger"}


def _model(kind: str, dims: tuple[int, ...], int8: bool) -> tuple[Any, list[int], int]:
    """(ONNX model, input shape, MACs per call) of a GEMM ([M,K,N]) or a 3x3 convolution ([B,C,HW])."""
    if kind == "gemm":
        m, k, n = dims
        return _gemm(m, k, n, int8), [m, k], m * k * n
    b, c, hw = dims
    return _gemm(0, 0, 0, int8, conv=(b, c, hw)), [b, c, hw, hw], b * c * hw * hw * c * 9


def _gemm(m: int, k: int, n: int, int8: bool, conv: tuple[int, int, int] | None = None) -> Any:
    """x[M,K] @ w[K,N] (or a 3x3 same-padded convolution of x[B,C,HW,HW] with w[C,C,3,3]); int8: both operands
    through QuantizeLinear/DequantizeLinear, as a quantizer leaves them."""
    from onnx import TensorProto, numpy_helper
    from onnx import helper as oh

    rng = np.random.default_rng(0)
    w_shape: tuple[int, ...] = (k, n)
    x_shape, y_shape = [m, k], [m, n]
    op, attrs = "MatMul", {}
    if conv:
        b, c, hw = conv
        w_shape, x_shape, y_shape = (c, c, 3, 3), [b, c, hw, hw], [b, c, hw, hw]
        op, attrs = "Conv", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    if int8:
        initializers = [
            numpy_helper.from_array(rng.integers(-127, 128, w_shape, dtype=np.int8), "w_q"),
            numpy_helper.from_array(np.float32(0.01), "w_scale"),
            numpy_helper.from_array(np.int8(0), "w_zero"),
            numpy_helper.from_array(np.float32(0.03), "x_scale"),
            numpy_helper.from_array(np.float32(2.0), "y_scale"),
            numpy_helper.from_array(np.uint8(128), "y_zero"),
            numpy_helper.from_array(np.uint8(128), "x_zero"),
        ]
        nodes = [
            oh.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
            oh.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
            oh.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"]),
            oh.make_node(op, ["x_dq", "w"], ["y_f"], **attrs),
            # The output quantized for the next layer, as in a quantized network: runtimes then fuse the whole
            # chain into one int8 kernel with an 8-bit output (without it ONNX Runtime leaves a convolution in float).
            oh.make_node("QuantizeLinear", ["y_f", "y_scale", "y_zero"], ["y_q"]),
            oh.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["y"]),
        ]
    else:
        initializers = [numpy_helper.from_array(rng.standard_normal(w_shape, dtype=np.float32) * 0.05, "w")]
        nodes = [oh.make_node(op, ["x", "w"], ["y"], **attrs)]
    io = [oh.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in (("x", x_shape), ("y", y_shape))]
    return oh.make_model(oh.make_graph(nodes, "gemm", io[:1], io[1:], initializers), opset_imports=[oh.make_opsetid("", 17)])


def _median_seconds(call: Callable[[], Any], seconds: float) -> tuple[float, int]:
    for _ in range(2):  # first calls pack weights, fault pages in, spin up threads
        call()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), len(times)


def _openvino(precision: str, kind: str, dims: tuple[int, ...], threads: int) -> tuple[Callable[[], Any], str]:
    import openvino as ov

    from kiln.runtimes.openvino import executed_precision

    core = ov.Core()
    graph, shape, _ = _model(kind, dims, precision == "int8")
    model = core.read_model(graph.SerializeToString(), b"")
    hint = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]  # int8 comes from the graph's QDQ, as in kiln's engines
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(model, "CPU", config)
    request, x = compiled.create_infer_request(), np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    return lambda: request.infer([x]), executed_precision(compiled)


def _onnxruntime(precision: str, kind: str, dims: tuple[int, ...], threads: int) -> tuple[Callable[[], Any], str]:
    import onnx
    import onnxruntime as ort

    def options(**extra: Any) -> Any:
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.log_severity_level = threads, 3
        for key, value in extra.items():
            setattr(o, key, value)
        return o

    int8 = precision == "int8"
    executed = "fp32 (MatMul)"
    if int8:  # which kernel the QDQ pattern became, read off the optimized graph of a tiny twin (fusion ignores shapes)
        with tempfile.TemporaryDirectory() as tmp:
            twin = _model(kind, (4, 16, 16) if kind == "gemm" else (1, 8, 4), True)[0]
            ort.InferenceSession(twin.SerializeToString(), options(optimized_model_filepath=f"{tmp}/o.onnx"))
            ops = [node.op_type for node in onnx.load(f"{tmp}/o.onnx").graph.node]
        fused = [op for op in ops if op in ORT_INT8_OPS]
        executed = f"int8 ({fused[0]})" if fused else "fp32 (QDQ left unfused: " + ", ".join(ops) + ")"
    graph, shape, _ = _model(kind, dims, int8)
    session = ort.InferenceSession(graph.SerializeToString(), options(), providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal(shape, dtype=np.float32)}
    return lambda: session.run(None, feed), executed


def _executed_as(executed: str) -> str | None:
    """'u8' -> int8, 'int8 (MatMulIntegerToFloat)' -> int8; a mix of precisions ('bf16 (1/2), f32 (1/2)') -> None."""
    return None if "," in executed else EXECUTED.get(executed.split(" ")[0].lower())


def measure_peaks(
    threads: int | None = None,
    seconds_per_case: float = 0.5,
    precisions: Iterable[str] = PRECISIONS,
    shapes: Iterable[tuple[int, int, int]] = SHAPES,
    convs: Iterable[tuple[int, int, int]] = CONVS,
) -> dict[str, Any]:
    """Times GEMMs ([M,K,N] `shapes`) and 3x3 convolutions ([B,C,HW] `convs`) per runtime and precision, `threads`
    (default: the CPUs this process may use) each; a precision's peak is its fastest case that really ran in it
    (ONNX Runtime: its kernel; OpenVINO: runtime model)."""
    import openvino as ov

    started = time.perf_counter()
    precisions = tuple(precisions)
    work = [("gemm", tuple(d)) for d in shapes] + [("conv", tuple(d)) for d in convs]
    threads = threads or len(os.sched_getaffinity(0))
    bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    plan = [("openvino", p) for p in precisions if p != "bf16" or bf16]
    plan += [("onnxruntime", p) for p in precisions if p in ("fp32", "int8")]  # ONNX Runtime's CPU MatMul has no bf16 kernel on x86
    builders = {"openvino": _openvino, "onnxruntime": _onnxruntime}
    cases: list[dict[str, Any]] = []
    for runtime, precision in plan:
        for kind, dims in work:
            case: dict[str, Any] = {"runtime": runtime, "precision": precision, "op": kind, "shape": list(dims)}
            try:
                call, executed = builders[runtime](precision, kind, dims, threads)
                seconds, calls = _median_seconds(call, seconds_per_case)
            except Exception as e:  # a runtime that cannot build or run this case: recorded, not fatal
                cases.append({**case, "error": f"{type(e).__name__}: {e}"})
                continue
            counted = _executed_as(executed) == precision
            cases.append({**case, "executed": executed, "counted": counted, "median_ms": seconds * 1e3, "calls": calls})
            cases[-1]["macs_per_s"] = _model(kind, dims, False)[2] / seconds
    best: dict[str, Any] = {}
    for case in cases:
        if case.get("counted") and case["macs_per_s"] > best.get(case["precision"], {}).get("macs_per_s", 0):
            best[case["precision"]] = {key: case[key] for key in ("macs_per_s", "runtime", "op", "shape", "executed")}
    notes = [] if bf16 or "bf16" not in precisions else ["bf16: OpenVINO's CPU plugin lists no BF16 capability here: not measured"]
    return {"precisions": best, "cases": cases, "threads": threads, "seconds": time.perf_counter() - started, "notes": notes}


CLOCK_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define R10(s) s s s s s s s s s s
#define R100(s) R10(R10(s))
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    unsigned long x = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        /* each add waits for the last: one per cycle on any core; the loop's own counter runs alongside */
#if defined(__x86_64__) || defined(__i386__)
        __asm__ volatile(R100("add $1, %0\n\t") : "+r"(x));
#else
        __asm__ volatile(R100("add %0, %0, #1\n\t") : "+r"(x));
#endif
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.9f %lu\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9, x);
    return 0;
}
"""


def _cpuinfo_hz() -> dict[str, Any]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            mhz = [float(line.partition(":")[2]) for line in f if line.lower().startswith("cpu mhz")]
    except (OSError, ValueError):
        mhz = []
    if mhz:
        return {"hz": max(mhz) * 1e6, "source": "/proc/cpuinfo 'cpu MHz' (the nominal or last-sampled clock, not measured)"}
    return {"hz": None, "source": "unknown: no compiler to measure it and no 'cpu MHz' in /proc/cpuinfo"}


def measure_clock_hz() -> dict[str, Any]:
    """The core clock under load: a chain of dependent integer adds (one per cycle) timed, best of three runs."""
    machine = platform.machine().lower()
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if compiler is None or not (machine in ("x86_64", "amd64", "i686", "i386") or machine in ("aarch64", "arm64")):
        return _cpuinfo_hz()
    adds = 100 * 2_000_000
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with open(f"{tmp}/clock.c", "w", encoding="utf-8") as f:
                f.write(CLOCK_C)
            subprocess.run([compiler, "-O2", "-o", f"{tmp}/clock", f"{tmp}/clock.c"], check=True, capture_output=True, timeout=60)
            runs = [
                subprocess.run([f"{tmp}/clock", str(adds // 100)], check=True, capture_output=True, text=True, timeout=60) for _ in range(3)
            ]
        hz = adds / min(float(r.stdout.split()[0]) for r in runs)  # other tenants only ever slow a run down
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return _cpuinfo_hz()
    if not 0.5e9 <= hz <= 7e9:
        return {**_cpuinfo_hz(), "rejected": f"measured {hz / 1e9:.2f} GHz is implausible"}
    return {"hz": hz, "source": f"measured: dependent-add loop compiled with {os.path.basename(compiler)}"}


# MACs per cycle per core an instruction sequence can reach, per precision, best first.
ASSUMES = "2 vector FMA (or dot-product) units per core, each issuing one full-width instruction per cycle"
ISA: dict[str, list[tuple[tuple[str, ...], int, str]]] = {
    "fp32": [
        (("avx512f",), 2 * 16, "AVX-512 vfmadd (16 fp32 lanes)"),
        (("avx2", "fma"), 2 * 8, "AVX2 vfmadd (8 fp32 lanes)"),
        (("asimd",), 2 * 4, "NEON fmla (4 fp32 lanes)"),
    ],
    "bf16": [
        (("amx_bf16",), 1024, "AMX tdpbf16ps (1024 bf16 MACs per cycle per core, one tile unit)"),
        (("avx512_bf16",), 2 * 32, "AVX-512 vdpbf16ps (32 bf16 MACs per instruction)"),
        (("bf16",), 2 * 16, "NEON bfmmla (16 bf16 MACs per instruction)"),
    ],
    "int8": [
        (("amx_int8",), 2048, "AMX tdpbusd (2048 int8 MACs per cycle per core, one tile unit)"),
        (("avx512_vnni",), 2 * 64, "AVX-512 VNNI vpdpbusd (64 int8 MACs per instruction)"),
        (("avx_vnni",), 2 * 32, "AVX-VNNI vpdpbusd (32 int8 MACs per 256-bit instruction)"),
        (("avx512bw",), 2 * 64 // 2, "AVX-512BW vpmaddubsw+vpmaddwd (two instructions per 64 MACs: half of VNNI's rate)"),
        (("avx2",), 2 * 32 // 2, "AVX2 vpmaddubsw+vpmaddwd (two instructions per 32 MACs: half of VNNI's rate)"),
        (("i8mm",), 2 * 32, "NEON smmla (32 int8 MACs per instruction)"),
    ],
}


def isa_peak(features: list[str], cores: int, clock_hz: float | None) -> dict[str, dict[str, Any]]:
    """The ISA's upper bound per precision: MACs per cycle per core x cores x clock (macs_per_s None without a clock).
    `features` as /proc/cpuinfo spells them (kiln.runtimes.fingerprint.collect()["hardware"]["cpu"]["features"])."""
    have, out = set(features), {}
    for precision, rows in ISA.items():
        row = next((r for r in rows if have.issuperset(r[0])), None)
        if row is None:
            out[precision] = {"macs_per_s": None, "macs_per_cycle_per_core": None, "instruction": None, "assumes": "no native instructions"}
            continue
        per_cycle = row[1]
        assumes = "AMX: one tile unit per core" if row[0][0].startswith("amx") else ASSUMES
        out[precision] = {
            "macs_per_s": per_cycle * cores * clock_hz if clock_hz else None,
            "macs_per_cycle_per_core": per_cycle,
            "instruction": row[2],
            "assumes": assumes,
        }
    return out


def preflight_notes(features: list[str]) -> list[str]:
    """Precisions this CPU cannot speed up, said before anyone builds an engine to find out."""
    have, notes = set(features), []
    if not have & {"avx512_vnni", "avx_vnni", "amx_int8", "i8mm"}:
        fallback = "AVX-512BW" if "avx512bw" in have else "AVX2" if "avx2" in have else "the scalar or SSE path"
        notes.append(
            f"int8: this CPU has no VNNI (avx512_vnni, avx_vnni or amx_int8): int8 kernels fall back to {fallback} "
            "multiply-add pairs at about half VNNI's rate; expect little or no speed-up over fp32, and a slow-down where "
            "quantize/dequantize steps are not fused away"
        )
    if not have & {"avx512_bf16", "amx_bf16", "bf16"}:
        notes.append(
            "bf16: this CPU has no bf16 instructions (avx512_bf16 or amx_bf16): bf16 is emulated by converting to fp32 "
            "and runs slower than fp32 itself"
        )
    return notes


def machine_peaks(measured: dict[str, Any], isa: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per precision: the measured peak (`macs_per_s`, from measure_peaks), the ISA's bound (`isa_macs_per_s`, from
    isa_peak) and measured / bound; None where either is missing."""
    out = {}
    for precision in dict.fromkeys([*measured.get("precisions", {}), *isa]):
        best, bound = measured.get("precisions", {}).get(precision, {}), isa.get(precision, {}).get("macs_per_s")
        rate = best.get("macs_per_s")
        out[precision] = {
            "macs_per_s": rate,
            "runtime": best.get("runtime"),
            "executed": best.get("executed"),
            "isa_macs_per_s": bound,
            "ratio": rate / bound if rate and bound else None,
        }
    return out
