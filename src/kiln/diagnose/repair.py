"""Repair an int8 engine over its accuracy budget: return the fewest layers to float that bring it back.

Every calibrated runtime keeps the layers of `calibration.ignored_scope` in float (ONNX Runtime's
`nodes_to_exclude`, NNCF's `ignored_scope`), so the repair is runtime-neutral: it re-calibrates and
re-builds the target with layers added to that list and measures its accuracy against the fp32 reference
on the eval set, as the benchmark does, until the target's budget (benchmark.accuracy_budget with its own
keys over it) holds.

Order of the search: the producer of the first divergent boundary (kiln.diagnose.debug), then the layers by the
noise their quantization adds (kiln.accuracy.sensitivity, all of them). Bisection on how many of that list go back
to float finds the shortest passing prefix (assuming more float never hurts, which holds to first order);
then each layer of it is dropped in turn if the budget still holds without it. Each try is one calibrate +
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


def full_ranking(target: Any, onnx_path: Path, calibration_dir: Path, params: Mapping[str, Any], spec: Any) -> list[str]:
    """Every quantized layer, most noise added first (calibration.layer_sensitivity, all of it)."""
    from kiln.data.calibration_set import CalibrationSet, CalibrationSettings
    from kiln.pipeline.calibrate import layer_sensitivity
    from kiln.runtimes import get_runtime

    runtime = get_runtime(target.runtime)
    settings = CalibrationSettings.for_target(params.get("calibration"), target, runtime.calibration_options_type)  # type: ignore[attr-defined]
    calib = CalibrationSet.from_params(params.get("data") or {}, spec, settings)
    return [str(r["layer"]) for r in layer_sensitivity(runtime, onnx_path, calibration_dir, calib, top=None)]


def interleaved_ms_per_image(sessions: list[Any], feeds: Mapping[str, np.ndarray], rounds: int = 7, per_round: int = 5) -> list[float]:
    """Median ms/image of each session, timed in turns (round r times every session once, order alternating)."""
    batch = next(iter(feeds.values())).shape[0]
    for s in sessions:
        s.infer(feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            start = time.perf_counter()
            for _ in range(per_round):
                sessions[i].infer(feeds)
            times[i].append((time.perf_counter() - start) * 1e3 / per_round / batch)
    return [float(np.median(t)) for t in times]


def override_line(target: str, scope: list[str]) -> str:
    """The `kiln params` override that applies `scope` ("++": the target may have no calibration block yet)."""
    return f"kiln params '++targets.{target}.calibration.ignored_scope={json.dumps(scope, separators=(',', ':'))}'"


def repair_target(
    target: Any,
    params: Mapping[str, Any],
    debug_result: Mapping[str, Any] | None = None,
    max_builds: int = 12,
    budget_overrides: Mapping[str, float] | None = None,
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
    candidates = [c for c in candidate_layers(paths.ONNX, ranked, first.get("layer")) if c not in base_scope]
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
        result: dict[str, Any] = {"budget": budget, "candidates": candidates, "before": before, "probes": probes}
        if before["passed"]:
            result.update(status="within budget already", float_layers=[], after=before)
        elif not candidates:
            result.update(status="no candidate layers (the runtime ranks none, and the first divergence is not a compute layer)")
        elif not probe(tuple(candidates)):
            result.update(
                status=f"over budget even with all {len(candidates)} candidate (compute) layers in float: what stays quantized "
                "(the input, residual adds, pooling) or the calibration loses it; try calibration.method percentile, "
                "or name those nodes in calibration.ignored_scope"
            )
        else:
            # Builds kept for after the search: the fp32 engine the repaired one must beat (its speed is the point), and
            # the runtime's own accuracy control where it offers one.
            reserve = 1 + offers_accuracy_control(target)
            low, high = 0, len(candidates)  # low fails, high passes
            while high - low > 1 and len(sessions) < max_builds - reserve:
                mid = (low + high) // 2
                if probe(tuple(candidates[:mid])):
                    high = mid
                else:
                    low = mid
            chosen = list(candidates[:high])
            for layer in list(chosen):  # fewest layers: drop any the budget does not need
                if len(chosen) == 1 or len(sessions) >= max_builds - reserve:
                    break
                if probe(tuple(c for c in chosen if c != layer)):
                    chosen.remove(layer)
            after = judged.get(tuple(chosen)) or judge(tuple(chosen))
            result.update(status="repaired", float_layers=chosen, after=after, ignored_scope=[*base_scope, *chosen])
            result["override"] = override_line(target.name, [*base_scope, *chosen])
            fp32 = fp32_engine(target, spec, work / "fp32", sessions, max_builds)
            feeds = make_inputs(spec.inputs, target.main_batch, 0)
            result["speed"] = speed_cost(engine_for, chosen, feeds, built=set(sessions), fp32=fp32)
            if fp32 is not None and result["speed"]["repaired_ms_per_image"] >= result["speed"]["fp32_ms_per_image"]:
                speed = result["speed"]
                result["status"] = (
                    f"not repaired: the engine within budget ({len(chosen)} layer(s) in float) runs at "
                    f"{speed['repaired_ms_per_image']:.4g} ms/image, no faster than fp32's {speed['fp32_ms_per_image']:.4g}: "
                    "int8 buys nothing; ship the fp32 engine, or give the repair more builds (--max-builds) to find fewer layers"
                )
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


def offers_accuracy_control(target: Any) -> bool:
    """Whether the target's runtime has its own accuracy-aware quantization (a calibration option `accuracy_aware`)."""
    from dataclasses import fields

    from kiln.runtimes import get_runtime

    options_type = getattr(get_runtime(target.runtime), "calibration_options_type", None)
    return options_type is not None and "accuracy_aware" in {f.name for f in fields(options_type)}


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


def fp32_engine(target: Any, spec: Any, folder: Path, sessions: dict, max_builds: int) -> Any:
    """The same runtime's fp32 engine of the model (one build, counted), for the speed the repaired engine must beat."""
    from kiln.core import paths
    from kiln.pipeline.engine import build_engine, load_engine
    from kiln.runtimes import BuildSource

    if len(sessions) >= max_builds:
        return None
    t = replace(target, precision="fp32", tune=False, calibration={})
    log.info("repair: build %d of at most %d: the fp32 engine, for the speed to beat", len(sessions) + 1, max_builds)
    build_engine(t, BuildSource(paths.ONNX, spec, None), folder)
    sessions[("fp32",)], _ = load_engine(folder, t)
    return sessions[("fp32",)]


def speed_cost(
    engine_for: Callable[[tuple[str, ...]], Any],
    chosen: list[str],
    feeds: Mapping[str, np.ndarray],
    built: set[tuple[str, ...]] | None = None,
    fp32: Any = None,
) -> dict[str, Any]:
    """ms/image of int8, the repaired engine and fp32 (where built), side by side in interleaved rounds, and the price
    of each layer in float where the engine with the layers before it was built by the search (`built`; no build is
    made for the prices: every build counts against --max-builds)."""
    prefixes = [tuple(chosen[:i]) for i in range(len(chosen) + 1)]
    timed = [p for p in prefixes if built is None or p in built or p in ((), tuple(chosen))]
    sessions = [engine_for(p) for p in timed] + ([fp32] if fp32 is not None else [])
    ms = interleaved_ms_per_image(sessions, feeds)
    by_prefix = dict(zip(timed, ms))
    return {
        "batch": int(next(iter(feeds.values())).shape[0]),
        "int8_ms_per_image": round(by_prefix[()], 4),
        "repaired_ms_per_image": round(by_prefix[tuple(chosen)], 4),
        "fp32_ms_per_image": round(ms[-1], 4) if fp32 is not None else None,
        "layers": [
            {"layer": chosen[i], "added_ms_per_image": round(by_prefix[prefixes[i + 1]] - by_prefix[prefixes[i]], 4)}
            for i in range(len(chosen))
            if prefixes[i] in by_prefix and prefixes[i + 1] in by_prefix
        ],
    }


def repair_lines(name: str, result: Mapping[str, Any]) -> list[str]:
    def agreement(row: Mapping[str, Any]) -> str:
        return f"{row['agreement']:.4g}" if isinstance(row.get("agreement"), (int, float)) else "n/a"

    lines = [f"repair of {name}: {result['status']} ({result.get('builds', 0)} builds, {result.get('seconds', 0)} s)"]
    lines.append(f"  before: agreement {agreement(result['before'])}; " + ("; ".join(result["before"]["violations"]) or "within budget"))
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
    if result.get("status") == "repaired":
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
