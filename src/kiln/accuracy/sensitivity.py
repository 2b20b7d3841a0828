"""Which layers' quantization costs the most: a ranking from per-layer activations.

A runtime with int8 exposes `layer_activations(onnx_path, calibration_dir, feeds)`: for each
quantized compute layer, in graph order, its output in the fp32 model and in the quantized
model. Error accumulates through a network, so a layer is ranked by the relative noise
(noise power / signal power) it *adds* over the layer before it, not by its own SQNR (which
mostly says how deep it sits). Along a chain these additions sum to the output's noise; across
branches (residual adds) it is a first-order guide for choosing `ignored_scope`, not an exact
attribution.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from kiln.accuracy.numerics import bounded_sqnr_db, sqnr_db


def rank_layers(activations: Iterable[tuple[str, np.ndarray, np.ndarray]], top: int = 10) -> list[dict[str, float | str]]:
    rows: list[dict[str, float | str]] = []
    previous = 0.0
    for layer, ref, got in activations:
        s = bounded_sqnr_db(sqnr_db(ref, got))
        relative_noise = 10.0 ** (-s / 10.0)
        rows.append({"layer": layer, "sqnr_db": round(s, 2), "noise_added_pct": round(100.0 * max(0.0, relative_noise - previous), 4)})
        previous = relative_noise
    return sorted(rows, key=lambda r: -float(r["noise_added_pct"]))[:top]
