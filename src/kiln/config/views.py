"""Typed views of params.yaml: the model, its inputs, targets and their shape profiles.

params.yaml is the composition of conf/ (see kiln.config.params); stages read it through
these classes so a bad value fails early with the key that holds it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from kiln.core.errors import KilnError, close_matches
from kiln.runtimes import DEFAULT_PRECISION, RUNTIMES  # the registry table: imports nothing but core

PARAMS_FILE = "params.yaml"
DTYPES = ("float32", "float16", "bfloat16", "uint8", "int8", "int32", "int64")
# A target's name becomes a DVC stage name, file and folder names, and an argument in a shell command
# (dvc.yaml's `${key}`): nothing a shell or a path could read as more than a word.
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_target_name(name: Any) -> str:
    if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
        raise KilnError(
            f"target name {name!r} is not allowed: a name becomes a stage name, file names and a command-line argument, "
            f"so it must be letters, digits, '.', '_' and '-', starting with a letter or digit ({TARGET_NAME.pattern}); "
            "rename the target under `targets:` (conf/targets/*.yaml or your overrides)"
        )
    return name


def check_target_names(params: Mapping[str, Any]) -> None:
    targets = params.get("targets") or {}
    if not isinstance(targets, Mapping):
        raise KilnError(f"targets must map target names to their settings, got {type(targets).__name__}")
    for name in targets:
        check_target_name(name)


def load_params(path: str | os.PathLike[str] = PARAMS_FILE) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise KilnError(f"{p} not found: run `kiln params` to compose it from conf/")
    with p.open(encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise KilnError(f"{p} must hold a mapping at the top level")
    return data


def default_threads() -> int:
    """All the cores this process may run on (not the machine's total, which containers lie about)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _require(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping or mapping[key] is None:
        raise KilnError(f"{where}.{key} is required")
    return mapping[key]


@dataclass(frozen=True)
class InputSpec:
    """One model input. `shape` is per sample: the batch axis (axis 0) is added and kept dynamic."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    # [low, high] of seeded inputs (inclusive for integers): the values this input really takes, e.g. token
    # ids [0, 30521] or a mask [0, 1]. Without it: standard normal floats, integers 0..999 (uint8 0..255).
    range: tuple[float, float] | None = None

    def batched(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.shape)

    @classmethod
    def from_params(cls, name: str, raw: Mapping[str, Any]) -> "InputSpec":
        where = f"model.inputs.{name}"
        shape = _require(raw, "shape", where)
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d > 0 for d in shape):
            raise KilnError(f"{where}.shape must be a list of positive integers (per sample, without the batch axis), got {shape!r}")
        dtype = str(raw.get("dtype", "float32"))
        if dtype not in DTYPES:
            raise KilnError(f"{where}.dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        unknown = set(raw) - {"shape", "dtype", "range"}
        if unknown:
            raise KilnError(f"{where} has unknown keys {sorted(unknown)}; known: shape, dtype, range")
        bounds = raw.get("range")
        if bounds is not None and (
            not isinstance(bounds, (list, tuple))
            or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            or bounds[0] > bounds[1]
        ):
            raise KilnError(f"{where}.range must be [low, high] with low <= high, got {bounds!r}")
        return cls(name=name, shape=tuple(shape), dtype=dtype, range=(bounds[0], bounds[1]) if bounds is not None else None)


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from: a torchvision/timm name or a `module:function` entrypoint, plus a checkpoint;
    or an ONNX file (`onnx`) that export takes as it is, alone or beside the PyTorch model it was exported from."""

    name: str | None
    entrypoint: str | None
    checkpoint: str | None
    weights: str | None
    kwargs: dict[str, Any]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...] | None
    seed: int = 0
    # data.preprocess folded into the model: inputs are then uint8 HWC images (see engine_spec).
    fold: dict[str, Any] | None = None
    task: str = "auto"  # kiln.accuracy.tasks: how outputs are judged; auto infers it from the outputs
    detection: dict[str, Any] | None = None  # kiln.export.detection.DetectionSettings, for torchvision detectors
    # kiln.data.demo_weights: make a random-init network's reference meaningful (set by engine_spec from
    # model.demo_weights, with the preprocessing its images need)
    demo: dict[str, Any] | None = None
    # model.trained: whether the weights are trained (None: auto, see `trained_weights`).
    trained: bool | None = None
    # model.onnx: a graph to start from instead of exporting one (with name/entrypoint: validated against it).
    onnx: str | None = None
    # The largest batch the model takes (model.max_batch, or implied: kiln.config.batch_limit); None: any.
    max_batch: int | None = None

    @classmethod
    def from_params(cls, raw: Mapping[str, Any]) -> "ModelSpec":
        from kiln.config.batch_limit import model_max_batch

        name, entrypoint, onnx = raw.get("name"), raw.get("entrypoint"), raw.get("onnx")
        if name and entrypoint or not (name or entrypoint or onnx):
            raise KilnError(
                "set exactly one of model.name (a torchvision or timm model) and model.entrypoint ('module:function'), "
                "or model.onnx (an ONNX file to start from; with one of the two, the PyTorch model validates it)"
            )
        if onnx is not None and (not isinstance(onnx, str) or not onnx.endswith(".onnx")):
            raise KilnError(f"model.onnx must be the path of an .onnx file, got {onnx!r}")
        trained = raw.get("trained", "auto")
        if trained not in (True, False, "auto", None):
            raise KilnError(f"model.trained must be true, false or auto, got {trained!r}")
        inputs_raw = raw.get("inputs") or {}
        if not isinstance(inputs_raw, Mapping) or not inputs_raw:
            raise KilnError("model.inputs must map each input name to {shape: [...], dtype: ...}")
        outputs = raw.get("outputs")
        return cls(
            name=name,
            entrypoint=entrypoint,
            checkpoint=raw.get("checkpoint"),
            weights=raw.get("weights"),
            kwargs=dict(raw.get("kwargs") or {}),
            inputs=tuple(InputSpec.from_params(str(k), v or {}) for k, v in inputs_raw.items()),
            outputs=tuple(outputs) if outputs else None,
            seed=int(raw.get("seed", 0)),
            fold=dict(raw["fold"]) if raw.get("fold") else None,
            task=str(raw.get("task") or "auto"),
            detection=dict(raw["detection"]) if raw.get("detection") else None,
            demo=dict(raw["demo"]) if raw.get("demo") else None,
            trained=trained if isinstance(trained, bool) else None,
            onnx=onnx,
            max_batch=model_max_batch(raw)[0],
        )

    def to_params(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "entrypoint": self.entrypoint,
            "checkpoint": self.checkpoint,
            "weights": self.weights,
            "kwargs": self.kwargs,
            "inputs": {
                i.name: {"shape": list(i.shape), "dtype": i.dtype, **({"range": list(i.range)} if i.range else {})} for i in self.inputs
            },
            "outputs": list(self.outputs) if self.outputs else None,
            "seed": self.seed,
            "fold": self.fold,
            "task": self.task,
            "detection": self.detection,
            "demo": self.demo,
            "trained": "auto" if self.trained is None else self.trained,
            "onnx": self.onnx,
            "max_batch": self.max_batch,
        }

    def trained_weights(self) -> tuple[bool, str]:
        """(whether the weights are trained, the rule that says so). Kiln cannot see whether an entrypoint's or
        a checkpoint's weights were trained, so it assumes they are unless told otherwise: only a model built
        by name with neither checkpoint nor weights is known to be random. This decides whether the accuracy
        budget is enforced and whether model.demo_weights applies."""
        if self.trained is not None:
            return self.trained, f"model.trained is {str(self.trained).lower()}"
        if self.checkpoint:
            return True, "trained: model.checkpoint is set"
        if self.weights:
            return True, "trained: model.weights is set"
        if self.name and self.name.endswith(".pt"):
            return True, "trained: model.name is a checkpoint file (Ultralytics .pt)"
        if self.entrypoint:
            return True, "taken as trained: model.entrypoint builds the model (set model.trained: false if its weights are random)"
        if self.onnx_only:
            return True, "taken as trained: model.onnx holds the weights (set model.trained: false if they are random)"
        return False, "random weights: model.name with neither model.checkpoint nor model.weights"

    @property
    def onnx_only(self) -> bool:
        """The model is an ONNX file alone: no PyTorch model to export, validate against or build from."""
        return bool(self.onnx) and not (self.name or self.entrypoint)

    @property
    def label(self) -> str:
        return self.name or self.entrypoint or self.onnx or "?"


@dataclass(frozen=True)
class ShapeProfile:
    """The batch sizes an engine must accept (min, max) and the one it is tuned for (opt)."""

    min: int = 1
    opt: int = 8
    max: int = 32

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None, where: str) -> "ShapeProfile":
        raw = raw or {}
        unknown = set(raw) - {"min", "opt", "max"}
        if unknown:
            raise KilnError(f"{where}.profile has unknown keys {sorted(unknown)}: use min, opt and max batch sizes")
        values = {k: raw.get(k, getattr(cls, k)) for k in ("min", "opt", "max")}
        for k, v in values.items():
            if not isinstance(v, int) or v < 1:
                raise KilnError(f"{where}.profile.{k} must be a positive integer batch size, got {v!r}")
        if not values["min"] <= values["opt"] <= values["max"]:
            raise KilnError(
                f"{where}.profile must satisfy min <= opt <= max, got min={values['min']} opt={values['opt']} max={values['max']}"
            )
        return cls(**values)

    def contains(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def to_params(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class Target:
    """One engine to build: a runtime, a precision, a device, a shape profile and runtime options."""

    name: str
    runtime: str
    precision: str = DEFAULT_PRECISION
    device: str = "cpu"
    threads: int | None = None
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    options: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # per-target overrides of params `calibration`
    accuracy_budget: dict[str, Any] = field(default_factory=dict)  # per-target overrides of benchmark.accuracy_budget
    required: bool = True  # false: skipped (and reported) on machines that cannot run it, instead of failing
    serve: dict[int, float] | None = None  # batch size -> share of requests, for serve-shaped benchmarks
    tune: bool = False  # search the runtime's knobs on this machine at build time (kiln.measure.tuning)

    @property
    def main_batch(self) -> int:
        """The batch size the headline figures are quoted at: the one the engine is tuned for."""
        return self.profile.opt

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> "Target":
        check_target_name(name)
        targets = params.get("targets") or {}
        if name not in targets:
            raise KilnError(f"no target '{name}' in params.yaml{close_matches(name, targets)}; targets: {', '.join(targets) or 'none'}")
        raw = targets[name] or {}
        where = f"targets.{name}"
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = set(raw) - known
        if unknown:
            hint = "".join(close_matches(k, known) for k in sorted(unknown))
            raise KilnError(f"{where} has unknown keys {sorted(unknown)}{hint}; known keys: {', '.join(sorted(known))}")
        runtime = str(_require(raw, "runtime", where))
        if runtime not in RUNTIMES:
            raise KilnError(
                f"{where}.runtime '{runtime}' is not a kiln runtime{close_matches(runtime, RUNTIMES)}; runtimes: {', '.join(RUNTIMES)}"
            )
        threads = raw.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise KilnError(f"{where}.threads must be a positive integer or null (all cores), got {threads!r}")
        profile = ShapeProfile.from_params(raw.get("profile"), where)
        tune = raw.get("tune", False)
        if not isinstance(tune, bool):
            raise KilnError(f"{where}.tune must be true or false, got {tune!r}")
        # The default served mix is benchmark.serve, for the stages that read the benchmark settings (a stage's
        # params hold only what it declares: kiln.config.slices; calibrate and build serve nothing).
        serve_raw = raw["serve"] if "serve" in raw else (params["benchmark"] or {}).get("serve") if "benchmark" in params else None
        serve_where = f"{where}.serve" if "serve" in raw else "benchmark.serve"
        return cls(
            name=name,
            runtime=runtime,
            precision=str(raw.get("precision", DEFAULT_PRECISION)),
            device=str(raw.get("device", "cpu")),
            threads=threads,
            profile=profile,
            options=dict(raw.get("options") or {}),
            calibration=dict(raw.get("calibration") or {}),
            accuracy_budget=dict(raw.get("accuracy_budget") or {}),
            required=bool(raw.get("required", True)),
            serve=served_distribution(serve_raw, profile, serve_where),
            tune=tune,
        )

    @property
    def effective_threads(self) -> int:
        # Capped at the cores this process may use (configure warns): more threads only wait for each other.
        cores = default_threads()
        return min(self.threads, cores) if self.threads else cores

    def to_params(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "device": self.device,
            "threads": self.threads,
            "profile": self.profile.to_params(),
            "options": self.options,
            "calibration": self.calibration,
            "accuracy_budget": self.accuracy_budget,
            "required": self.required,
            "serve": dict(self.serve) if self.serve else None,
            "tune": self.tune,
        }


def served_distribution(raw: Any, profile: ShapeProfile, where: str) -> dict[int, float] | None:
    """The batch sizes a target will serve and each one's share of requests, e.g. {1: 0.7, 4: 0.2, 8: 0.1}."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, Mapping):
        raise KilnError(f"{where} must map batch sizes to their share of requests, e.g. {{1: 0.7, 4: 0.2, 8: 0.1}}; got {raw!r}")
    dist: dict[int, float] = {}
    for key, share in raw.items():
        try:
            batch = int(key)  # keys arrive as strings from `dvc exp run -S` overrides
        except (TypeError, ValueError):
            batch = 0
        if batch < 1 or str(key).strip() != str(batch):
            raise KilnError(f"{where}: '{key}' is not a batch size (a positive integer)")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or share < 0:
            raise KilnError(f"{where}.{key}: the share of requests must be a number >= 0, got {share!r}")
        if not profile.contains(batch):
            raise KilnError(
                f"{where}: batch {batch} is outside the target's profile [{profile.min}, {profile.max}]: "
                "the engine could not serve it; widen the profile or change the distribution"
            )
        dist[batch] = float(share)
    total = sum(dist.values())
    if abs(total - 1.0) > 1e-6:
        raise KilnError(f"{where}: the shares of requests sum to {total:g}, not 1 ({dict(sorted(dist.items()))})")
    return dict(sorted(dist.items()))
