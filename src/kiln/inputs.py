"""Seeded inputs: the same seed gives the same arrays on any machine (numpy's PCG64)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .config import InputSpec

_INT_RANGES = {"uint8": (0, 256), "int8": (-128, 128), "int32": (0, 1000), "int64": (0, 1000)}


def make_inputs(specs: Iterable[InputSpec], batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = spec.batched(batch)
        if spec.dtype in _INT_RANGES:
            lo, hi = _INT_RANGES[spec.dtype]
            feeds[spec.name] = rng.integers(lo, hi, size=shape).astype(spec.dtype)
        else:
            # Standard normal: what a normalised image looks like to the first layer.
            arr = rng.standard_normal(shape, dtype=np.float32)
            feeds[spec.name] = arr if spec.dtype == "float32" else arr.astype(spec.dtype if spec.dtype != "bfloat16" else np.float32)
    return feeds
