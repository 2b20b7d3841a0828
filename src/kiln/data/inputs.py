"""Inputs that are not images: seeded (the same seed gives the same arrays on any machine, numpy's PCG64)
or read from a `.npz` of real samples (data.samples), for calibration, validation and accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from kiln.config.views import InputSpec
from kiln.core.errors import KilnError

_INT_RANGES = {"uint8": (0, 256), "int8": (-128, 128), "int32": (0, 1000), "int64": (0, 1000)}


def make_inputs(specs: Iterable[InputSpec], batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = spec.batched(batch)
        if spec.dtype in _INT_RANGES:
            lo, hi = (int(spec.range[0]), int(spec.range[1]) + 1) if spec.range else _INT_RANGES[spec.dtype]
            feeds[spec.name] = rng.integers(lo, hi, size=shape).astype(spec.dtype)
        else:
            if spec.range:
                arr = rng.uniform(spec.range[0], spec.range[1], size=shape).astype(np.float32)
            else:
                # Standard normal: what a normalised image looks like to the first layer.
                arr = rng.standard_normal(shape, dtype=np.float32)
            feeds[spec.name] = arr if spec.dtype == "float32" else arr.astype(spec.dtype if spec.dtype != "bfloat16" else np.float32)
    return feeds


def load_samples(path: str | Path, specs: Iterable[InputSpec]) -> dict[str, np.ndarray]:
    """data.samples: a .npz with one array per input name, samples along axis 0, each shaped like model.inputs."""
    p = Path(path)
    if not p.is_file():
        raise KilnError(f"data.samples '{p}' does not exist; save one with numpy.savez(path, <input name>=array, ...)")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    out = {}
    for spec in specs:
        if spec.name not in arrays:
            raise KilnError(f"data.samples '{p}' has no array '{spec.name}' (it has {', '.join(sorted(arrays)) or 'none'})")
        arr = arrays[spec.name]
        if tuple(arr.shape[1:]) != tuple(spec.shape):
            raise KilnError(
                f"data.samples '{p}': array '{spec.name}' is {list(arr.shape)}, expected [samples, {', '.join(map(str, spec.shape))}] "
                "(model.inputs shape per sample)"
            )
        out[spec.name] = arr.astype(spec.dtype if spec.dtype != "bfloat16" else np.float32)
    return out


def other_inputs(specs: Iterable[InputSpec], count: int, seed: int, data: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """`count` samples of the inputs that are not images: from data.samples when set (repeated to
    `count` if it holds fewer), else seeded within each input's declared range."""
    specs = list(specs)
    if not specs:
        return {}
    path = (data or {}).get("samples")
    if not path:
        return make_inputs(specs, count, seed)
    samples = load_samples(path, specs)
    return {k: np.resize(v, (count, *v.shape[1:])) if len(v) != count else v for k, v in samples.items()}
