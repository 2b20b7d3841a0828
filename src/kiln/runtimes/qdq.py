"""Static Q/DQ quantization with ONNX Runtime's quantizer, shared by the runtimes that run a Q/DQ graph
(ONNX Runtime itself, and TensorRT's explicit quantization). Each passes its own types and options."""

from __future__ import annotations

import contextlib
import itertools
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kiln.core.errors import KilnError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import numpy as np

    from kiln.data.calibration_set import CalibrationSet, CalibrationSettings

QDQ = "model.qdq.onnx"
PREPROCESSED = "model.fp32.onnx"  # the fp32 graph the QDQ graph was made from: same nodes, same tensor names


class CalibrationReader:
    """ONNX Runtime's CalibrationDataReader over kiln's calibration batches, with a progress bar."""

    def __init__(self, calib: CalibrationSet, runtime: str, whole_batches: bool = False):
        from tqdm import tqdm

        total = len(calib)
        self._batches = calib.batches()
        if whole_batches and total > calib.batch and total % calib.batch:
            # ORT's histogram collectors (entropy, percentile) stack the batches into one array: a short last
            # batch makes it ragged and the quantizer fails. Leave those few images out instead.
            total -= total % calib.batch
            log.info("entropy/percentile calibration takes whole batches: %d image(s) left out", len(calib) - total)
            self._batches = itertools.islice(calib.batches(), total // calib.batch)
        self._bar = tqdm(total=total, desc=f"calibrating ({runtime})", unit="img", mininterval=2.0)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            self._bar.close()
            return None
        self._bar.update(len(next(iter(batch.values()))))
        return batch


def check_ignored_scope(onnx_path: Path, settings: CalibrationSettings, target_name: str) -> None:
    import onnx

    nodes = {n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    unknown = [n for n in settings.ignored_scope if n not in nodes]
    if unknown:
        raise KilnError(
            f"targets.{target_name}: ignored_scope names no node of the graph: {', '.join(unknown)} "
            f"(node names look like {', '.join(sorted(nodes)[:3])}...)"
        )


def quantize_qdq(
    onnx_path: Path,
    out_dir: Path,
    calib: CalibrationSet,
    settings: CalibrationSettings,
    runtime: str,
    prepare: Callable[[Path], None] | None = None,
    **quantizer: Any,
) -> Path:
    """out_dir/model.qdq.onnx from `onnx_path`: ONNX Runtime's pre-processing (shape inference, Conv+BN folding)
    into out_dir/model.fp32.onnx, then `prepare` on that file if given, then quantize_static with the calibration
    method, the nodes kept in float, and `quantizer`'s types and options."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = (out_dir / PREPROCESSED).resolve()
    source = str(Path(onnx_path).resolve())
    # A failed symbolic pass dumps sym_shape_infer_temp.onnx and a <uuid>.data into the working directory (the
    # user's repo root in a DVC stage): run it from a scratch folder that goes with it.
    with tempfile.TemporaryDirectory(prefix="kiln-shape-") as scratch, contextlib.chdir(scratch):
        try:
            quant_pre_process(source, str(pre), skip_symbolic_shape=False)
        except Exception as e:  # noqa: BLE001 - ORT's symbolic shape inference fails on some graphs (detectors' NMS)
            # ONNX's own shape inference is enough for quantize_static; the symbolic pass only adds shapes
            # that some fusions want.
            log.warning(
                "ONNX Runtime's symbolic shape inference failed on %s (%s: %s); pre-processing without it",
                onnx_path.name,
                type(e).__name__,
                e,
            )
            quant_pre_process(source, str(pre), skip_symbolic_shape=True)
    if prepare is not None:
        prepare(pre)
    from kiln.export.graphs import declared_float_nodes, tail_nodes

    tail = tail_nodes(pre)
    if tail:
        log.info("%d node(s) after the last Conv/MatMul kept in float (box decoding, NMS, upsampling)", len(tail))
    declared = declared_float_nodes(onnx_path)
    if declared:  # the graph's own (YOLO's DFL box decoding): names the pre-processing kept
        import onnx

        present = {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
        tail = [*tail, *(n for n in declared if n in present)]
        log.info(
            "%d node(s) the export marked kept in float (%d of them in the pre-processed graph)",
            len(declared),
            len(present & set(declared)),
        )
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    quantize_static(
        str(pre),
        str(out_dir / QDQ),
        CalibrationReader(calib, runtime, whole_batches=settings.method != "minmax"),
        quant_format=QuantFormat.QDQ,
        calibrate_method=methods[settings.method],
        nodes_to_exclude=sorted({*settings.ignored_scope, *tail}) or None,
        **quantizer,
    )
    return out_dir / QDQ
