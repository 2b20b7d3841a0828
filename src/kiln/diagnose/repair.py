"""Repair an int8 engine over its accuracy budget: return the fewest layers to float that bring it back.

Every calibrated runtime keeps the layers of `calibration.ignored_scope` in float (ONNX Runtime's
`nodes_to_exclude`, NNCF's `ignored_scope`), so the repair is runtime-neutral: it re-calibrates and
re-builds the target with layers added to that list and measures its accuracy against the fp32 reference
on the eval set, as the benchmark does, until the target's budget (benchmark.accuracy_budget with its own
keys over it) holds.

Order of the search: where the loss is first, then where it is largest: the boundary tensors of the diagnosis
(kiln.diagnose.debug) from the first divergence on, each with the layer it comes from and the layers that make that
layer's inputs (tensor_candidates: an outlier channel spoils one input's scale, and the layer that reads it
diverges), then single layers by the noise their quantization adds (kiln.accuracy.sensitivity, all of them). The
first try is the diagnosed tensor's layers alone; bisection on how many steps of that list go back to float then
finds the shortest passing prefix (assuming more float never hurts, which holds to first order), and each layer of
it is dropped in turn if the budget still holds without it. Each try is one calibrate +
build (seconds on a small model, minutes on a big one): `max_builds` bounds every build the repair makes, the
fp32 engine and the runtime's own accuracy control included, and each is logged with how many are left. The
repaired engine is then timed beside int8 and the same runtime's fp32 engine in interleaved rounds (each layer's
price where the search built the engine without it): a repair no faster than fp32 is reported as not repaired,
since int8 then buys nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from kiln.core.errors import KilnError
from kiln.diagnose.repair_speed import fp32_engine, speed_cost
from kiln.export.graphs import COMPUTE_OPS

log = logging.getLogger(__name__)


def candidate_layers(onnx_path: Path, ranked: list[str], first_layer: str | None) -> list[str]:
    """ONNX node names to try in float, in order: the first divergent boundary's layer, then the ranking.

    Ranked names come from the runtime's quantized graph: a name that is not a node of the source graph, or
    the start of one (OpenVINO's "<node>/WithoutBiases"), is matched to the node it comes from or dropped."""
    import onnx

    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    names = [n.name for n in nodes]
    compute = {n.name for n in nodes if n.op_type in COMPUTE_OPS}
    order: list[str] = []
    for name in [first_layer or "", *ranked]:
        match = name if name in names else next((n for n in names if name.startswith(n + "/")), None)
        if match and match in compute and match not in order:
            order.append(match)
    return order


# How many boundary tensors of the diagnosis become candidates (each with the layers around it), before single layers.
TENSOR_CANDIDATES = 6


def tensor_candidates(onnx_path: Path, debug_result: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Candidates where the loss is: boundary tensors from the first divergence on (the one the diagnosis named first,
    then the others by how much SQNR each loses over the boundary before it), each with the layers that keep its loss
    out: the compute layer it comes from, and the layers that make that layer's inputs. A tensor diverges at the
    layer that reads a badly quantized input (one outlier channel sets the input's one scale, and every other channel
    rounds to zero), and keeping that input in float takes the reader out of int8 on every runtime, and on ONNX
    Runtime its maker too (QDQ quantizes a quantized layer's output)."""
    import onnx

    from kiln.diagnose.debug import layer_behind

    rows = list((debug_result or {}).get("boundaries") or [])
    first = (debug_result or {}).get("first_divergent")
    if not rows or not first:
        return []
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    producer = {out: n for n in graph.node for out in n.output}
    weights = {i.name for i in graph.initializer}
    drop = {rows[i]["boundary"]: (rows[i - 1]["sqnr_db"] - rows[i]["sqnr_db"]) if i else 0.0 for i in range(len(rows))}
    start = int(first["index"])
    later = sorted((r for r in rows[start + 1 :] if drop[r["boundary"]] > 0), key=lambda r: -drop[r["boundary"]])
    groups: list[dict[str, Any]] = []
    for row in [rows[start], *later]:
        layer = layer_behind(producer, row["boundary"])
        if layer is None or layer not in nodes:
            continue
        makers = [layer_behind(producer, i) for i in nodes[layer].input if i and i not in weights]
        layers = list(dict.fromkeys([layer, *(m for m in makers if m)]))
        if layers not in [g["layers"] for g in groups]:
            groups.append(
                {"tensor": row["boundary"], "sqnr_db": row["sqnr_db"], "drop_db": round(drop[row["boundary"]], 2), "layers": layers}
            )
        if len(groups) >= TENSOR_CANDIDATES:
            break
    return groups


def full_ranking(target: Any, onnx_path: Path, calibration_dir: Path, params: Mapping[str, Any], spec: Any) -> list[str]:
    """Every quantized layer, most noise added first (calibration.layer_sensitivity, all of it)."""
    from kiln.data.calibration_set import CalibrationSet, CalibrationSettings
    from kiln.pipeline.calibrate import layer_sensitivity
    from kiln.runtimes import get_runtime

    runtime = get_runtime(target.runtime)
    settings = CalibrationSettings.for_target(params.get("calibration"), target, runtime.calibration_options_type)  # type: ignore[attr-defined]
    calib = CalibrationSet.from_params(params.get("data") or {}, spec, settings)
    return [str(r["layer"]) for r in layer_sensitivity(runtime, onnx_path, calibration_dir, calib, top=None)]


def override_line(target: str, scope: list[str]) -> str:
    """The `kiln params` override that applies `scope` ("++": the target may have no calibration block yet)."""
    return f"kiln params '++targets.{target}.calibration.ignored_scope={json.dumps(scope, separators=(',', ':'))}'"


def repair_target(
    target: Any,
    params: Mapping[str, Any],
    debug_result: Mapping[str, Any] | None = None,
    max_builds: int = 12,
    budget_overrides: Mapping[str, float] | None = None,
    remedies: bool = True,
) -> dict[str, Any]:
    """Search the layers to return to float for `target` in this project (artifacts/, params.yaml); see the module doc."""
    from kiln.accuracy.budgets import accuracy_against_reference, budget_limits, budget_violations
    from kiln.core import paths
    from kiln.data.engine_input import engine_spec
    from kiln.data.inputs import make_inputs
    from kiln.data.reference import load_reference
    from kiln.pipeline.calibrate import calibrate_target
    from kiln.pipeline.engine import build_engine, load_engine
    from kiln.runtimes import BuildSource, needs_calibration

    if not needs_calibration(target):
        raise KilnError(
            f"targets.{target.name} is {target.runtime} {target.precision}: nothing is quantized, so nothing to return to float"
        )
    if max_builds < 2:
        raise KilnError(f"--max-builds must be at least 2 (the all-candidates check and one bisection), got {max_builds}")
    start = time.perf_counter()
    spec = engine_spec(params)
    bench = params.get("benchmark") or {}
    budget = budget_limits(bench.get("accuracy_budget") or {}, {**target.accuracy_budget, **(budget_overrides or {})})
    if not spec.trained_weights()[0]:
        log.warning("%s: the model has random weights: its agreement says little, and neither does a repair of it", target.name)
    reference = load_reference(paths.REFERENCE)
    base_scope = list(target.calibration.get("ignored_scope") or [])
    ranked = full_ranking(target, paths.ONNX, paths.CALIBRATION / target.name, params, spec)
    first = (debug_result or {}).get("first_divergent") or {}
    tensors = tensor_candidates(paths.ONNX, debug_result)
    # What the search adds to float, a step at a time: each diagnosed tensor's layers, then single layers by sensitivity.
    steps: list[list[str]] = []
    for group in tensors:
        layers = [layer for layer in group["layers"] if layer not in base_scope]
        if layers and layers not in steps:
            steps.append(layers)
    for layer in candidate_layers(paths.ONNX, ranked, first.get("layer")):
        if layer not in base_scope and not any(layer in step for step in steps):
            steps.append([layer])

    def first_steps(k: int) -> tuple[str, ...]:
        return tuple(dict.fromkeys(layer for step in steps[:k] for layer in step))

    candidates = list(first_steps(len(steps)))
    work = Path(tempfile.mkdtemp(prefix=f"kiln-repair-{target.name}-"))
    judged: dict[tuple[str, ...], dict[str, Any]] = {}
    sessions: dict[tuple[str, ...], Any] = {}  # by layers in float (+ calibration options): each a calibrate + build
    calibrations: dict[tuple[str, ...], dict[str, Any]] = {}

    build_seconds: list[float] = []

    def engine_for(scope: tuple[str, ...], options: Mapping[str, Any] | None = None) -> Any:
        """The target calibrated and built with `scope` in float (and `options` over its calibration options)."""
        key = scope + ((f"options:{json.dumps(options, sort_keys=True)}",) if options else ())
        if key in sessions:
            return sessions[key]
        if len(sessions) >= max_builds:  # every build counts, the speed measurements' and the runtime's own included
            raise BuildBudgetSpent(f"--max-builds {max_builds} spent")
        left = (max_builds - len(sessions)) * (float(np.mean(build_seconds)) if build_seconds else float("nan"))
        log.info(
            "repair: build %d of at most %d: %d layer(s) in float%s%s",
            len(sessions) + 1,
            max_builds,
            len(scope),
            f" ({', '.join(scope[:4])}{', ...' if len(scope) > 4 else ''})" if scope else "",
            f"; at most about {left:.0f} s left" if left == left else "",
        )
        began = time.perf_counter()
        calibration = {**target.calibration, "ignored_scope": [*base_scope, *scope]}
        if options:
            calibration["options"] = {**dict(target.calibration.get("options") or {}), **options}
        t = replace(target, tune=False, calibration=calibration)
        folder = work / f"try-{len(sessions)}"
        calibrations[key] = calibrate_target(t, paths.ONNX, spec, params, folder / "calibration")
        build_engine(t, BuildSource(paths.ONNX, spec, folder / "calibration"), folder / "engine")
        sessions[key], _ = load_engine(folder / "engine", t)
        build_seconds.append(time.perf_counter() - began)
        return sessions[key]

    def judge(scope: tuple[str, ...], options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        accuracy = accuracy_against_reference(engine_for(scope, options), reference, chunk=target.profile.opt)
        violations = budget_violations(accuracy, budget)
        row = {"float_layers": list(scope), "passed": not violations, "violations": violations, "agreement": accuracy.get("agreement")}
        for key in ("top1_agreement", "top1", "top1_drop", "sqnr_db"):
            if accuracy.get(key) is not None:
                row[key] = accuracy[key]
        log.info("repair: %d layer(s) in float: %s", len(scope), "within budget" if row["passed"] else "; ".join(violations))
        if not options:
            judged[scope] = row
        return row

    probes: list[dict[str, Any]] = []

    def probe(scope: tuple[str, ...]) -> bool:
        row = judge(scope)
        probes.append(row)
        return bool(row["passed"])

    nncf_log = logging.getLogger("nncf")  # NNCF logs every node it skips at INFO, once per build
    nncf_level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)
    try:
        before = judge(())
        probes.append(before)
        result: dict[str, Any] = {
            "budget": budget,
            "candidates": candidates,
            "candidate_tensors": tensors,
            "before": before,
            "probes": probes,
        }
        # Builds kept for after the search: the fp32 engine the repaired one must beat (its speed is the point), and
        # the runtime's own accuracy control where it offers one.
        reserve = 1 + offers_accuracy_control(target)

        def judge_speed(chosen: list[str], what: str, repaired: Any = None) -> None:
            """Time int8, the repaired engine and fp32 side by side; a repair no faster than fp32 is none."""
            fp32 = fp32_engine(target, spec, work / "fp32", sessions, max_builds)
            feeds = make_inputs(spec.inputs, target.main_batch, 0)
            result["speed"] = speed = speed_cost(engine_for, chosen, feeds, built=set(sessions), fp32=fp32, repaired=repaired)
            if fp32 is not None and speed["repaired_ms_per_image"] >= speed["fp32_ms_per_image"]:
                result["status"] = (
                    f"not repaired: the engine within budget ({what}) runs at {speed['repaired_ms_per_image']:.4g} ms/image, "
                    f"no faster than fp32's {speed['fp32_ms_per_image']:.4g}: int8 buys nothing; ship the fp32 engine, or give "
                    "the repair more builds (--max-builds) to find fewer layers"
                )

        remedy = None
        if not before["passed"] and remedies:  # an outlier-aware remedy the runtime offers, before any layer goes to float
            for name, options in outlier_remedies(target):
                if len(sessions) >= max_builds - reserve - 1:
                    break
                row = {**judge((), options), "remedy": name}
                probes.append(row)
                if row["passed"]:
                    remedy = (name, options, row)
                    break
        if before["passed"]:
            result.update(status="within budget already", float_layers=[], after=before)
        elif remedy is not None:
            name, options, row = remedy
            result.update(status=f"repaired by {name}, no layer in float", float_layers=[], after=row, remedy=name)
            sets = [f"'++targets.{target.name}.calibration.options.{k}={json.dumps(v)}'" for k, v in options.items()]
            result["override"] = "kiln params " + " ".join(sets)
            judge_speed([], name, repaired=engine_for((), options))
        elif not candidates:
            result.update(status="no candidate layers (the runtime ranks none, and the first divergence is not a compute layer)")
        elif not probe(tuple(candidates)):
            result.update(
                status=f"over budget even with all {len(candidates)} candidate (compute) layers in float: what stays quantized "
                "(the input, residual adds, pooling) or the calibration loses it; try calibration.method percentile, "
                "or name those nodes in calibration.ignored_scope"
            )
        else:
            low, high = 0, len(steps)  # the first `low` steps fail, the first `high` pass
            # The first try is what the diagnosis named (its tensor's layers): when it is right, one build finds it.
            if high > 1 and len(sessions) < max_builds - reserve:
                if probe(first_steps(1)):
                    high = 1
                else:
                    low = 1
            while high - low > 1 and len(sessions) < max_builds - reserve:
                mid = (low + high) // 2
                if probe(first_steps(mid)):
                    high = mid
                else:
                    low = mid
            chosen = list(first_steps(high))
            for layer in list(chosen):  # fewest layers: drop any the budget does not need
                if len(chosen) == 1 or len(sessions) >= max_builds - reserve:
                    break
                if probe(tuple(c for c in chosen if c != layer)):
                    chosen.remove(layer)
            after = judged.get(tuple(chosen)) or judge(tuple(chosen))
            result.update(status="repaired", float_layers=chosen, after=after, ignored_scope=[*base_scope, *chosen])
            result["tensors_kept"] = [g["tensor"] for g in tensors if set(g["layers"]) & set(chosen)]
            result["override"] = override_line(target.name, [*base_scope, *chosen])
            judge_speed(chosen, f"{len(chosen)} layer(s) in float")
        if not before["passed"]:  # past --max-builds its build raises BuildBudgetSpent, which it reports as not run
            result["runtime_accuracy_control"] = runtime_accuracy_control(target, budget, judge, calibrations)
        result["builds"] = len(sessions)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["lines"] = repair_lines(target.name, result)
        return result
    finally:
        nncf_log.setLevel(nncf_level)
        sessions.clear()
        shutil.rmtree(work, ignore_errors=True)


# Outlier-aware remedies, tried before any layer goes back to float where the target's runtime offers the calibration
# option (a field of its calibration options): (what the report calls it, the options it sets).
REMEDIES = (
    ("SmoothQuant on convolutions (NNCF, alpha 0.5)", {"smooth_quant": 0.5}),
    ("cross-layer equalization (Nagel et al. 2019)", {"equalize": True}),
)


def calibration_option_names(target: Any) -> set[str]:
    """The calibration options the target's runtime offers (the fields of its calibration options type)."""
    from dataclasses import fields

    from kiln.runtimes import get_runtime

    options_type = getattr(get_runtime(target.runtime), "calibration_options_type", None)
    return {f.name for f in fields(options_type)} if options_type is not None else set()


def outlier_remedies(target: Any) -> list[tuple[str, dict[str, Any]]]:
    """The REMEDIES the target's runtime offers and its calibration does not already use."""
    offered = calibration_option_names(target)
    current = dict(target.calibration.get("options") or {})
    return [
        (name, options) for name, options in REMEDIES if set(options) <= offered and any(current.get(k) != v for k, v in options.items())
    ]


def offers_accuracy_control(target: Any) -> bool:
    """Whether the target's runtime has its own accuracy-aware quantization (a calibration option `accuracy_aware`)."""
    return "accuracy_aware" in calibration_option_names(target)


def runtime_accuracy_control(
    target: Any, budget: Mapping[str, Any], judge: Callable[..., dict[str, Any]], calibrations: Mapping
) -> dict[str, Any] | None:
    """The runtime's own accuracy-aware quantization (NNCF's accuracy control, where the runtime's calibration
    options offer `accuracy_aware`), run for comparison: which layers it returned to float, and the agreement."""
    if not offers_accuracy_control(target):
        return None
    options = {"accuracy_aware": {"max_drop": float(budget.get("max_top1_drop", 1.0))}}
    start = time.perf_counter()
    try:
        row = judge((), options)
    except KilnError as e:  # e.g. data/eval without labels: said, not fatal to kiln's own repair
        return {"status": f"not run: {e}"}
    key = (f"options:{json.dumps(options, sort_keys=True)}",)
    return {
        "status": "ran",
        "options": options,
        "float_layers": list((calibrations.get(key) or {}).get("float_layers") or []),
        "agreement": row.get("agreement"),
        "passed": row["passed"],
        "violations": row["violations"],
        "seconds": round(time.perf_counter() - start, 1),
    }


class BuildBudgetSpent(KilnError):
    """The repair asked for a build past --max-builds."""


def repair_lines(name: str, result: Mapping[str, Any]) -> list[str]:
    def agreement(row: Mapping[str, Any]) -> str:
        return f"{row['agreement']:.4g}" if isinstance(row.get("agreement"), (int, float)) else "n/a"

    lines = [f"repair of {name}: {result['status']} ({result.get('builds', 0)} builds, {result.get('seconds', 0)} s)"]
    lines.append(f"  before: agreement {agreement(result['before'])}; " + ("; ".join(result["before"]["violations"]) or "within budget"))
    first = next(iter(result.get("candidate_tensors") or []), None)
    if first:
        lines.append(
            f"  first try: the diagnosed tensor '{first['tensor']}' ({first['sqnr_db']:.1f} dB SQNR) with its layers in float: "
            + ", ".join(first["layers"])
        )
    if result.get("after") and result.get("float_layers"):
        lines.append(f"  after:  agreement {agreement(result['after'])} with {len(result['float_layers'])} layer(s) in float")
        for layer in (result.get("speed") or {}).get("layers", []):
            lines.append(f"    {layer['layer']}: {layer['added_ms_per_image']:+.4g} ms/image in float")
    speed = result.get("speed") or {}
    if speed:
        int8, repaired, fp32 = speed["int8_ms_per_image"], speed["repaired_ms_per_image"], speed.get("fp32_ms_per_image")
        lines.append(
            f"  speed at batch {speed['batch']}: {int8:.4g} ms/image int8, {repaired:.4g} repaired ({repaired / int8:.2f}x)"
            + (f", {fp32:.4g} fp32 (repaired is {fp32 / repaired:.2f}x faster than fp32)" if fp32 else "")
        )
    for row in result.get("probes") or []:
        if row.get("remedy"):
            lines.append(f"  tried {row['remedy']}: agreement {agreement(row)}, " + ("within budget" if row["passed"] else "over budget"))
    if str(result.get("status", "")).startswith("repaired"):
        lines.append(f"  apply: {result['override']}")
    control = result.get("runtime_accuracy_control")
    if control:
        if control["status"] != "ran":
            lines.append(f"  the runtime's accuracy control: {control['status']}")
        else:
            lines.append(
                f"  the runtime's accuracy control ({control['options']}): agreement {agreement(control)}, "
                f"{len(control['float_layers'])} layer(s) in float ({', '.join(control['float_layers'][:6]) or 'none'}), "
                f"{'within budget' if control['passed'] else 'over budget'}, {control['seconds']} s"
            )
    return lines
