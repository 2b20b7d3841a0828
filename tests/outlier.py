"""A trained classifier that int8 cannot serve: one activation channel is an outlier ~1000x the others.

`add_outlier_channel` rescales a TinyCNN without changing its fp32 function: the first block's output
channel `channel` is multiplied by `factor` (its BatchNorm weight and bias times `factor`; ReLU is
positively homogeneous, relu(f*x) = f*relu(x) for f > 0), and the second conv's weights that read that
channel are divided by `factor`. The float network computes the same logits (to float rounding).

Why int8 fails on every CPU, with ONNX Runtime (static QDQ) and with OpenVINO (NNCF) alike:

* Activations get one scale per tensor. The first block's output now spans [0, factor * m] because of the
  one channel, so the quantization step is ~factor * m / 255 (u8) or / 127 (s8): every other channel's
  values (of size ~m) round to 0.
* Weights get one scale per output channel of the second conv, set by its largest weight. The weights
  that read the outlier channel were divided by `factor`, so they are ~1/factor of the rest of the filter
  and round to 0 too (with 7-bit reduce_range weights even more so).

So the second conv sees (almost) nothing but its bias, every image gets nearly the same logits and top-1
agreement with fp32 falls towards chance. Nothing in this depends on the CPU's instruction set (VNNI,
AVX-512, AMX or none): it is the int8 number format itself, before any kernel runs (ONNX Runtime's 7-bit
reduce_range weights, its percentile/entropy calibration and NNCF's mixed preset collapse the same way).

`calibration.ignored_scope` brings the accuracy back, but which nodes it needs differs by runtime:
* OpenVINO (NNCF puts FakeQuantize on the inputs of the ops it quantizes): the second Conv alone.
* ONNX Runtime (QDQ also quantizes a quantized Conv's output, with the ReLU fused in): the first and the
  second Conv together; either alone leaves the outlier tensor between them quantized.
The exported node names come from torch's exporter: find the Convs by op_type, in graph order.

The state-dict keys stay TinyCNN's, so a checkpoint written by `write_outlier_checkpoint` loads through
the `digits:digits_cnn` entrypoint like the plain digits checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tinymodels import TinyCNN

# The first block's output channel made the outlier, and by how much. Measured on trained digits models:
# at 1000, int8 top-1 agreement is 0.09-0.16 with both runtimes (seeds 0-2 on channel 0, seed 0 on channels
# 7 and 11); seed 0, channel 0 still keeps >= 0.99 at factor 100 and falls to 0.15 (ORT) / 0.60 (OpenVINO)
# at 300, so 1000 has margin; 10000 collapses the same and keeps fp32 equal to ~1e-7 relative.
CHANNEL = 0
FACTOR = 1000.0


def add_outlier_channel(model: TinyCNN, channel: int = CHANNEL, factor: float = FACTOR) -> TinyCNN:
    """A deep copy of `model` with the first block's output `channel` `factor` times larger and the second
    conv's input weights for that channel `factor` times smaller: the same fp32 function, int8-hostile."""
    if factor <= 0:
        raise ValueError(f"factor must be positive (ReLU is only positively homogeneous), got {factor}")
    out = copy.deepcopy(model)
    bn1, conv2 = out.features[1], out.features[3]
    if not (isinstance(bn1, torch.nn.BatchNorm2d) and isinstance(conv2, torch.nn.Conv2d)):
        raise TypeError("add_outlier_channel expects TinyCNN's layout: features[1] BatchNorm2d, features[3] Conv2d")
    if not 0 <= channel < bn1.num_features:
        raise ValueError(f"channel {channel} out of range for {bn1.num_features} channels")
    with torch.no_grad():
        bn1.weight[channel] *= factor
        bn1.bias[channel] *= factor
        conv2.weight[:, channel] /= factor
    return out


def write_outlier_checkpoint(model: TinyCNN, path: Path, channel: int = CHANNEL, factor: float = FACTOR) -> Path:
    """The outlier copy of a trained `model` saved as a plain state_dict at `path` (for `digits:digits_cnn`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(add_outlier_channel(model, channel, factor).state_dict(), path)
    return path


INT8 = {"onnxruntime-int8": "onnxruntime", "openvino-int8": "openvino"}


def build_outlier_project(root: Path, model: TinyCNN, dirs: dict[str, Path], width: int = 16, size: int = 16) -> dict:
    """A project folder as the pipeline leaves it (artifacts/, params.yaml) for the outlier copy of a trained digits
    `model`: an fp32 and two int8 engines, one thread each. Returns {root, params, reference}."""
    import yaml
    from digits import digits_params

    from kiln.config.views import ModelSpec, Target
    from kiln.data.reference import load_reference, save_reference
    from kiln.export.models import build_model
    from kiln.export.onnx import ExportSettings, export_onnx
    from kiln.export.validate import ValidateSettings, reference_set
    from kiln.pipeline.calibrate import calibrate_target
    from kiln.pipeline.engine import build_engine
    from kiln.runtimes import BuildSource

    checkpoint = write_outlier_checkpoint(model, root / "outlier.pt")
    params = digits_params(dirs, checkpoint, width=width, size=size)
    params["targets"] = {
        "onnxruntime": {"runtime": "onnxruntime", "precision": "fp32", "threads": 1},
        **{name: {"runtime": rt, "precision": "int8", "threads": 1} for name, rt in INT8.items()},
    }
    params["benchmark"] = {"accuracy_budget": {"min_top1_agreement": 0.98}}
    project = root / "project"
    artifacts = project / "artifacts"
    artifacts.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    spec = ModelSpec.from_params(params["model"])
    export_onnx(build_model(spec), spec, ExportSettings(), artifacts / "model.onnx")
    save_reference(artifacts / "reference.npz", reference_set(build_model(spec), spec, ["logits"], params["data"], ValidateSettings()))
    for name in params["targets"]:
        target = Target.from_params(name, params)
        calibrate_target(target, artifacts / "model.onnx", spec, params, artifacts / "calibration" / name)
        build_engine(target, BuildSource(artifacts / "model.onnx", spec, artifacts / "calibration" / name), artifacts / "engines" / name)
    return {"root": project, "params": params, "reference": load_reference(artifacts / "reference.npz")}
