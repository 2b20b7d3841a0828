"""sample-data: kiln's offline sample photographs, written only into an empty folder.

data/calibration gets random crops of photographs that scikit-image and scikit-learn
ship; data/eval gets crops of *other* photographs, so accuracy is never judged on
calibration images. A folder that already holds images (yours) is left as it is: its
outputs are `persist`, so replacing the images simply re-runs calibration.

Reproduce by hand: `python stages/sample_data.py` in an empty checkout.
"""

import logging
from pathlib import Path

from kiln.atomic import atomic_path
from kiln.images import IMAGE_SUFFIXES, make_sample_images
from kiln.stage import run_stage

CALIBRATION = {"dir": Path("data/calibration"), "count": 300, "seed": 1,
               "photos": ("astronaut", "chelsea", "rocket", "motorcycle", "hubble_deep_field", "china")}
EVAL = {"dir": Path("data/eval"), "count": 64, "seed": 2, "photos": ("coffee", "flower", "retina")}


def photograph(name: str):
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*"))


def main() -> None:
    log = logging.getLogger("kiln.sample_data")
    for spec in (CALIBRATION, EVAL):
        if has_images(spec["dir"]):
            log.info("%s already holds images: left as it is", spec["dir"])
            continue
        photos = [photograph(p) for p in spec["photos"]]
        with atomic_path(spec["dir"], is_dir=True) as tmp:
            written = make_sample_images(tmp, photos, spec["count"], spec["seed"])
        log.info("%s: %d crops of %s", spec["dir"], len(written), ", ".join(spec["photos"]))


if __name__ == "__main__":
    run_stage(main)
