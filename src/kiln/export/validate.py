"""The validation gate: does the exported graph compute what the eager model computes?

Fresh seeded inputs, at batch sizes other than the traced one, go through eager PyTorch
and ONNX Runtime fp32; every output is compared within atol + rtol*|ref|.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from kiln.accuracy.numerics import OutputComparison
from kiln.config.views import ModelSpec
from kiln.core.errors import ValidationFailed, first_line
from kiln.data.inputs import make_inputs
from kiln.export.models import FoldedPreprocess, flatten_outputs
from kiln.export.settings import ValidateSettings

log = logging.getLogger(__name__)


class OnnxReference:
    """The reference for a model given only as an ONNX file (model.onnx alone): the graph itself through ONNX Runtime
    fp32 on the CPU, where a PyTorch model would run eagerly. Every engine is then judged against ONNX Runtime."""

    def __init__(self, onnx_path: str | Path) -> None:
        self.session = _ort_session(Path(onnx_path))
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self.names, self.session.run(self.names, dict(feeds)))}


def _eager(model: nn.Module | OnnxReference, feeds: dict[str, np.ndarray], spec: ModelSpec, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(model, OnnxReference):
        return {n: v for n, v in model(feeds).items() if n in names}
    if spec.fold and isinstance(model, FoldedPreprocess):
        # The reference for a graph with folded preprocessing is kiln's own (numpy) preprocessing
        # followed by the plain model: an independent implementation of what the graph must compute.
        from kiln.data.images import Preprocess

        normalize = Preprocess.from_params(spec.fold).normalize
        with torch.inference_mode():
            out = model.model(*(torch.from_numpy(normalize(feeds[i.name])) for i in spec.inputs))
        return {k: v.detach().float().numpy() for k, v in flatten_outputs(out, tuple(names)).items()}
    with torch.inference_mode():
        out = model(*(torch.from_numpy(feeds[i.name]) for i in spec.inputs))
    return {k: v.detach().float().numpy() for k, v in flatten_outputs(out, tuple(names)).items()}


def _ort_session(onnx_path: Path) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ValidationFailed(f"ONNX Runtime cannot load the exported graph {onnx_path}: {str(e).splitlines()[0]}") from e


def validate_export(
    model: nn.Module, onnx_path: str | Path, spec: ModelSpec, settings: ValidateSettings, traced_batch: int
) -> dict[str, Any]:
    """Compare eager PyTorch with the ONNX graph; return the report or raise ValidationFailed with one clear line."""
    from kiln.accuracy.tasks import output_infos, resolve_task

    model.eval()
    session = _ort_session(Path(onnx_path))
    names = [o.name for o in session.get_outputs()]
    per_batch: list[dict[str, Any]] = []
    worst: dict[str, OutputComparison] = {}
    degenerate: str | None = None
    task = None
    # The traced batch proves nothing about a dynamic batch axis; a model that takes one image at a time has no other.
    checked = [b for b in settings.batch_sizes if b != traced_batch or spec.max_batch == 1]
    for batch in checked:
        feeds = make_inputs(spec.inputs, batch, settings.seed + batch)
        ref = _eager(model, feeds, spec, names)
        if task is None:
            task, task_line = resolve_task(spec.task, output_infos(ref))
            log.info("%s", task_line)
        try:
            got = dict(zip(names, session.run(names, feeds)))
        except Exception as e:
            first = first_line(e)
            raise ValidationFailed(
                f"the exported graph fails at batch {batch} (traced at {traced_batch}): {first[:300]}; "
                "the export froze a batch-dependent shape"
            ) from e
        for name in names:
            if got[name].shape != ref[name].shape:
                raise ValidationFailed(
                    f"output '{name}' at batch {batch}: the graph returns shape {list(got[name].shape)}, PyTorch {list(ref[name].shape)} "
                    f"(traced at batch {traced_batch}): the export froze a batch-dependent shape"
                )
        for c in task.validate(ref, {k: np.asarray(v, dtype=np.float32) for k, v in got.items()}, settings.atol, settings.rtol):
            per_batch.append({"batch": batch, **c.to_dict()})
            log.info(
                "batch %d output %s: max abs %.3g, max rel %.3g, mean abs %.3g%s",
                batch,
                c.name,
                c.max_abs_err,
                c.max_rel_err,
                c.mean_abs_err,
                f", top-1 agreement {c.top1_agreement:.3f}" if c.top1_agreement is not None else "",
            )
            if c.name not in worst or c.excess > worst[c.name].excess:
                worst[c.name] = c
            if not c.passed:
                raise ValidationFailed(c.failure_line(f"at batch {batch}"))
        degenerate = degenerate or task.gate_degenerate(ref)
    assert task is not None
    if degenerate and not settings.allow_degenerate_reference:
        raise ValidationFailed(
            f"the reference proves nothing: {degenerate}, so any graph would pass. Check the model "
            "(zero-initialised head? wrong checkpoint?), turn on model.demo_weights for a random-init demo "
            "(docs/models.md: 'References that prove something'), or set validate.allow_degenerate_reference: true to accept it"
        )
    outputs = {}
    for name, c in worst.items():
        top1 = [r["top1_agreement"] for r in per_batch if r["name"] == name and r["top1_agreement"] is not None]
        outputs[name] = {
            "max_abs_err": max(r["max_abs_err"] for r in per_batch if r["name"] == name),
            "max_rel_err": max(r["max_rel_err"] for r in per_batch if r["name"] == name),
            "mean_abs_err": max(r["mean_abs_err"] for r in per_batch if r["name"] == name),
            "top1_agreement": min(top1) if top1 else None,
        }
    return {
        "passed": True,
        "task": task.name,
        "atol": settings.atol,
        "rtol": settings.rtol,
        "traced_batch": traced_batch,
        "batch_sizes": checked,
        "outputs": outputs,
        "output_names": names,
        "degenerate": degenerate,
        "per_batch": per_batch,
    }


def validate_onnx(onnx_path: str | Path, spec: ModelSpec, settings: ValidateSettings) -> dict[str, Any]:
    """The gate for a model given only as an ONNX file: there is no eager model to compare with, so the graph is
    checked against itself: each batch of seeded inputs at validate.batch_sizes must give, for every sample, what
    that sample gives alone (a batch axis that is really dynamic, and samples that do not leak into each other)."""
    from kiln.accuracy.tasks import output_infos, resolve_task

    reference = OnnxReference(onnx_path)
    names = reference.names
    per_batch: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, Any]] = {}
    task, degenerate = None, None
    for batch in settings.batch_sizes:
        feeds = make_inputs(spec.inputs, batch, settings.seed + batch)
        alone = [reference({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(batch)]
        ref = {n: np.concatenate([a[n] for a in alone]) for n in names}
        if task is None:
            task, task_line = resolve_task(spec.task, output_infos(ref))
            log.info("%s", task_line)
        try:
            got = reference(feeds)
        except Exception as e:
            raise ValidationFailed(f"model.onnx fails at batch {batch}: {first_line(e)[:300]}; its batch axis is not really dynamic") from e
        for name in names:
            if got[name].shape != ref[name].shape:
                raise ValidationFailed(
                    f"output '{name}' at batch {batch}: shape {list(got[name].shape)}, but its samples one by one give "
                    f"{list(ref[name].shape)}: model.onnx's batch axis is not really dynamic"
                )
        for c in task.validate(ref, got, settings.atol, settings.rtol):
            per_batch.append({"batch": batch, **c.to_dict()})
            if not c.passed:
                raise ValidationFailed(c.failure_line(f"at batch {batch} against its samples one at a time"))
            worst = outputs.setdefault(c.name, {"max_abs_err": 0.0, "max_rel_err": 0.0, "mean_abs_err": 0.0, "top1_agreement": None})
            for key in ("max_abs_err", "max_rel_err", "mean_abs_err"):
                worst[key] = max(worst[key], getattr(c, key))
        degenerate = degenerate or task.gate_degenerate(ref)
    assert task is not None
    if degenerate and not settings.allow_degenerate_reference:
        raise ValidationFailed(
            f"the reference proves nothing: {degenerate} (model.onnx's own outputs), so any engine would pass; set "
            "validate.allow_degenerate_reference: true to accept it"
        )
    return {
        "passed": True,
        "task": task.name,
        "atol": settings.atol,
        "rtol": settings.rtol,
        "traced_batch": None,
        "batch_sizes": list(settings.batch_sizes),
        "outputs": outputs,
        "output_names": names,
        "degenerate": degenerate,
        "per_batch": per_batch,
        "reference_model": "ONNX Runtime fp32 on the CPU (model.onnx alone: no PyTorch model)",
    }


def reference_outputs(
    model: nn.Module, spec: ModelSpec, onnx_output_names: list[str], samples: int, seed: int, chunk: int = 8
) -> dict[str, np.ndarray]:
    """Eager fp32 outputs on seeded inputs."""
    return eager_outputs(model, spec, make_inputs(spec.inputs, samples, seed), onnx_output_names, chunk)


def eager_outputs(
    model: nn.Module | OnnxReference, spec: ModelSpec, feeds: dict[str, np.ndarray], names: list[str], chunk: int = 8
) -> dict[str, np.ndarray]:
    samples = next(iter(feeds.values())).shape[0]
    chunk = min(chunk, spec.max_batch or chunk)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, samples, chunk):
        sub = {k: v[start : start + chunk] for k, v in feeds.items()}
        for k, v in _eager(model, sub, spec, names).items():
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def reference_set(
    model: nn.Module | OnnxReference, spec: ModelSpec, names: list[str], data: dict[str, Any], settings: ValidateSettings
) -> dict[str, Any]:
    """What every engine's accuracy is judged on: held-out images (data.eval_dir) through the shared
    preprocessing for the model's image input, when the folder has images (the other inputs from
    data.samples or seeded), else seeded inputs. Returns inputs, the eager fp32 outputs, the task's labels,
    the task, a description, and why the reference proves nothing when it does not."""
    from kiln.accuracy.tasks import output_infos, resolve_task
    from kiln.data.calibration_set import image_input
    from kiln.data.images import ImageSet, preprocess_for
    from kiln.data.inputs import other_inputs

    eval_dir = data.get("eval_dir")
    preprocess = preprocess_for(spec, data)
    image = image_input(spec, preprocess)
    images = ImageSet.scan(eval_dir, "eval folder") if eval_dir and Path(eval_dir).is_dir() and image is not None else None
    labels = None
    if images is not None:
        images.warn_small(preprocess, "eval folder")
        limit = int(data.get("eval_limit") or len(images))
        if limit < len(images):
            # Spread the subset over the folder so every class is represented.
            picks = np.linspace(0, len(images) - 1, limit).round().astype(int)
            images = type(images)(
                images.root,
                tuple(images.paths[i] for i in picks),
                tuple(images.labels[i] for i in picks) if images.labels else None,
                images.classes,
            )
        feeds = other_inputs([i for i in spec.inputs if i.name != image.name], len(images), settings.reference_seed, data)
        feeds[image.name] = images.load(preprocess)
        feeds = {i.name: feeds[i.name] for i in spec.inputs}
        source = f"{len(images)} images from {eval_dir}"
    else:
        if eval_dir and Path(eval_dir).is_dir() and image is None:
            log.info("eval images not used: no model input takes what data.preprocess makes; judging on seeded inputs")
        feeds = other_inputs(spec.inputs, settings.reference_samples, settings.reference_seed, data)
        source = f"{settings.reference_samples} {'samples from ' + str(data['samples']) if data.get('samples') else 'seeded random inputs'}"
        source += " (no eval images)"
    outputs = eager_outputs(model, spec, feeds, names)
    task, _ = resolve_task(spec.task, output_infos(outputs))
    if images is not None:
        labels = task.read_labels(images, preprocess)
        if labels is not None:
            source += " (labelled)"
    return {
        "inputs": feeds,
        "outputs": outputs,
        "labels": labels,
        "source": source,
        "task": task.name,
        "degenerate": task.degenerate(outputs),
    }
