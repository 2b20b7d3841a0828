"""An OpenVINO engine's intermediate tensors where its fusions leave them (kiln.diagnose.debug's boundaries).

The runtime model of the compiled engine says which IR ops each fused kernel runs (`originalLayersNames`);
outputs are added only where a kernel's result leaves it, the IR compiled again with the engine's config,
and the result kept when the final outputs are bit-identical and the runtime model unchanged. Otherwise
(OpenVINO cannot expose a fused int8 chain's values without changing it) the same IR runs with low-precision
transformations off in f32, int8 simulated by its FakeQuantize nodes, and the mode says "simulated".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def ov_boundaries(
    engine_dir: str | Path, source_onnx: str | Path, target: Any, feeds: Mapping[str, np.ndarray], simulate: bool = False
) -> tuple[str, list[str], list[np.ndarray], str]:
    """The outputs of the OpenVINO engine's fused runtime nodes, keyed by source tensor names.

    The IR is compiled as the engine is (kiln.runtimes.openvino._config(target)); each runtime node's
    `originalLayersNames` says which IR ops it runs, and the op of that group whose output leaves it is the
    boundary (a FakeQuantize that NNCF put after a Relu counts as that Relu's tensor: the dequantized u8 values
    the next kernel reads). Outputs are added there only, the IR compiled again with the same config, and kept
    (mode "engine") if the original outputs are bit-identical, no added output is all zeros, and the runtime
    model's nodes and precisions are unchanged; otherwise they come from a compile with
    LP_TRANSFORMS_MODE NO and f32 (int8 simulated by FakeQuantize in f32; mode "simulated", also when `simulate`)."""
    import onnx
    import openvino as ov

    from kiln.runtimes.openvino import IR, _config, _device

    core = ov.Core()
    path, device, config = str(Path(engine_dir) / IR), _device(target), _config(target)
    source = onnx.load(str(source_onnx), load_external_data=False)
    src_inputs = {i.name for i in source.graph.input}
    order = [i.name for i in source.graph.input] + [o for n in source.graph.node for o in n.output if o]
    wanted = set(order)

    model = core.read_model(path)
    base = core.compile_model(model, device, config)
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}

    def run(compiled: Any) -> list[np.ndarray]:
        result = compiled.create_infer_request().infer(dict(feeds))
        return [np.array(result[port]) for port in compiled.outputs]

    def runtime_nodes(compiled: Any) -> list[tuple[str, str, str, str]]:
        """(layer type, runtime precision, output precisions, IR ops fused) of the runtime model's nodes, less the
        read-out branches an added output brings (Eltwise dequantization u8 -> f32, Reorder, Convert feeding only
        Results) and layout Reorders; the `_original` suffix LPT gives a node whose output gained a Result is
        dropped, and so are generated names (Multiply_<n>) that differ between compiles."""
        runtime = compiled.get_runtime_model().get_ordered_ops()
        kind = {op.get_friendly_name(): op.get_rt_info()["layerType"].astype(str) for op in runtime}
        readout: set[str] = set()
        for op in reversed(runtime):
            users = [c.get_node().get_friendly_name() for p in op.outputs() for c in p.get_target_inputs()]
            if (
                kind[op.get_friendly_name()] in ("Eltwise", "Reorder", "Convert")
                and users
                and all(kind[u] == "Output" or u in readout for u in users)
            ):
                readout.add(op.get_friendly_name())
        rows = []
        for op in runtime:
            name, info = op.get_friendly_name(), op.get_rt_info()
            if kind[name] in ("Input", "Output", "Const", "Reorder") or name in readout:
                continue
            fused = (
                [n.removesuffix("_original") for n in info["originalLayersNames"].astype(str).split(",")]
                if "originalLayersNames" in info
                else []
            )
            get = {k: v.astype(str) for k, v in info.items()}.get
            rows.append((kind[name], get("runtimePrecision", ""), get("outputPrecisions", ""), ",".join(n for n in fused if n in ops)))
        return rows

    def source_name(port: Any) -> str | None:
        """The source tensor a port stands for, walking up through NNCF's FakeQuantize (and Converts)."""
        for _ in range(8):
            names = [n for n in port.get_names() if n in wanted]
            if names:
                return names[0]
            node = port.get_node()
            if node.get_type_name() not in ("FakeQuantize", "Convert") or node.get_input_size() == 0:
                return None
            port = node.input_value(0)
        return None

    groups: list[set[str]] = []
    for op in base.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "originalLayersNames" in info and info["layerType"].astype(str) != "Const":
            groups.append({n for n in info["originalLayersNames"].astype(str).split(",") if n in ops})
    placed = set().union(*groups)

    def leaves(port: Any, group: set[str], depth: int = 0) -> bool:
        """Whether a port's value is read outside its runtime node; ops the plugin removed (a Relu that LPT
        folded into the FakeQuantize after it) are looked through to their consumers."""
        for c in port.get_target_inputs():
            node = c.get_node()
            name = node.get_friendly_name()
            if node.get_type_name() == "Result" or (name in placed and name not in group):
                return True
            if name not in placed and depth < 8 and any(leaves(p, group, depth + 1) for p in node.outputs()):
                return True
        return False

    boundaries: dict[str, Any] = {}  # source name -> IR output port (later runtime nodes win: what the next kernel reads)
    for group in groups:
        for name in group:
            ir_op = ops[name]
            if ir_op.get_type_name() in ("Parameter", "Result", "Constant"):
                continue
            for port in ir_op.outputs():
                x = source_name(port) if leaves(port, group) else None
                if x is not None:
                    boundaries[x] = port
    names = [x for x in order if x in boundaries and not (x in src_inputs and boundaries[x].get_node().get_type_name() == "Parameter")]
    skipped = [x for x in order if x not in boundaries and x not in src_inputs]

    n_final = len(model.outputs)
    where = {x: (boundaries[x].get_node().get_friendly_name(), boundaries[x].get_index()) for x in names}
    ref = run(base)
    before = runtime_nodes(base)

    def probe(chosen: list[str], compile_config: Mapping[str, Any] = config) -> tuple[Any, list[np.ndarray], dict[str, int]]:
        """The IR with outputs at `chosen`, compiled (by default with the engine's config); its results and each name's slot."""
        probed_model = core.read_model(path)
        probed_ops = {op.get_friendly_name(): op for op in probed_model.get_ordered_ops()}
        probed_model.add_outputs([probed_ops[where[x][0]].output(where[x][1]) for x in chosen])
        # Each added Result follows the port it was added at: match results to names by producer, not by order.
        producers = {where[x]: x for x in chosen}
        slot: dict[str, int] = {}
        for i, result in enumerate(probed_model.get_results()):
            src = result.input_value(0)
            key = (src.get_node().get_friendly_name(), src.get_index())
            if key in producers:
                slot.setdefault(producers[key], i)  # an existing output first (add_outputs adds no second Result)
        compiled = core.compile_model(probed_model, device, dict(compile_config))
        return compiled, run(compiled), slot

    # A Result can stop a fusion (OpenVINO fuses a residual Add and the next FakeQuantize into the Convolution
    # before them only while nothing else reads the Convolution's output): drop the boundaries whose kernel
    # changed and try again, so what is read is the engine's own, at fewer boundaries.
    kept, dropped, problems = list(names), [], []
    for _ in range(6):
        compiled, got, slot = probe(kept)
        after = runtime_nodes(compiled)
        problems = []
        if not all(np.array_equal(a, b) for a, b in zip(got[:n_final], ref)):
            problems.append("final outputs differ with the added outputs")
        zeros = [x for x in kept if not np.any(got[slot[x]])]
        if zeros:
            problems.append(f"added outputs all zeros: {', '.join(zeros)}")
        if before != after:
            problems.append(f"the runtime model changed ({len(before)} -> {len(after)} compute nodes)")
            changed = {layer for row in set(before) - set(after) for layer in row[3].split(",") if layer}
            # First the boundaries inside a changed kernel; then those feeding one (a residual input that is
            # also read cannot be summed into in place).
            broken = [x for x in kept if where[x][0] in changed] or [
                x for x in kept if any(c.get_node().get_friendly_name() in changed for c in boundaries[x].get_target_inputs())
            ]
            if broken and len(broken) < len(kept):
                dropped += broken
                kept = [x for x in kept if x not in broken]
                continue
        break
    if simulate:
        problems.append("simulation asked for")
    found = f"boundaries {', '.join(f'{x} <- {where[x][0]}' for x in kept)}"
    tail = f"; no counterpart (fused away): {', '.join(skipped)}" if skipped else ""
    if dropped:
        tail += f"; not read, as reading them changed their fused kernel: {', '.join(dropped)}"
    if not problems:
        note = f"final outputs bit-identical, runtime model unchanged ({len(before)} compute nodes); {found}{tail}"
        return "engine", kept, [got[slot[x]] for x in kept], note
    # Nothing kept the engine as it is: every boundary from one compile with quantization simulated in f32.
    _, got, slot = probe(names, {**config, "INFERENCE_PRECISION_HINT": "f32", "LP_TRANSFORMS_MODE": "NO"})
    found = f"boundaries {', '.join(f'{x} <- {where[x][0]}' for x in names)}"
    note = f"{'; '.join(problems)}: read from a compile with LP_TRANSFORMS_MODE NO, f32 (int8 simulated by FakeQuantize); {found}"
    return "simulated", names, [got[slot[x]] for x in names], note
