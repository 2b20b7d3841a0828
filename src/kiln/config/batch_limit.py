"""Models that take at most a few images per call (torchvision's R-CNNs: batch 1): every batch size params name is
clamped to the model's limit before anything is built, with a note, instead of failing at export or build.

The limit is a model-level fact: `model.max_batch` where the user declares it, else implied by a model kiln knows
cannot batch (a torchvision Faster/Mask/Keypoint R-CNN by name: its RoI stage runs per image, and torchvision's
own export with a dynamic batch breaks at other batch sizes: detectron2 and torchvision's issues export it at
batch 1). An entrypoint kiln cannot see into is found at export, which then says to declare it.

Applied where params become what stages read (configure's slices, `kiln params`' re-run plan, and
kiln.pipeline.quickrun), so every stage sees the same clamped sizes. Stdlib only: the slices are read in DVC's
own process.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from kiln.core.errors import KilnError

# torchvision builder names of two-stage detectors: batch 1 is the route that exports and runs everywhere.
SINGLE_IMAGE_BUILDERS = ("fasterrcnn_", "maskrcnn_", "keypointrcnn_")


def model_max_batch(model: Mapping[str, Any] | None) -> tuple[int | None, str | None]:
    """(the model's largest batch or None for any, why)."""
    model = model or {}
    declared = model.get("max_batch")
    if declared is not None:
        if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
            raise KilnError(f"model.max_batch must be a positive integer (the largest batch the model takes) or null, got {declared!r}")
        return declared, f"model.max_batch is {declared}"
    name = str(model.get("name") or "")
    if name.startswith(SINGLE_IMAGE_BUILDERS):
        return 1, f"{name} is a two-stage detector, exported at batch 1 (set model.max_batch to say otherwise)"
    return None, None


def _merge(dist: Mapping[Any, float], limit: int) -> dict[Any, float]:
    out: dict[Any, float] = {}
    for size, share in dist.items():
        key = type(size)(min(int(size), limit))  # params may key sizes by int or by str
        out[key] = out.get(key, 0.0) + share
    return out


def _sizes(sizes: list[int], limit: int) -> list[int]:
    kept = sorted({min(int(b), limit) for b in sizes})
    return kept or [limit]


def clamp_batches(params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`params` with every batch size at most the model's limit, and one note per kind of key changed; unchanged
    (a deep copy) when the model has no limit."""
    limit, why = model_max_batch(params.get("model"))
    out = copy.deepcopy(dict(params))
    if limit is None:
        return out, []
    changed: list[str] = []

    def clamp(block: str, key: str) -> None:
        values = out.get(block) or {}
        value = values.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            values[key] = limit
            changed.append(f"{block}.{key} {value} -> {limit}")

    for block, key in (("export", "batch"), ("calibration", "batch"), ("tuning", "batch"), ("serving", "max_batch")):
        clamp(block, key)
    for block in ("validate", "benchmark"):
        sizes = (out.get(block) or {}).get("batch_sizes")
        if sizes and max(sizes) > limit:
            out[block]["batch_sizes"] = _sizes(sizes, limit)
            changed.append(f"{block}.batch_sizes {list(sizes)} -> {out[block]['batch_sizes']}")
    serve = (out.get("benchmark") or {}).get("serve")
    if serve and max(int(b) for b in serve) > limit:
        out["benchmark"]["serve"] = _merge(serve, limit)
        changed.append(f"benchmark.serve: requests over {limit} images served as {limit}")
    profiles = []
    for name, target in (out.get("targets") or {}).items():
        target = target or {}
        profile = target.get("profile") or {}
        if any(isinstance(v, int) and v > limit for v in profile.values()):
            target["profile"] = {k: min(v, limit) if isinstance(v, int) else v for k, v in profile.items()}
            profiles.append(name)
        if target.get("serve") and max(int(b) for b in target["serve"]) > limit:
            target["serve"] = _merge(target["serve"], limit)
            profiles.append(f"{name}.serve")
    if profiles:
        changed.append(f"the shape profiles (and served sizes) of targets {', '.join(sorted(set(profiles)))} -> at most {limit}")
    notes = [f"batch sizes clamped to {limit} ({why}): " + "; ".join(changed)] if changed else []
    return out, notes
