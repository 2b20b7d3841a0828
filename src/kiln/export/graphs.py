"""Facts about an ONNX graph that choose how it is quantized and what the report says the compiler did."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Mapping


def op_counts(onnx_path: str | Path) -> Counter[str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


def has_attention(onnx_path: str | Path) -> bool:
    """Softmax between MatMuls: scaled dot-product attention as exporters write it (or a fused Attention op)."""
    ops = op_counts(onnx_path)
    return ops.get("Attention", 0) + ops.get("MultiHeadAttention", 0) > 0 or (ops.get("Softmax", 0) > 0 and ops.get("MatMul", 0) >= 2)


# Fused attention as each runtime names it: ONNX Runtime's contrib ops, OpenVINO's CPU plugin nodes.
FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "ScaledDotProductAttention", "MHA", "ScaledAttn", "SDPA")


def attention_summary(given_ops: list[str], run_ops: list[str], fusions: Mapping[str, int] | None = None) -> str | None:
    """Whether a runtime fused the graph's attention; None for a graph without attention (Softmax between MatMuls)."""
    if not (given_ops.count("Softmax") and given_ops.count("MatMul") >= 2):
        return None
    fused = sum(1 for op in run_ops if op in FUSED_ATTENTION)
    if fused:
        return f"fused into one kernel x{fused}"
    partial = {k: v for k, v in (fusions or {}).items() if "MatMul" in k and "Softmax" in k}
    if partial:
        return "partly fused (no single attention kernel): " + ", ".join(f"{k} x{v}" for k, v in partial.items())
    return "not fused: MatMul, Softmax and MatMul run as separate kernels"


# The ops that carry a network's arithmetic (convolutions, matrix products, attention): what int8 speeds up,
# what the debugger attributes a loss to and the repair keeps in float. Everything else is memory traffic.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "Attention", "MultiHeadAttention"})


def tail_nodes(onnx_path: str | Path) -> list[str]:
    """Nodes after the last convolution or matrix product on every path to an output: a detector's box
    decoding and NMS, a segmenter's final upsampling. Quantizing them saves no compute and moves boxes and
    IoUs (an int8 IoU flips which boxes NMS keeps), so kiln's int8 targets keep them in float."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    heavy_below = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):  # ONNX graphs are topologically sorted
        heavy_below[i] = any(
            graph.node[j].op_type in COMPUTE_OPS or heavy_below[j] for out in graph.node[i].output for j in consumers.get(out, [])
        )
    return [n.name for i, n in enumerate(graph.node) if n.name and n.op_type not in COMPUTE_OPS and not heavy_below[i]]


# Model-level ONNX metadata key: a JSON list of the nodes every int8 target keeps in float, written at export for
# the parts a model's own exporter keeps in float (YOLO's DFL box decoding: kiln.export.detection_yolo).
FLOAT_NODES_KEY = "kiln.float_nodes"


def mark_float_modules(onnx_path: str | Path, prefixes: list[str]) -> list[str]:
    """Write FLOAT_NODES_KEY into the graph at `onnx_path`: the nodes exported from the modules named by `prefixes`
    (qualified module names in the exported module), found by the dynamo exporter's name scopes or the TorchScript
    exporter's node names. Returns those node names."""
    import ast
    import json

    import onnx

    model = onnx.load(str(onnx_path))
    scripted = ["/" + p.replace(".", "/") + "/" for p in prefixes]
    found = []
    for node in model.graph.node:
        scopes = next((m.value for m in node.metadata_props if m.key == "pkg.torch.onnx.name_scopes"), "")
        listed = ast.literal_eval(scopes) if scopes.startswith("[") else []  # a Python list's repr
        if any(p in listed for p in prefixes) or any(node.name.startswith(s) for s in scripted):
            found.append(node.name)
    if found:
        onnx.helper.set_model_props(model, {FLOAT_NODES_KEY: json.dumps(found)})
        onnx.save(model, str(onnx_path))
    return found


def declared_float_nodes(onnx_path: str | Path) -> list[str]:
    """The nodes FLOAT_NODES_KEY names in the graph at `onnx_path` ([] when none)."""
    import json

    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    raw = next((m.value for m in model.metadata_props if m.key == FLOAT_NODES_KEY), None)
    return list(json.loads(raw)) if raw else []
