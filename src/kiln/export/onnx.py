"""PyTorch -> ONNX with a dynamic batch axis, warnings kept, and a check that the axis really stayed dynamic."""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config.views import ModelSpec
from kiln.core.atomic import atomic_path
from kiln.core.errors import KilnError, StorageError, chain, describe_os_error, find_os_error, first_line, strip_ansi
from kiln.core.hashing import sha256_file
from kiln.data.inputs import make_inputs
from kiln.export.models import flatten_outputs
from kiln.export.settings import MAX_TORCHSCRIPT_OPSET, ExportSettings, check_traced_batch

log = logging.getLogger(__name__)


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _summarize_failure(e: BaseException) -> str:
    """A few lines from a torch export failure; the full report goes to the log."""
    text = strip_ansi(str(e))
    cause = e.__cause__ or e.__context__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # torch's own report puts the real reason under "Exception summary".
    for i, ln in enumerate(lines):
        if "Exception summary" in ln and i + 1 < len(lines):
            lines = lines[i + 1 :]
            break
    summary = " ".join(lines[:3])[:400] if lines else type(e).__name__
    if cause is not None and type(cause).__name__ not in summary:
        summary = f"{type(cause).__name__}: {summary}"
    return summary


def export_onnx(model: nn.Module, spec: ModelSpec, settings: ExportSettings, out_path: str | Path) -> dict[str, Any]:
    """Export `model` to `out_path` and return the export manifest. Raises KilnError on any failure.

    A wrapped torchvision detector (kiln.export.detection) is first checked against its own forward on
    sample photographs: the agreement goes to manifest["export_path"]["nms_fidelity"], and a detection F1
    below detection.MIN_NMS_F1 (a fixed constant, 0.9: the detection gate's default; the export stage reads
    no benchmark settings) fails the export."""
    check_traced_batch(settings.batch, spec.max_batch)
    was_training = model.training
    model.eval()
    if was_training:
        log.warning("model was in training mode: put in eval mode before export")
    feeds = make_inputs(spec.inputs, settings.batch, settings.seed)
    args = tuple(torch.from_numpy(feeds[i.name]) for i in spec.inputs)

    try:
        with torch.inference_mode():
            outputs = flatten_outputs(model(*args), spec.outputs)
    except KilnError:
        raise
    except Exception as e:
        shapes = ", ".join(f"'{i.name}' {list(i.batched(settings.batch))} {i.dtype}" for i in spec.inputs)
        raise KilnError(
            f"the model's forward failed on inputs {shapes}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}; "
            "check model.inputs (shape is per sample, without the batch axis)"
        ) from e
    input_names = [i.name for i in spec.inputs]
    output_names = list(outputs)

    from kiln.accuracy.tasks import output_infos, resolve_task

    task, task_line = resolve_task(spec.task, output_infos({k: v.detach().numpy() for k, v in outputs.items()}))
    log.info("%s", task_line)
    from kiln.export.detection import check_nms_fidelity, find_wrapper, nms_fidelity

    exporter = settings.exporter
    path: dict[str, Any] = {"exporter": exporter, "why": f"export.exporter is {exporter}"}
    wrapper = find_wrapper(model)
    describe = getattr(model, "describe", None)
    if callable(describe):
        path["model_wrapper"] = describe()
        if wrapper is not None and wrapper.family == "rcnn":
            path["why"] += "; the R-CNN keeps torchvision's own postprocessing, one image per call (kiln.export.detection_rcnn)"
        else:
            path["why"] += "; the torchvision detector's postprocessing is replaced by kiln's fixed-shape NMS (kiln.export.detection)"
    needs = getattr(wrapper, "exporter", None)
    if needs and needs != exporter and settings.fallback and settings.opset <= MAX_TORCHSCRIPT_OPSET:
        exporter = needs  # dynamo would fail after minutes of tracing: go where it works, and say so
        path.update(exporter=needs, why=f"{wrapper.exporter_why} (export.fallback allows it)")
    if wrapper is not None:
        # Before the export's cost: kiln's NMS must find what the detector's own postprocessing finds
        # (detection.MIN_NMS_F1, a fixed constant: this stage reads no benchmark settings).
        path["nms_fidelity"] = fidelity = nms_fidelity(wrapper, seed=settings.seed)
        log.info("in-graph NMS against the detector's own: detection F1 %s on %d sample photographs", fidelity["f1"], fidelity["images"])
        check_nms_fidelity(fidelity)

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        common = {"input_names": input_names, "output_names": output_names, "opset_version": settings.opset}
        try:
            _run_exporter(exporter, model, args, tmp, common, dynamic=spec.max_batch != 1)
        except Exception as e:
            fallback = exporter == "dynamo" and settings.fallback and settings.opset <= MAX_TORCHSCRIPT_OPSET and find_os_error(e) is None
            if fallback:
                traceback.print_exc(file=sys.stderr)
                dynamo_failure = _summarize_failure(e)
                log.warning("dynamo could not export the model (%s): trying the TorchScript exporter", dynamo_failure)
                try:
                    _run_exporter("torchscript", model, args, tmp, common, dynamic=spec.max_batch != 1)
                    path = {**path, "exporter": "torchscript", "why": f"dynamo failed: {dynamo_failure}"}
                except Exception as e2:
                    _raise_export_failure(e2, out_path, "torchscript, after dynamo failed")
            else:
                _raise_export_failure(e, out_path, exporter)
        manifest_warnings = [
            {"category": w.category.__name__, "message": str(w.message).strip(), "where": f"{w.filename}:{w.lineno}"} for w in caught
        ]
        for w in manifest_warnings:
            print(f"export warning: [{w['category']}] {w['message'].splitlines()[0]} ({w['where']})", file=sys.stderr)
        info = check_exported_graph(tmp, spec, settings)
        prefixes = getattr(wrapper, "float_modules", None)
        if prefixes:
            from kiln.export.graphs import mark_float_modules

            # The model's own exporter keeps these in float at int8 (YOLO's box decoding): every int8 target does too.
            path["kept_in_float_at_int8"] = kept = mark_float_modules(tmp, [f"model.{p}" if spec.fold else p for p in prefixes])
            if not kept:
                log.warning("found no node of %s in the exported graph: int8 will quantize them", ", ".join(prefixes))
    return {
        "exporter": path["exporter"],
        "export_path": path,
        "task": task.name,
        "task_reason": task_line,
        "opset": settings.opset,
        "traced_batch": settings.batch,
        "torch": torch.__version__,
        "model": spec.label,
        "was_training": was_training,
        "folded_preprocess": spec.fold,
        **info,
        "sha256": sha256_file(out_path),
        "warnings": manifest_warnings,
    }


def _run_exporter(
    exporter: str, model: nn.Module, args: tuple[Any, ...], onnx_file: Path, common: dict[str, Any], dynamic: bool = True
) -> None:
    """torch.onnx.export with the batch axis of every input (and, for TorchScript, every output) dynamic; `dynamic`
    False (a model that takes one image at a time) keeps the traced batch."""
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in args) if dynamic else None
        torch.onnx.export(model, args, str(onnx_file), dynamo=True, external_data=False, dynamic_shapes=shapes, **common)
    else:
        names = common["input_names"] + common["output_names"]
        axes = {n: {0: "batch"} for n in names} if dynamic else None
        torch.onnx.export(model, args, str(onnx_file), dynamo=False, dynamic_axes=axes, **common)


def _raise_export_failure(e: BaseException, out_path: Path, exporter: str) -> None:
    os_error = find_os_error(e)
    if os_error is not None:
        # Writing the graph failed, not exporting it: measured now, while the partial file still takes its space.
        raise StorageError(describe_os_error(os_error, out_path)) from e
    traceback.print_exc(file=sys.stderr)  # the full report stays in the stage's log
    # Tracing advice fits a graph torch could not capture, not a file it could not read or write.
    advice = (
        "" if any(isinstance(x, OSError) for x in chain(e)) else "; for a data-dependent branch, rewrite it with torch.where/torch.cond"
    )
    raise KilnError(f"torch.onnx.export ({exporter}) failed: {_summarize_failure(e)} (full report above in the log{advice})") from e


def check_exported_graph(path: Path, spec: ModelSpec, settings: ExportSettings) -> dict[str, Any]:
    """The graph loads, targets the asked opset, and keeps every input's batch axis dynamic."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise KilnError(f"the exported ONNX graph is invalid: {e}") from e
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != settings.opset:
        raise KilnError(f"the {settings.exporter} exporter produced opset {opset}, not the requested export.opset {settings.opset}")
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in graph_inputs]
    expected = [i.name for i in spec.inputs]
    if names != expected:
        raise KilnError(f"the exported graph's inputs are {names}, expected {expected} from model.inputs")
    for vi in graph_inputs:
        dims = _dims(vi)
        if spec.max_batch == 1 and dims and dims[0] in (1, "batch"):  # one image at a time: a batch of 1 is right
            continue
        if not dims or not isinstance(dims[0], str):
            raise KilnError(
                f"export froze the batch axis of input '{vi.name}' to {dims[0] if dims else '?'} (asked for a dynamic batch axis; "
                f"graph input shape {dims}): the forward treats the batch size as a constant (e.g. x.view({settings.batch}, -1)); "
                "use x.shape[0] or -1 instead"
            )
    return {
        "inputs": {
            vi.name: {"shape": _dims(vi), "dtype": onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name}
            for vi in graph_inputs
        },
        "outputs": {vo.name: {"shape": _dims(vo)} for vo in model.graph.output},
        "nodes": len(model.graph.node),
    }


def import_onnx(spec: ModelSpec, out_path: str | Path) -> dict[str, Any]:
    """model.onnx taken as the graph every engine is built from: checked (it loads, its inputs are model.inputs'
    names, dtypes and per-sample shapes, each with a dynamic batch axis), copied to `out_path` atomically, and
    described in a manifest like export_onnx's. Nothing is exported."""
    import shutil

    import onnx

    assert spec.onnx
    source = Path(spec.onnx)
    try:
        model = onnx.load(str(source), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as e:
        raise KilnError(f"model.onnx: '{source}' is not a valid ONNX graph: {first_line(e)}") from e
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise KilnError(
            f"model.onnx: '{source}' keeps its weights in external data files; save it as one file "
            "(onnx.save(onnx.load(path), out, save_as_external_data=False))"
        )
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = {i.name: i for i in model.graph.input if i.name not in inits}
    found = {
        name: {"shape": _dims(vi), "dtype": onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name}
        for name, vi in graph_inputs.items()
    }
    declared = {i.name: i for i in spec.inputs}
    listing = "; ".join(f"{n}: shape {v['shape']}, dtype {v['dtype']}" for n, v in found.items())
    if set(found) != set(declared):
        raise KilnError(
            f"model.onnx: the graph's inputs are {sorted(found)}, model.inputs declares {sorted(declared)} (the graph: {listing})"
        )
    for name, info in found.items():
        dims, want = info["shape"], declared[name]
        if not dims or (not isinstance(dims[0], str) and dims[0] != -1):
            raise KilnError(
                f"model.onnx: input '{name}' has a fixed batch axis ({dims[0] if dims else '?'}; shape {dims}): re-export it with a "
                "dynamic batch (torch.onnx.export's dynamic_shapes or dynamic_axes)"
            )
        per_sample = dims[1:]
        if len(per_sample) != len(want.shape) or any(isinstance(d, int) and d > 0 and d != w for d, w in zip(per_sample, want.shape)):
            raise KilnError(
                f"model.onnx: input '{name}' takes {dims} per batch, model.inputs.{name}.shape is {list(want.shape)} per sample"
            )
        if info["dtype"] != want.dtype:
            raise KilnError(f"model.onnx: input '{name}' is {info['dtype']}, model.inputs.{name}.dtype is {want.dtype}")
    with atomic_path(Path(out_path)) as tmp:
        shutil.copyfile(source, tmp)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "exporter": "none: model.onnx",
        "export_path": {"exporter": "none", "why": f"model.onnx gives the graph ({source})"},
        "source_onnx": str(source),
        "opset": opset,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "model": spec.label,
        "folded_preprocess": spec.fold,
        "inputs": found,
        "outputs": {vo.name: {"shape": _dims(vo)} for vo in model.graph.output},
        "nodes": len(model.graph.node),
        "sha256": sha256_file(Path(out_path)),
        "warnings": [],
    }
