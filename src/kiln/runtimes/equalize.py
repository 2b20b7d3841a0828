"""Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction"): an outlier-aware remedy applied to the fp32 ONNX graph before it is quantized.

Where a convolution's output goes, through a ReLU or directly, to exactly one other convolution, output channel i of
the first can be divided by any s_i > 0 and input channel i of the second multiplied by it without changing the
function (ReLU is positively homogeneous: relu(x / s) = relu(x) / s). Choosing s_i = sqrt(r1_i / r2_i), with r1_i the
largest |weight| of the first layer's channel i (its bias included) and r2_i the largest |weight| that reads it in the
second, gives both the same range per channel: a channel that carries values ~1000x its neighbours (an outlier that
sets the one scale of its activation tensor, so every other channel rounds to zero at int8, and whose reading weights
round to zero too) comes back into line, and int8 keeps every layer.

Runtime-neutral: it rewrites initializers only (node and tensor names stay), so a runtime that quantizes an ONNX file
can run it first (ONNX Runtime: `calibration.options.equalize`, through kiln.runtimes.qdq's `prepare`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PASSES = 4  # chains of more than two convolutions settle over a few passes (each pair moves its neighbours' ranges)


def equalize_file(path: str | Path) -> int:
    """Equalize every Conv -> [Relu] -> Conv pair of the ONNX file at `path` in place; returns how many pairs."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_consumer(tensor: str) -> onnx.NodeProto | None:
        found = consumers.get(tensor) or []
        return found[0] if len(found) == 1 and tensor not in outputs else None

    def plain_conv(node: onnx.NodeProto | None) -> bool:
        group = next((a.i for a in node.attribute if a.name == "group"), 1) if node is not None else 0
        # its weights (and bias) constant and its own: scaling them changes no other layer
        return (
            node is not None and node.op_type == "Conv" and group == 1 and all(n in inits and uses.get(n) == 1 for n in node.input[1:] if n)
        )

    pairs = []
    for first in graph.node:
        if not plain_conv(first):
            continue
        nxt = only_consumer(first.output[0])
        if nxt is not None and nxt.op_type == "Relu":
            nxt = only_consumer(nxt.output[0])
        if plain_conv(nxt) and nxt is not None:
            pairs.append((first, nxt))
    if not pairs:
        return 0
    arrays = {name: numpy_helper.to_array(inits[name]).astype(np.float64) for a, b in pairs for name in (*a.input[1:], b.input[1]) if name}
    for _ in range(PASSES):
        for a, b in pairs:
            w1, w2 = arrays[a.input[1]], arrays[b.input[1]]
            bias = arrays.get(a.input[2]) if len(a.input) > 2 and a.input[2] else None
            if w2.shape[1] != w1.shape[0]:
                continue
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            if bias is not None:
                r1 = np.maximum(r1, np.abs(bias))
            r2 = np.abs(w2).transpose(1, 0, *range(2, w2.ndim)).reshape(w2.shape[1], -1).max(axis=1)
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            w1 /= s.reshape(-1, *([1] * (w1.ndim - 1)))
            if bias is not None:
                bias /= s
            w2 *= s.reshape(1, -1, *([1] * (w2.ndim - 2)))
    for name, value in arrays.items():
        dtype = numpy_helper.to_array(inits[name]).dtype
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
    onnx.save(model, str(path))
    return len(pairs)
