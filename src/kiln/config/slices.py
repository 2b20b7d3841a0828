"""What each stage reads from params: one declaration, the slices configure writes, the view stages read.

The cache's contract is that a change of params re-runs exactly the stages that read it. So the keys a
stage reads are declared once, here (READS, PER_TARGET_READS), and everything else follows from that:
- the configure stage (which depends on all of params.yaml) writes each stage's slice to
  artifacts/params/<stage>.json, or artifacts/targets/<target>/<stage>.json for the per-target stages;
- dvc.yaml makes each stage depend on its slice file, so a stage re-runs exactly when its slice changes;
- the stage reads its params through `load_stage_params`, a view of the slice that raises on a key the
  stage did not declare: a new settings block cannot be read without being declared, so it cannot go
  unnoticed by the cache;
- `kiln params` tells which stages a change will re-run (`rerun_plan`), from the same slices.

Stdlib only: kiln.config.resolvers imports this in DVC's own process (the Hydra resolvers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from kiln.core.paths import STAGE_PARAMS, TARGET_PARAMS

# Stage (as dvc.yaml names it) -> the params keys it reads ("a.b": only that key of block a).
READS: dict[str, tuple[str, ...]] = {
    "data": ("data.calibration_dir", "data.eval_dir"),
    "export": ("model", "export", "data.preprocess"),
    "validate": ("model", "export", "validate", "data.eval_dir", "data.eval_limit", "data.preprocess"),
    "report": ("targets", "report", "study"),
}
# Per-target stages read their own target (targets.<name>) and these.
PER_TARGET_READS: dict[str, tuple[str, ...]] = {
    "calibrate": ("model", "export", "calibration", "data.calibration_dir", "data.eval_dir", "data.preprocess"),
    "build": ("model", "export", "data.preprocess", "tuning"),
    "benchmark": ("model", "export", "data.preprocess", "benchmark", "serving"),
}
GLOBAL_DIR = STAGE_PARAMS
TARGET_DIR = TARGET_PARAMS


class UndeclaredParamError(LookupError):
    """A stage read a params key its declaration leaves out: a bug in kiln, not in the user's params."""


def _slice(params: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        top, _, sub = key.partition(".")
        value = params.get(top)
        if sub:
            out.setdefault(top, {})[sub] = (value or {}).get(sub)
        else:
            out[top] = value
    return out


def global_slice(params: Mapping[str, Any], stage: str) -> dict[str, Any]:
    return _slice(params, READS[stage])


def target_slices(params: Mapping[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """The params each per-target stage of target `name` reads, as a params-shaped dict per stage."""
    target = params["targets"][name]
    out = {}
    for stage, keys in PER_TARGET_READS.items():
        # A target that is not tuned must not re-build when the tuning settings change.
        wanted = [k for k in keys if not (k == "tuning" and not (target or {}).get("tune"))]
        out[stage] = {"targets": {name: target}, **_slice(params, wanted)}
    return out


def slice_text(sliced: Mapping[str, Any]) -> str:
    return json.dumps(sliced, indent=1, sort_keys=True) + "\n"


def all_slices(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every slice configure writes, keyed by its file under artifacts/ ('params/export.json',
    'targets/<name>/build.json'): what `rerun_plan` compares."""
    from kiln.config.batch_limit import clamp_batches

    params = clamp_batches(params)[0]  # as configure writes them
    out = {f"params/{stage}.json": global_slice(params, stage) for stage in READS}
    for name in params.get("targets") or {}:
        for stage, sliced in target_slices(params, str(name)).items():
            out[f"targets/{name}/{stage}.json"] = sliced
    return out


def stage_of(slice_file: str) -> str:
    """'params/export.json' -> 'export'; 'targets/a/build.json' -> 'build@a'."""
    parts = slice_file.removesuffix(".json").split("/")
    return parts[1] if parts[0] == "params" else f"{parts[2]}@{parts[1]}"


def rerun_plan(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The stages whose own params slice differs between two params: those a `dvc repro` re-runs for
    the change (and, through their outputs, what depends on them), configure aside. Only calibrated
    targets have a calibrate stage."""
    from kiln.runtimes import is_calibrated

    def stages(params: Mapping[str, Any]) -> dict[str, Any]:
        targets = params.get("targets") or {}
        return {
            f: s
            for f, s in all_slices(params).items()
            if not f.endswith("/calibrate.json")
            or is_calibrated(
                str((targets.get(f.split("/")[1]) or {}).get("runtime")), (targets.get(f.split("/")[1]) or {}).get("precision")
            )
        }

    old, new = stages(before), stages(after)
    return [stage_of(f) for f in sorted(set(old) | set(new), key=_order) if old.get(f) != new.get(f)]


def describe_stages(stages: list[str], targets: int) -> str:
    """'export, build@a, benchmark@* (all 12 targets)': per-target stages grouped, all of them said once."""
    out: list[str] = []
    groups: dict[str, list[str]] = {}
    for stage in stages:
        name, _, target = stage.partition("@")
        if target:
            if name not in groups:
                groups[name] = []
                out.append(name)
            groups[name].append(target)
        else:
            out.append(stage)
    return ", ".join(
        s if s not in groups else f"{s}@* (all {targets} targets)" if len(groups[s]) == targets > 1 else f"{s}@{{{', '.join(groups[s])}}}"
        for s in out
    )


_DAG_ORDER = ("data", "export", "validate", "calibrate", "build", "benchmark", "report")


def _order(slice_file: str) -> tuple[int, str]:
    return _DAG_ORDER.index(stage_of(slice_file).split("@")[0]), slice_file


class StageParams(dict):  # type: ignore[type-arg]
    """A stage's params: its slice, where reading a key outside the stage's declaration raises.

    Guarded where the declaration names part of a block: at the top level (blocks not declared),
    in a block of which only some keys are declared (`data.preprocess`), and in `targets` (other
    targets). A block declared whole reads like any dict."""

    def __init__(self, data: Mapping[str, Any] = {}, declared: Mapping[str, Any] | None = None, where: str = "") -> None:  # noqa: B006
        super().__init__()
        self._declared = declared or {}  # key -> True (whole) or a nested declaration
        self._where = where
        for key, value in data.items():
            sub = self._declared.get(key)
            self[key] = StageParams(value, sub, f"{where}.{key}") if isinstance(sub, dict) and isinstance(value, Mapping) else value

    def _check(self, key: Any) -> None:
        if key not in self._declared:
            path = f"{self._where.partition(':')[2]}.{key}".lstrip(".")
            raise UndeclaredParamError(
                f"{self._where.partition(':')[0]} reads params key '{path}', which kiln.config.slices does not declare for it: "
                "declare it there (the cache re-runs a stage only for the keys it declares)"
            )

    def __getitem__(self, key: Any) -> Any:
        self._check(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)


def _declaration(keys: Iterable[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key in keys:
        top, _, sub = key.partition(".")
        if sub:
            node = tree.setdefault(top, {})
            if isinstance(node, dict):
                node[sub] = True
        else:
            tree[top] = True
    return tree


def load_stage_params(stage: str, target: str | None = None, root: Path = Path(".")) -> StageParams:
    """The slice of params `stage` reads (for a per-target stage, `target`'s), written by configure."""
    from kiln.config.views import check_target_name
    from kiln.core.errors import KilnError

    if target is None:
        path, keys = root / GLOBAL_DIR / f"{stage}.json", READS[stage]
        declared = _declaration(keys)
    else:
        path, keys = root / TARGET_DIR / check_target_name(target) / f"{stage}.json", PER_TARGET_READS[stage]
        declared = {**_declaration(keys), "targets": {target: True}}
    if not path.is_file():
        raise KilnError(
            f"{path} not found: "
            + (f"no target '{target}' in params.yaml, or " if target else "")
            + "the configure stage has not run (`dvc repro configure`)"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return StageParams(data, declared, f"stage {stage}{'@' + target if target else ''}:")
