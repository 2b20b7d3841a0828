"""data: digests of the image folders the stages read (data.calibration_dir, data.eval_dir), wherever they are.

dvc.yaml makes this stage depend on the configured folders themselves, so new or changed images re-run
it; the calibrate, validate and benchmark stages depend on the small digest files instead of on
hundreds of images each, which DVC would otherwise re-check once per dependent stage on every `dvc repro`.
"""

import logging
from pathlib import Path

from kiln.config.slices import load_stage_params
from kiln.core import paths
from kiln.core.atomic import write_json
from kiln.core.hashing import digest_files
from kiln.pipeline.stage import run_stage


def digest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {"files": len(files), "sha256": digest_files({p.relative_to(folder).as_posix(): p for p in files})}


def main() -> None:
    data = load_stage_params("data")["data"]
    for key, out in (("calibration_dir", paths.CALIBRATION_DIGEST), ("eval_dir", paths.EVAL_DIGEST)):
        folder = Path(data[key])
        summary = digest(folder)
        write_json(out, {str(folder): summary})
        logging.getLogger("kiln.data").info("data.%s: %s, %d files", key, folder, summary["files"])


if __name__ == "__main__":
    run_stage(main)
