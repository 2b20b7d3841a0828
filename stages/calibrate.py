"""calibrate@<target>: the runtime's quantized model from data/calibration, for targets with a calibrated precision.

dvc.yaml runs it only for those targets (params' derived pipeline.calibrate), so new calibration
images re-build only the targets that use them; run by hand for another target, it writes a marker
saying no calibration is needed.
"""

import logging
import sys

from kiln.config.slices import load_stage_params
from kiln.config.views import Target
from kiln.core import paths
from kiln.data.engine_input import engine_spec
from kiln.pipeline.calibrate import calibrate_target
from kiln.pipeline.stage import run_stage


def main() -> None:
    name = sys.argv[1]
    params = load_stage_params("calibrate", name)
    target = Target.from_params(name, params)
    spec = engine_spec(params)
    info = calibrate_target(target, paths.ONNX, spec, params, paths.CALIBRATION / name)
    log = logging.getLogger("kiln.calibrate")
    if info["needed"]:
        log.info("%s: %s %s calibrated on %d images from %s", name, target.runtime, target.precision, info["images"], info["folder"])
    else:
        log.info("%s: %s needs no calibration", name, target.precision)


if __name__ == "__main__":
    run_stage(main)
