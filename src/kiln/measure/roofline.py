"""Multiply-accumulates an ONNX graph asks for: the compute side of the report's roofline.

Counted from the graph, not from a framework, so every engine built from one export shares the number.
Only the ops that dominate a network's arithmetic are counted (convolutions, matrix products, attention):
elementwise ops, normalizations and pooling are memory traffic, not MACs. Nodes inside If/Loop bodies
are not counted; model-local functions (the dynamo exporter's) are inlined first.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kiln.core.errors import KilnError

Shape = tuple[int, ...]
MS = "com.microsoft"

# (domain, op) -> the input and output indices whose shapes the count needs (absent optional ones are skipped)
NEEDS: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {
    ("", "Conv"): ((1,), (0,)),
    ("", "ConvInteger"): ((1,), (0,)),
    ("", "QLinearConv"): ((3,), (0,)),
    ("", "ConvTranspose"): ((0, 1), ()),
    ("", "Gemm"): ((0, 1), ()),
    ("", "MatMul"): ((0, 1), ()),
    ("", "MatMulInteger"): ((0, 1), ()),
    ("", "QLinearMatMul"): ((0, 3), ()),
    ("", "Einsum"): ((), ()),  # all its inputs
    ("", "Attention"): ((0, 1, 2, 4), ()),  # opset 23
    (MS, "FusedMatMul"): ((0, 1), ()),
    (MS, "MatMulIntegerToFloat"): ((0, 1), ()),
    (MS, "DynamicQuantizeMatMul"): ((0, 1), ()),
    (MS, "MatMulNBits"): ((0,), ()),
    (MS, "Attention"): ((0, 1, 4), ()),
    (MS, "MultiHeadAttention"): ((0, 1, 2), (1,)),
}


@dataclass(frozen=True)
class MacCount:
    per_image: int  # MACs for one image (sample)
    by_op: dict[str, int]  # per op type, per image
    nodes: int  # compute nodes seen
    uncounted: tuple[str, ...]  # compute nodes whose shapes stayed unknown (or form is not read): per_image is then a lower bound
    batch: int  # the batch the graph was sized at (the images the total was divided by)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "uncounted": list(self.uncounted)}


def _key(node: Any) -> tuple[str, str]:
    return ("" if node.domain in ("", "ai.onnx") else node.domain, node.op_type)


def _needed(node: Any) -> tuple[list[str], list[str]]:
    ins, outs = NEEDS[_key(node)]
    if node.op_type == "Einsum":
        ins = tuple(range(len(node.input)))
    present = lambda names, idx: [names[i] for i in idx if i < len(names) and names[i]]  # noqa: E731
    return present(node.input, ins), present(node.output, outs)


def _matmul(a: Shape, b: Shape, trans_a: bool = False, trans_b: bool = False) -> int:
    a, b = ((1, *a) if len(a) == 1 else a), ((*b, 1) if len(b) == 1 else b)  # numpy's 1-D promotion
    m, k = (a[-1], a[-2]) if trans_a else (a[-2], a[-1])
    n = b[-2] if trans_b else b[-1]
    return math.prod(np.broadcast_shapes(a[:-2], b[:-2])) * m * n * k


def _einsum(equation: str, shapes: list[Shape]) -> int:
    """Contracted left to right, as ONNX Runtime does: each step multiplies over the union of its two operands' letters."""
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    terms, sizes, ellipses = lhs.split(","), {}, []
    letters = []
    for term, shape in zip(terms, shapes):
        pre, dots, post = term.partition("...")
        rank = len(shape) - len(pre) - len(post)
        if dots:
            ellipses.append(shape[len(pre) : len(pre) + rank])
        for c, d in zip(pre + post, shape[: len(pre)] + shape[len(shape) - len(post) :]):
            sizes[c] = max(sizes.get(c, 1), d)  # a 1 broadcasts
        letters.append(set(pre + post) | ({"."} if dots else set()))
    sizes["."] = math.prod(np.broadcast_shapes(*ellipses)) if ellipses else 1
    kept = set(rhs) | {"."} if "->" in equation else {c for c in lhs if lhs.count(c) == 1} | {"."}
    macs, current = 0, letters[0]
    for i, term in enumerate(letters[1:], 1):
        union = current | term
        macs += math.prod(sizes[c] for c in union)
        current = {c for c in union if c in kept or any(c in t for t in letters[i + 1 :])}
    return macs


def _attention(node: Any, ins: dict[int, Shape], outs: dict[int, Shape], attrs: dict[str, Any]) -> int:
    """QK^T plus AV: batch x Sq x Skv x (query width + value width) over all heads, plus the projections an op includes."""
    q = ins[0]
    if node.domain == MS and node.op_type == "Attention":  # input [B,S,Hin] x weights [Hin, q+k+v]: projections included
        b, sq, hidden_in = q
        cols = ins[1][1]
        widths = attrs.get("qkv_hidden_sizes") or [cols // 3] * 3
        skv = sq + (ins[4][3] if 4 in ins else 0)  # past: [2,B,N,P,H]
        return b * sq * hidden_in * cols + b * sq * skv * (widths[0] + widths[2])
    if node.op_type == "MultiHeadAttention":
        if len(q) == 5:  # packed QKV [B,S,N,3,H]
            b, sq, n, _, h = q
            return b * sq * sq * 2 * n * h
        (b, sq, dq), k = q, ins[1]
        skv = k[1] if len(k) in (3, 5) else k[2]  # [B,L,D], packed KV [B,L,N,2,H], or [B,N,L,H]
        dv = k[2] * k[4] if len(k) == 5 else (ins[2][2] if len(ins[2]) == 3 else ins[2][1] * ins[2][3])
        skv = outs[1][2] if 1 in outs else skv  # present_key [B,N,past+L,H]
        return b * sq * skv * (dq + dv)
    k, v = ins[1], ins[2]  # ONNX Attention: 4-D [B,heads,S,H] or 3-D [B,S,heads*H]
    if len(q) == 4:
        b, heads, sq, h = q
        dq = heads * h
    else:
        (b, sq, dq), heads = q, attrs["q_num_heads"]
    skv, dv = (k[2], v[3]) if len(v) == 4 else (k[1], v[2] // attrs["kv_num_heads"])
    skv += ins[4][2] if 4 in ins else 0
    return b * sq * skv * (dq + heads * dv)  # grouped KV heads are read once per query head


def _macs(node: Any, ins: dict[int, Shape], outs: dict[int, Shape]) -> int:
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv"):  # every output element: (Cin/group) x kernel
        return math.prod(outs[0]) * math.prod(ins[3 if op == "QLinearConv" else 1][1:])
    if op == "ConvTranspose":  # every input element scatters into (Cout/group) x kernel outputs
        return math.prod(ins[0]) * math.prod(ins[1][1:])
    if op in ("Gemm", "FusedMatMul"):
        return _matmul(ins[0], ins[1], bool(attrs.get("transA")), bool(attrs.get("transB")))
    if op == "QLinearMatMul":
        return _matmul(ins[0], ins[3])
    if op == "MatMulNBits":
        return math.prod(ins[0][:-1]) * attrs["K"] * attrs["N"]
    if op == "Einsum":
        return _einsum(attrs["equation"].decode() if isinstance(attrs["equation"], bytes) else attrs["equation"], list(ins.values()))
    if "Attention" in op:
        return _attention(node, ins, outs, attrs)
    return _matmul(ins[0], ins[1])


def _concretize(graph: Any, batch: int, dims: Mapping[str, int]) -> int:
    """Sets every symbolic input dim; returns the images one run holds (batch, or a static export's first dim)."""
    initializers = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in initializers and vi.type.HasField("tensor_type")]
    batch_names = {vi.type.tensor_type.shape.dim[0].dim_param for vi in inputs if vi.type.tensor_type.shape.dim} - {""} | {"batch"}
    missing, symbolic_batch = [], False
    for vi in inputs:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                continue
            if axis == 0 or d.dim_param in batch_names:
                d.dim_value, symbolic_batch = batch, True
            elif d.dim_param in dims:
                d.dim_value = dims[d.dim_param]
            else:
                missing.append(f"{vi.name}[{axis}]" + (f" ('{d.dim_param}')" if d.dim_param else ""))
    if missing:
        raise KilnError(
            f"cannot count MACs: symbolic input dims other than the batch need sizes: {', '.join(missing)} (pass dims={{name: size}})"
        )
    if symbolic_batch or not inputs or not inputs[0].type.tensor_type.shape.dim:
        return batch
    return inputs[0].type.tensor_type.shape.dim[0].dim_value or 1


def _load(onnx_path: Path, batch: int, dims: Mapping[str, int], weights: bool) -> tuple[Any, int]:
    import onnx
    import onnx.external_data_helper
    import onnx.inliner

    model = onnx.load(str(onnx_path), load_external_data=weights)
    for t in [] if weights else model.graph.initializer:  # no weights, but data propagation reads small constants (Reshape targets)
        if t.data_location == onnx.TensorProto.EXTERNAL and math.prod(t.dims) <= 64:
            onnx.external_data_helper.load_external_data_for_tensor(t, str(onnx_path.parent))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    images = _concretize(model.graph, batch, dims)
    del model.graph.value_info[:]  # the exporter's symbolic shapes would survive inference
    for vi in model.graph.output:
        vi.type.tensor_type.ClearField("shape")
    return model, images


def _shapes(model: Any) -> dict[str, Shape]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes.setdefault(vi.name, tuple(d.dim_value for d in t.shape.dim))
    return shapes


def _run_for_shapes(onnx_path: Path, batch: int, dims: Mapping[str, int], names: list[str]) -> dict[str, Shape]:
    """The shapes inference left open, read off one ONNX Runtime run on zeros (token ids 0, images black)."""
    import onnx
    import onnxruntime as ort

    model, _ = _load(onnx_path, batch, dims, weights=True)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {
        vi.name: np.zeros(
            [d.dim_value for d in vi.type.tensor_type.shape.dim], onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        )
        for vi in model.graph.input
        if vi.name not in initializers
    }
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # fused nodes would drop the tensors asked for
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:  # a file, not bytes: weights past protobuf's 2 GB go to external data
        onnx.save_model(model, f"{tmp}/model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=1024)
        session = ort.InferenceSession(f"{tmp}/model.onnx", options, providers=["CPUExecutionProvider"])
        values = session.run(names, feeds)
    return {n: tuple(np.shape(v)) for n, v in zip(names, values)}


def count_macs(onnx_path: str | Path, batch: int = 1, dims: Mapping[str, int] | None = None) -> MacCount:
    """MACs of one image through the graph at `batch`. Symbolic input dims other than the batch (a sequence length)
    must be given in `dims` (name -> size); kiln does not guess them, a KilnError names them instead."""
    import onnx

    dims = dict(dims or {})
    model, images = _load(Path(onnx_path), batch, dims, weights=False)  # inference needs shapes, not weights
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes = _shapes(model)
    nodes = [n for n in model.graph.node if _key(n) in NEEDS]
    unknown = sorted({name for n in nodes for name in sum(_needed(n), []) if name not in shapes})
    if unknown:
        try:
            shapes.update(_run_for_shapes(Path(onnx_path), batch, dims, unknown))
        except Exception:  # a graph ONNX Runtime cannot run (a custom op): its open nodes stay uncounted
            pass
    by_op: dict[str, int] = {}
    uncounted = []
    for index, node in enumerate(nodes):
        ins = {i: shapes[name] for i, name in enumerate(node.input) if name in shapes}
        outs = {i: shapes[name] for i, name in enumerate(node.output) if name in shapes}
        label = node.op_type if _key(node)[0] == "" else f"{node.domain}.{node.op_type}"
        try:
            if any(name not in shapes for name in sum(_needed(node), [])):
                raise KeyError(node.name)
            by_op[label] = by_op.get(label, 0) + _macs(node, ins, outs)
        except (KeyError, IndexError, ValueError):  # shapes unknown, or a form of the op this module does not read
            uncounted.append(node.name or f"{node.op_type}#{index}")
    return MacCount(
        per_image=sum(by_op.values()) // images,
        by_op={k: v // images for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        nodes=len(nodes),
        uncounted=tuple(uncounted),
        batch=images,
    )


def roofline_inputs(onnx_path: str | Path, machine_facts: Mapping[str, Any]) -> dict[str, Any]:
    """What a benchmark records for the report's roofline: the graph's MACs per image, and the measured peaks of
    the machine it runs on (the peak stage's `artifacts/peak.json`), so that results from several machines each
    carry their own roof."""
    count = count_macs(onnx_path)
    return {
        "macs_per_image": count.per_image,
        "by_op": count.by_op,
        "uncounted": list(count.uncounted),
        "machine": {k: machine_facts.get(k) for k in ("peaks", "clock", "cores", "preflight")},
    }
