"""The user's image folders: never deleted or replaced, every format Pillow reads, 16-bit and tiny images handled."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, venv_env
from PIL import Image

from kiln.core.errors import KilnError
from kiln.data.images import ImageSet, Preprocess

SAMPLE_DATA = ROOT / "stages" / "sample_data.py"


def run_sample_data(cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SAMPLE_DATA)], cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=300)


def photo(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_a_folder_of_gif_jfif_and_a_readme_is_kept_and_read(in_tmp):
    calib = in_tmp / "data" / "calibration"
    calib.mkdir(parents=True)
    photo(seed=1).save(calib / "a.gif")
    photo(seed=2).save(calib / "b.jfif", format="JPEG")
    (calib / "README.txt").write_text("my notes")
    before = {p.name: p.read_bytes() for p in calib.iterdir()}

    result = run_sample_data(in_tmp)
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in calib.iterdir()} == before  # not one byte changed
    assert "README.txt" in result.stderr and "left alone" in result.stderr
    # The eval folder was missing: that one is filled with the sample photographs.
    assert len(list((in_tmp / "data" / "eval").glob("*.jpg"))) == 64

    images = ImageSet.scan(calib)
    assert [p.name for p in images.paths] == ["a.gif", "b.jfif"]
    batch = images.load(Preprocess(resize=32, crop=32))
    assert batch.shape == (2, 3, 32, 32)


def test_a_folder_with_no_readable_image_fails_and_keeps_its_files(in_tmp):
    calib = in_tmp / "data" / "calibration"
    (calib / "sub").mkdir(parents=True)
    (calib / "README.txt").write_text("notes")
    (calib / "sub" / "scan.raw").write_bytes(b"\0" * 10)

    result = run_sample_data(in_tmp)
    assert result.returncode == 1
    assert (
        "kiln: error: image folder 'data/calibration' holds 2 file(s) but no image kiln reads (README.txt, sub/scan.raw)" in result.stderr
    )
    assert ".jfif" in result.stderr and ".gif" in result.stderr  # the suffixes that are read
    assert (calib / "README.txt").read_text() == "notes" and (calib / "sub" / "scan.raw").exists()


def test_an_empty_folder_is_filled(in_tmp):
    (in_tmp / "data" / "calibration" / "empty-subfolder").mkdir(parents=True)
    result = run_sample_data(in_tmp)
    assert result.returncode == 0, result.stderr
    assert len(list((in_tmp / "data" / "calibration").glob("*.jpg"))) == 300


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    arr = Preprocess(resize=64, crop=64, dtype="uint8", layout="NHWC").decode(tmp_path / "deep.png")
    # Pillow's own convert("RGB") makes 99.6% of this image white; scaled, about 1/256 of it is.
    assert (arr == 255).mean() < 0.02
    assert abs(float(arr.mean()) - 127.5) < 3


def test_float_images_are_refused_by_name(tmp_path):
    Image.fromarray(np.random.rand(8, 8).astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(KilnError, match=r"f.tif holds floating-point pixels.*convert it to an 8-bit jpg/png"):
        Preprocess(resize=8, crop=8).decode(tmp_path / "f.tif")


def test_tiny_images_are_warned_about(tmp_path, caplog):
    photo(size=(1, 1)).save(tmp_path / "dot.png")
    photo(size=(300, 300)).save(tmp_path / "big.png")
    with caplog.at_level(logging.WARNING, logger="kiln.data.images"):
        ImageSet.scan(tmp_path).warn_small(Preprocess(), "calibration folder")
    assert "1 of 2 images in calibration folder" in caplog.text and "dot.png (1x1)" in caplog.text
    assert "big.png" not in caplog.text


def test_sample_photographs_are_the_pixels_their_packages_load():
    # kiln reads the packages' files itself (their imports cost seconds per stage): the same pixels, or the sample
    # images, the demo weights and every digest built on them would change without anyone asking.
    import skimage.data
    from sklearn.datasets import load_sample_image

    from kiln.data.images import PHOTOGRAPH_FILES, photograph

    for name in PHOTOGRAPH_FILES:
        if name in ("china", "flower"):
            loaded = load_sample_image(f"{name}.jpg")
        elif name == "motorcycle":
            loaded = skimage.data.stereo_motorcycle()[0]
        else:
            loaded = getattr(skimage.data, name)()
        ours = photograph(name)
        assert ours.dtype == np.uint8 and ours.ndim == 3 and np.array_equal(ours, np.asarray(loaded)), name
    with pytest.raises(KilnError, match="no sample photograph 'lena'"):
        photograph("lena")
