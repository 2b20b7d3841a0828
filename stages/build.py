"""build@<target>: one engine folder (runtime files + manifest) for one target."""

import json
import logging
import sys

from kiln.config.slices import load_stage_params
from kiln.config.views import Target
from kiln.core import paths
from kiln.data.engine_input import engine_spec
from kiln.measure.tuning import TuningSettings
from kiln.pipeline.engine import build_engine
from kiln.pipeline.stage import run_stage
from kiln.runtimes import BuildSource


def main() -> None:
    name = sys.argv[1]
    params = load_stage_params("build", name)
    target = Target.from_params(name, params)
    spec = engine_spec(params)
    machine = json.loads(paths.FINGERPRINT.read_text())
    manifest = build_engine(
        target,
        BuildSource(paths.ONNX, spec, paths.CALIBRATION / name),
        paths.ENGINES / name,
        machine,
        TuningSettings.from_params(params.get("tuning")),
    )
    log = logging.getLogger("kiln.build")
    if manifest.get("skipped"):
        log.warning("%s skipped on this machine: %s", name, manifest["skipped"])
        return
    log.info(
        "%s: %s %s (executed %s) in %.2f s -> %s",
        name,
        target.runtime,
        target.precision,
        manifest["precision"]["executed"],
        manifest["build_seconds"],
        paths.ENGINES / name,
    )


if __name__ == "__main__":
    run_stage(main)
