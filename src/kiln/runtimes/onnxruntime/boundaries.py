"""An ONNX Runtime engine's intermediate tensors where its fusions leave them (kiln.diagnose.debug's boundaries).

The engine is the optimised graph saved at build; it is run as it is (optimizations off, as the engine
loads) with extra graph outputs, so the kernels are the engine's own. After ORT fuses Q/DQ pairs into
QLinearConv and friends, the tensors between layers are u8: they are read and dequantized here with the
scale and zero point of the op that produced them (what the next kernel consumes), NHWC ones transposed
back; the fp32 engine's blocked NCHWc tensors are read through an added ReorderOutput node. The `_nchwc`
node-name suffix and the quantizer's `_scale` / `_QuantizeLinear_*` names are conventions of ORT's
optimizer and quantizer, not an API: a tensor not found by them is skipped and named in the note.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.runtimes.onnxruntime import OPTIMIZED

# ONNX Runtime ops whose output is quantized: (index of output scale, index of output zero point) among inputs.
_ORT_QPARAMS = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QLinearAveragePool": (3, 4),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSigmoid": (3, 4),
    "QLinearSoftmax": (3, 4),
    "QGemm": (7, 8),
    "QLinearConcat": (0, 1),
}
_ORT_SAME_DATA = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Identity"}  # values, not scale, pass through


def ort_boundaries(
    engine_dir: str | Path,
    source_onnx: str | Path,
    feeds: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None = None,
    threads: int = 1,
) -> tuple[str, list[str], list[np.ndarray], str]:
    """The tensors of an ONNX Runtime engine (its saved optimised graph) that stand for tensors of `source_onnx`.

    A source tensor `x` is found in the engine as, best first (what the next kernel really reads):
    `x_DequantizeLinear_Output` (float); `x_QuantizeLinear_Output` (u8/i8, dequantized here with the scale and
    zero point of the op that quantized it); `x` (float); `x_QuantizeLinear_Input` (float, renamed final output);
    the output of a quantized op whose output scale is `x_scale` (an NHWC QLinearConv's unnamed output,
    transposed back to NCHW); the output of the NCHWc node `x_nchwc` (blocked layout: a ReorderOutput node is
    added beside it to read it as NCHW). A source tensor fused away (a Conv output before its Relu) is skipped.
    `reference`: the engine's normal outputs (kiln's load_engine session); by default the engine file is run
    as it is, with the same session options (`threads` intra-op threads: the engine target's)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    engine = onnx.load(str(Path(engine_dir) / OPTIMIZED))
    source = onnx.shape_inference.infer_shapes(onnx.load(str(source_onnx), load_external_data=False))
    src_inputs = [i.name for i in source.graph.input]
    order = src_inputs + [o for n in source.graph.node for o in n.output if o]
    dims = {
        v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
        for v in [*source.graph.input, *source.graph.value_info, *source.graph.output]
    }
    init = {t.name: t for t in engine.graph.initializer}
    producer = {o: n for n in engine.graph.node for o in n.output if o}
    final = [o.name for o in engine.graph.output]

    def qparams(t: str) -> tuple[np.ndarray, np.ndarray] | None:
        node = producer.get(t)
        while node is not None and node.op_type in _ORT_SAME_DATA:
            node = producer.get(node.input[0])
        if node is None or node.op_type not in _ORT_QPARAMS:
            return None
        s, z = (node.input[i] if i < len(node.input) else "" for i in _ORT_QPARAMS[node.op_type])
        if s not in init:
            return None
        zp = numpy_helper.to_array(init[z]) if z in init else np.zeros((), np.uint8)
        return numpy_helper.to_array(init[s]), zp

    def channels_last(t: str) -> bool:
        node = producer.get(t)
        return node is not None and any(a.name == "channels_last" and a.i for a in node.attribute)

    # name in the source graph -> (tensor in the engine, how to read it)
    found: dict[str, tuple[str, str]] = {}
    by_scale: dict[str, str] = {}  # x -> first quantized op output (unnamed by the quantizer) whose scale is x_scale
    for n in engine.graph.node:
        if n.op_type in _ORT_QPARAMS and n.op_type != "QuantizeLinear" and not n.output[0].endswith("_QuantizeLinear_Output"):
            by_scale.setdefault(n.input[_ORT_QPARAMS[n.op_type][0]].removesuffix("_scale"), n.output[0])
    by_nchwc = {
        n.name.removesuffix("_nchwc"): n.output[0]
        for n in engine.graph.node
        if n.domain == "com.microsoft.nchwc" and n.name.endswith("_nchwc")
    }
    for x in order:
        candidates = [
            (x if x in final else "", "float"),  # the engine's own output, as it returns it
            (f"{x}_DequantizeLinear_Output", "float"),
            (f"{x}_QuantizeLinear_Output", "quantized"),
            (x, "float"),
            (f"{x}_QuantizeLinear_Input", "float"),
            (by_scale.get(x, ""), "quantized"),
            (by_nchwc.get(x, ""), "nchwc"),
        ]
        for t, how in candidates:
            if t and (t in producer) and (how != "quantized" or qparams(t) is not None):
                found[x] = (t, how)
                break
    skipped = [x for x in order if x not in found and x not in src_inputs]

    model = onnx.ModelProto()
    model.CopyFrom(engine)
    read: dict[str, str] = {}  # source name -> engine tensor fetched
    for x, (t, how) in found.items():
        if how == "nchwc":
            channels = (dims.get(x) or [None, None])[1]
            if not channels:
                skipped.append(x)
                continue
            out = f"{t}__as_nchw_{x}"
            model.graph.node.append(
                onnx.helper.make_node("ReorderOutput", [t], [out], f"{out}_reorder", domain="com.microsoft.nchwc", channels=channels)
            )
            t = out
        read[x] = t
        if t not in final:
            model.graph.output.append(onnx.ValueInfoProto(name=t))

    def session(m: onnx.ModelProto) -> Any:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimised: same kernels
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    if reference is None:
        plain = session(engine)
        reference = dict(zip(final, plain.run(final, dict(feeds))))
    fetch = list(dict.fromkeys([*final, *read.values()]))
    got = dict(zip(fetch, session(model).run(fetch, dict(feeds))))
    same = all(np.array_equal(got[o], reference[o]) and got[o].dtype == reference[o].dtype for o in final)

    names, arrays, notes = [], [], []
    for x in order:
        if x not in read:
            continue
        t, how = read[x], found[x][1]
        a = got[t]
        if how == "quantized":
            scale, zp = qparams(found[x][0])  # type: ignore[misc]
            a = ((a.astype(np.int32) - zp.astype(np.int32)) * scale).astype(np.float32)  # DequantizeLinear's arithmetic
            if channels_last(found[x][0]) and a.ndim > 2:
                a = np.moveaxis(a, -1, 1)
        if how == "float" and not np.issubdtype(a.dtype, np.floating):
            notes.append(f"{x}: engine tensor {t} is {a.dtype}, not float: skipped")
            continue
        want = dims.get(x)
        if want and (len(want) != a.ndim or any(w and w != g for w, g in zip(want, a.shape))):
            notes.append(f"{x}: engine tensor {t} has shape {a.shape}, source {want}: skipped")
            continue
        if x in src_inputs and t == x:
            continue  # the feed itself
        names.append(x)
        arrays.append(a)
        if t != x:
            notes.append(f"{x} <- {found[x][0]} ({how})")
    mode = "engine" if same else "engine (outputs differ)"
    head = "final outputs bit-identical with the added outputs" if same else "FINAL OUTPUTS DIFFER with the added outputs"
    tail = f"; no counterpart (fused away): {', '.join(skipped)}" if skipped else ""
    return mode, names, arrays, f"{head}; " + "; ".join(notes) + tail
