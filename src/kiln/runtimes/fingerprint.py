"""The hardware and software an engine is built for.

The probe stage writes this on every `dvc repro` and every build depends on it,
so engines re-build exactly when the machine changes. It must stay fast: it reads
system files and package metadata and imports no framework.
"""

from __future__ import annotations

import glob
import platform
from importlib import metadata
from typing import Any

# ISA features that decide which kernels a CPU runtime picks.
CPU_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)

# The libraries of the export itself; each runtime's own are declared with it (kiln.runtimes.RUNTIMES).
EXPORT_LIBRARIES = {"torch": ("torch",), "torchvision": ("torchvision",), "onnx": ("onnx",), "onnxscript": ("onnxscript",)}


def libraries() -> dict[str, tuple[str, ...]]:
    """Library -> the pip distributions it may be installed as, for every library an engine can depend on."""
    from kiln.runtimes import RUNTIMES  # a table only: imports no framework

    out = dict(EXPORT_LIBRARIES)
    for info in RUNTIMES.values():
        out.update(info.libraries)
    return out


def _cpu() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "CPU part") and model in ("", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key == "" and flags and model != platform.machine():
                    break  # the first processor block says all we need
    except OSError:
        pass
    return {
        "arch": platform.machine(),
        "model": model,
        "features": [f for f in CPU_FEATURES if f in flags],
    }


def _gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs from the driver's proc files: no CUDA initialisation, no subprocess."""
    gpus = []
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        fields: dict[str, str] = {}
        try:
            with open(info, encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    fields[key.strip()] = value.strip()
        except OSError:
            continue
        gpus.append({"model": fields.get("Model", "unknown NVIDIA GPU"), "bus": fields.get("Bus Location", "")})
    driver = ""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            driver = f.readline().strip()
    except OSError:
        pass
    for gpu in gpus:
        gpu["driver"] = driver
    return gpus


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for lib, dists in libraries().items():
        versions[lib] = None
        for dist in dists:
            try:
                versions[lib] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def has_vnni(features: list[str]) -> bool:
    """Whether the CPU has int8 dot-product instructions: without them x86 int8 kernels sum u8 x s8 pairs into
    saturating int16 (vpmaddubsw), which the int8 runtimes avoid with 7-bit weights."""
    return any(f in features for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def collect() -> dict[str, Any]:
    """The fingerprint: `hardware` decides whether an engine can run here, `software` which libraries built it."""
    return {
        "hardware": {"cpu": _cpu(), "gpus": _gpus()},
        "software": {
            "python": platform.python_version(),
            "os": platform.system(),
            **library_versions(),
        },
    }


def describe_hardware(hardware: dict[str, Any]) -> str:
    cpu = hardware.get("cpu", {})
    text = f"{cpu.get('model', '?')} [{', '.join(cpu.get('features', [])) or 'no extra ISA features'}]"
    gpus = hardware.get("gpus") or []
    if gpus:
        text += " with " + ", ".join(g.get("model", "?") for g in gpus)
    return text
