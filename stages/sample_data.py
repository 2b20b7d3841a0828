"""sample-data: kiln's offline sample photographs, written only into a missing or empty folder.

data/calibration gets random crops of photographs that scikit-image and scikit-learn
ship; data/eval gets crops of *other* photographs, so accuracy is never judged on
calibration images. A folder that holds any file is the user's and is never touched:
with images in it, they are used (its outputs are `persist`, so replacing them simply
re-runs calibration); with no image kiln can read, the stage fails and names the files. The folders
the stages really read are data.calibration_dir and data.eval_dir (these by default): the data stage
digests those, wherever they are.

Reproduce by hand: `python stages/sample_data.py` in an empty checkout.
"""

import logging

from kiln.core import paths
from kiln.core.atomic import atomic_path
from kiln.data.images import check_user_folder, folder_contents, make_sample_images, photograph
from kiln.pipeline.stage import run_stage

CALIBRATION = {
    "dir": paths.SAMPLE_CALIBRATION_DIR,
    "count": 300,
    "seed": 1,
    "photos": ("astronaut", "chelsea", "rocket", "motorcycle", "hubble_deep_field", "china"),
}
EVAL = {"dir": paths.SAMPLE_EVAL_DIR, "count": 64, "seed": 2, "photos": ("coffee", "flower", "retina")}


def main() -> None:
    log = logging.getLogger("kiln.sample_data")
    for spec in (CALIBRATION, EVAL):
        if any(folder_contents(spec["dir"])):
            images = check_user_folder(spec["dir"], "image folder")
            log.info("%s holds %d images: left as it is", spec["dir"], len(images))
            continue
        photos = [photograph(p) for p in spec["photos"]]
        with atomic_path(spec["dir"], is_dir=True) as tmp:
            written = make_sample_images(tmp, photos, spec["count"], spec["seed"])
        log.info("%s: %d crops of %s", spec["dir"], len(written), ", ".join(spec["photos"]))


if __name__ == "__main__":
    run_stage(main)
