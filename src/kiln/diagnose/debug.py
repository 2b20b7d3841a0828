"""Where an engine first departs from the fp32 graph (or from another engine): per-boundary numerics.

A boundary is a tensor of the source ONNX graph (artifacts/model.onnx) that the engine still materialises
after its compiler's fusions: reading it does not change what the engine computes. Runtimes that can
read their boundaries implement `BoundaryInspectingRuntime` (kiln.runtimes) and say how they read them:

- "engine": the engine's own kernels, with outputs added only where a fused kernel already writes a tensor,
  and the engine's final outputs checked bit-identical with and without them;
- "simulated": the runtime could not expose its fused int8 kernels' outputs, so the quantized model ran with
  quantization simulated in f32 (the same scales and rounding, not the same kernels): a guide to where the
  error comes from, not the engine's exact numbers.

A runtime without the capability is compared at its outputs only, and the report says so.

The reference side is the fp32 ONNX graph run by ONNX Runtime with graph optimizations off, every float tensor
an output (the validate stage already showed that graph matches eager PyTorch). Per boundary: SQNR, cosine and
max abs error, in graph order; the first boundary below `threshold_db`, and the largest drop from one
boundary to the next. `kiln debug <target>` writes reports/debug/<target>.json and the SQNR-along-
the-graph rows for the `debug` plot (reports/debug.csv); `--repair` runs kiln.diagnose.repair's bisection.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kiln.accuracy.numerics import bounded_sqnr_db, compare_output
from kiln.core.errors import KilnError
from kiln.core.paths import DEBUG, DEBUG_CSV
from kiln.export.graphs import COMPUTE_OPS
from kiln.runtimes import Boundaries

log = logging.getLogger(__name__)

THRESHOLD_DB = 12.0  # noise at ~6% of the signal's power: a tensor that no longer carries the layer's message
DEBUG_DIR = DEBUG
PLOT_COMMAND = (
    "dvc plots show reports/debug.csv --template plots/templates/debug.json -x index -y sqnr_db "
    "--title 'SQNR along the graph' --x-label 'boundary (graph order)' --y-label 'SQNR dB (higher is closer)'"
)
CSV_HEADER = ["target", "against", "index", "boundary", "op", "sqnr_db", "cosine", "max_abs_err"]


def graph_order(onnx_path: Path) -> list[tuple[str, str]]:
    """(tensor, op type of the node that produces it, or "input") for the graph's float inputs and every float tensor
    its nodes produce, in node order. An int8 engine's quantized input is its first boundary."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types then come from the value_info the exporter wrote, if any
        pass
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    inputs = [(i.name, "input") for i in model.graph.input if i.type.tensor_type.elem_type in floats]
    return inputs + [
        (out, n.op_type) for n in model.graph.node for out in n.output if out and types.get(out, onnx.TensorProto.FLOAT) in floats
    ]


def producing_layer(onnx_path: Path, tensor: str) -> str | None:
    """The compute node (Conv, Gemm, MatMul...) whose result `tensor` is, looking up through the element-wise,
    pooling and shape ops after it: the layer to blame, and to return to float, when `tensor` diverges."""
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    return layer_behind({out: n for n in nodes for out in n.output}, tensor)


def layer_behind(producer: Mapping[str, Any], tensor: str) -> str | None:
    """producing_layer on a graph already read: `producer` maps each tensor to the node that makes it."""
    node = producer.get(tensor)
    for _ in range(8):
        if node is None or node.op_type in COMPUTE_OPS:
            break
        node = producer.get(node.input[0]) if node.input else None
    return node.name if node is not None else None


def reference_boundaries(onnx_path: Path, feeds: Mapping[str, np.ndarray], names: list[str] | None = None) -> Boundaries:
    """Every float tensor of the fp32 graph (or `names`), from ONNX Runtime with graph optimizations off."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    order = [t for t, _ in graph_order(onnx_path)]
    wanted = [t for t in order if (names is None or t in set(names)) and t not in feeds]
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in existing)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = dict(zip(wanted, session.run(wanted, dict(feeds))))
    tensors = {t: (np.asarray(feeds[t]) if t in feeds else values[t]) for t in order if t in feeds or t in values}
    return Boundaries("engine", "the fp32 ONNX graph, ONNX Runtime, graph optimizations off", tensors)


def engine_boundaries(engine_dir: Path, target: Any, onnx_path: Path, feeds: Mapping[str, np.ndarray]) -> Boundaries:
    """The engine's boundaries through its runtime's capability; its outputs only where the runtime has none."""
    from kiln.pipeline.engine import load_engine
    from kiln.runtimes import BoundaryInspectingRuntime, get_runtime

    runtime = get_runtime(target.runtime)
    if isinstance(runtime, BoundaryInspectingRuntime):
        return runtime.boundary_activations(engine_dir, target, onnx_path, feeds)
    session, _ = load_engine(engine_dir, target)
    return Boundaries(
        "outputs only",
        f"runtime '{target.runtime}' cannot expose intermediate tensors (no BoundaryInspectingRuntime): its outputs are compared",
        dict(session.infer(feeds)),
    )


def compare_boundaries(
    ref: Boundaries, got: Boundaries, ops: Mapping[str, str] | None = None, threshold_db: float = THRESHOLD_DB
) -> dict[str, Any]:
    """Per boundary both sides have (in `ref`'s order): SQNR, cosine, max abs error; the first below the threshold."""
    rows: list[dict[str, Any]] = []
    for name, r in ref.tensors.items():
        g = got.tensors.get(name)
        if g is None:
            continue
        if np.shape(g) != np.shape(r):
            log.warning("boundary %s: shape %s against %s; skipped", name, np.shape(g), np.shape(r))
            continue
        c = compare_output(name, np.asarray(r, np.float32), np.asarray(g, np.float32))
        sqnr = bounded_sqnr_db(c.sqnr_db)
        rows.append(
            {
                "index": len(rows),
                "boundary": name,
                "op": (ops or {}).get(name, ""),
                "shape": list(np.shape(r)),
                "sqnr_db": round(sqnr, 2),
                "cosine": round(c.cosine, 6),
                "max_abs_err": float(f"{c.max_abs_err:.4g}"),
            }
        )
    if not rows:
        raise KilnError(
            "the two sides share no boundary tensor: their graphs name tensors differently (was the engine built from this "
            "project's artifacts/model.onnx?)"
        )
    first = next((row for row in rows if row["sqnr_db"] < threshold_db), None)
    drops = [(rows[i - 1]["sqnr_db"] - rows[i]["sqnr_db"], rows[i]) for i in range(1, len(rows))]
    steepest = max(drops, key=lambda d: d[0]) if drops else None
    return {
        "threshold_db": threshold_db,
        "boundaries": rows,
        "compared": len(rows),
        "first_divergent": first,
        "largest_drop": {"boundary": steepest[1]["boundary"], "drop_db": round(steepest[0], 2)} if steepest else None,
        "output_sqnr_db": rows[-1]["sqnr_db"],
    }


def describe(result: Mapping[str, Any]) -> str:
    """A line for a log or an error: where it first diverges, or that it does not."""
    first = result.get("first_divergent")
    if first is None:
        compared, output = result["compared"], result["output_sqnr_db"]
        return f"no boundary below {result['threshold_db']:g} dB SQNR ({compared} compared; output {output:.1f} dB)"
    made = (
        f" ({first['op']}"
        + (f" after layer '{first['layer']}'" if first.get("layer") and first["layer"] != first["boundary"] else "")
        + ")"
    )
    return (
        f"first divergent boundary '{first['boundary']}'{made if first['op'] else ''}: SQNR {first['sqnr_db']:.1f} dB "
        f"< {result['threshold_db']:g} dB, boundary {first['index'] + 1} of {result['compared']}"
    )


def debug_engines(
    onnx_path: Path,
    feeds: Mapping[str, np.ndarray],
    a: tuple[Path, Any] | None,
    b: tuple[Path, Any],
    threshold_db: float = THRESHOLD_DB,
) -> dict[str, Any]:
    """Engine `b` against engine `a` (None: the fp32 graph) at the boundaries both expose, with how each side was read."""
    start = time.perf_counter()
    ops = dict(graph_order(onnx_path))
    got = engine_boundaries(b[0], b[1], onnx_path, feeds)
    if a is None:
        ref = reference_boundaries(onnx_path, feeds, list(got.tensors))
    else:
        ref = engine_boundaries(a[0], a[1], onnx_path, feeds)
        ref = Boundaries(ref.mode, ref.note, {t: ref.tensors[t] for t in ops if t in ref.tensors})
    result = compare_boundaries(ref, got, ops, threshold_db)
    if result["first_divergent"] is not None:
        result["first_divergent"]["layer"] = producing_layer(onnx_path, result["first_divergent"]["boundary"])
    result.update(
        reference={"mode": ref.mode, "note": ref.note, "target": a[1].name if a else None},
        engine={"mode": got.mode, "note": got.note, "target": b[1].name},
        samples=int(next(iter(feeds.values())).shape[0]),
        seconds=round(time.perf_counter() - start, 2),
    )
    return result


def diagnose(name: str, target: Any, engine_dir: Path, onnx_path: Path, reference: Mapping[str, Any], samples: int = 16) -> str:
    """For an engine over its accuracy budget: where it first departs from the fp32 graph, as a sentence for
    the error. Writes no file (the benchmark stage that calls it declares none for it: `kiln debug`
    writes reports/debug/). Never raises: a failing debugger must not hide the budget."""
    try:
        result = debug_engines(onnx_path, eval_feeds(reference, samples), None, (engine_dir, target))
    except Exception as e:  # noqa: BLE001 - reported in the sentence instead
        log.warning("the first-divergence search failed: %s: %s", type(e).__name__, e)
        return f"(the first-divergence search failed: {type(e).__name__}: {e})"
    return f"kiln.diagnose.debug ({result['engine']['mode']} mode): {describe(result)}; every boundary: `kiln debug {name}`"


def csv_rows(target: str, against: str, result: Mapping[str, Any]) -> list[list[Any]]:
    return [
        [target, against, r["index"], r["boundary"], r["op"], r["sqnr_db"], r["cosine"], r["max_abs_err"]] for r in result["boundaries"]
    ]


def write_debug(target: str, against: str, result: Mapping[str, Any], root: Path = Path(".")) -> Path:
    """reports/debug/<target>[-vs-<against>].json, and its rows in reports/debug.csv (other targets' rows kept)."""
    from kiln.core.atomic import write_json, write_text

    stem = target if against == "fp32" else f"{target}-vs-{against}"
    path = root / DEBUG_DIR / f"{stem}.json"
    write_json(path, dict(result))
    table = root / DEBUG_CSV
    kept: list[list[str]] = []
    if table.is_file():
        kept = [row for row in list(csv.reader(io.StringIO(table.read_text())))[1:] if row[:2] != [target, against]]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(kept + csv_rows(target, against, result))
    write_text(table, out.getvalue())
    return path


def eval_feeds(reference: Mapping[str, Any], samples: int) -> dict[str, np.ndarray]:
    inputs = reference["inputs"]
    return {k: v[:samples] for k, v in inputs.items()}


def short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_text(target: str, against: str, result: Mapping[str, Any], rows: int = 40) -> str:
    lines = [
        f"{target} against {against}: {describe(result)}",
        f"  {target}: {result['engine']['mode']} ({short(result['engine']['note'])})",
        f"  {against}: {result['reference']['mode']} ({short(result['reference']['note'])})",
        "",
        f"  {'#':>3}  {'boundary':<48} {'op':<16} {'SQNR dB':>8} {'cosine':>9} {'max abs err':>12}",
    ]
    shown = result["boundaries"]
    if len(shown) > rows:  # the start, the divergence and the end matter; the middle is in the JSON
        first = (result.get("first_divergent") or {}).get("index", 0)
        keep = set(range(5)) | set(range(max(0, first - 3), first + 4)) | set(range(len(shown) - 5, len(shown)))
        shown = [r for r in shown if r["index"] in keep]
    for r in shown:
        mark = " <" if result.get("first_divergent") and r["index"] == result["first_divergent"]["index"] else ""
        figures = f"{r['sqnr_db']:>8.1f} {r['cosine']:>9.5f} {r['max_abs_err']:>12.4g}"
        lines.append(f"  {r['index']:>3}  {r['boundary'][:48]:<48} {r['op'][:16]:<16} {figures}{mark}")
    repair = result.get("repair")
    if repair:
        lines += ["", *repair.get("lines", [])]
    return "\n".join(lines)
