"""The export, validate and model.detection settings and their checks, apart from the code that uses them: the
configure stage checks every settings block before anything runs, and importing torch for that costs it ~2 s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

from kiln.core.errors import KilnError
from kiln.core.settings import parse

# The dynamo exporter emits opset 18 and up; older opsets go through a version converter that
# silently keeps 18 when it fails, so kiln refuses them up front.
MIN_OPSET = {"dynamo": 18, "torchscript": 7}
MAX_TORCHSCRIPT_OPSET = 20


@dataclass(frozen=True)
class ExportSettings:
    opset: int = 18
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    batch: int = 2  # the traced batch size; validation uses others
    seed: int = 0
    fold_preprocess: bool = False  # data.preprocess's scaling and layout inside the graph (kiln.data.engine_input)
    # When dynamo cannot capture the model, try the TorchScript exporter (same opset, if it has it);
    # the manifest says which exporter made the graph and why.
    fallback: bool = True

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None) -> "ExportSettings":
        return parse(cls, raw, "export")

    def check(self, where: str) -> None:
        if self.batch < 1:
            raise KilnError(f"{where}.batch must be a positive integer, got {self.batch!r}")
        check_opset(self.opset, self.exporter)


def check_traced_batch(batch: int, max_batch: int | None, where: str = "export") -> None:
    """A model that batches is traced at 2 or more: torch.export specialises size-1 dimensions, so a traced batch of 1
    would freeze the batch axis. A model that takes one image at a time (model.max_batch 1) is traced at 1."""
    if max_batch != 1 and batch < 2:
        raise KilnError(
            f"{where}.batch must be an integer >= 2 (a traced batch of 1 is frozen by the exporter), got {batch!r}; "
            "a model that only takes one image at a time says so with model.max_batch: 1"
        )


def check_opset(opset: Any, exporter: str) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    highest = newest if exporter == "dynamo" else min(newest, MAX_TORCHSCRIPT_OPSET)
    lowest = MIN_OPSET[exporter]
    if not isinstance(opset, int) or not lowest <= opset <= highest:
        hint = (
            " (use exporter 'torchscript' for opsets below 18)"
            if exporter == "dynamo" and isinstance(opset, int) and opset < lowest
            else ""
        )
        raise KilnError(
            f"export.opset {opset!r} cannot be targeted by the {exporter} exporter: it supports opsets "
            f"{lowest}..{highest} with onnx {onnx.__version__}{hint}"
        )


@dataclass(frozen=True)
class ValidateSettings:
    batch_sizes: tuple[int, ...] = (1, 5)
    seed: int = 1234
    atol: float = 1e-4
    rtol: float = 1e-3
    allow_degenerate_reference: bool = False
    reference_samples: int = 32
    reference_seed: int = 4321

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None, traced_batch: int, max_batch: int | None = None) -> "ValidateSettings":
        """`max_batch` 1: a model that takes one image at a time is validated at batch 1 only (kiln.config.batch_limit)."""
        s = parse(cls, raw, "validate")
        if max_batch == 1:
            if set(s.batch_sizes) != {1}:
                raise KilnError(f"validate.batch_sizes must be [1] for a model that takes one image at a time, got {list(s.batch_sizes)}")
        elif len({b for b in s.batch_sizes if b != traced_batch}) < 2 or any(b < 1 for b in s.batch_sizes):
            raise KilnError(
                f"validate.batch_sizes must hold at least two positive batch sizes other than the traced export.batch "
                f"({traced_batch}), got {list(s.batch_sizes)}"
            )
        if s.atol < 0 or s.rtol < 0:
            raise KilnError("validate.atol and validate.rtol must be >= 0")
        return s


@dataclass(frozen=True)
class DetectionSettings:
    """`model.detection`: how kiln's in-graph postprocessing is sized."""

    candidates: int = 300  # class scores per image that enter NMS (torchvision: per class or per level)
    max_detections: int | None = None  # detections kept per image; None: the model's detections_per_img
    # Cluster-NMS rounds: it equals greedy NMS once a round changes nothing; a fixed count keeps the graph
    # static, and clusters of more overlapping boxes than rounds are not checked for (left to the gate)
    nms_iterations: int = 12
    # The detector's own cuts when None: torchvision's score_thresh/nms_thresh, Ultralytics' predict defaults for YOLO
    score_thresh: float | None = None
    nms_thresh: float | None = None

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None) -> "DetectionSettings":
        return parse(cls, raw, "model.detection")

    def check(self, where: str) -> None:
        if self.candidates < 1 or self.nms_iterations < 1 or (self.max_detections is not None and self.max_detections < 1):
            raise KilnError(f"{where}.candidates, nms_iterations and max_detections must be positive integers")
        for key in ("score_thresh", "nms_thresh"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise KilnError(f"{where}.{key} must be between 0 and 1 (or null: the detector's own), got {value!r}")
