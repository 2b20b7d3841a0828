"""Image folders and the one preprocessing definition that calibration, validation and benchmark share.

Calibration must see what serving sees: resizing, cropping, normalisation and layout
are defined once in config (`data.preprocess`) and applied here for every consumer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from kiln.core.errors import KilnError

# Formats Pillow decodes without extra libraries; animated GIF/WebP/TIFF give their first frame.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# Folders at the top of an eval folder that hold labels, not images: kiln.accuracy.tasks reads them.
LABEL_FOLDERS = ("masks", "labels")
# An image whose short side is below this share of the crop is upscaled so much that it is mostly blur.
SMALL_IMAGE_SHARE = 0.5


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, centre-crop, scale to [0, 1], normalise, lay out as NCHW or NHWC."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "uint8"] = "float32"

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | None) -> "Preprocess":
        from kiln.core.settings import parse

        return parse(cls, raw, "data.preprocess")

    def check(self, where: str) -> None:
        if self.resize < 1 or self.crop < 1:
            raise KilnError(f"{where}.resize and crop must be positive pixel counts, got {self.resize} and {self.crop}")
        if self.crop > self.resize:
            raise KilnError(f"{where}.crop ({self.crop}) cannot exceed resize ({self.resize})")
        if len(self.mean) != len(self.std) or not self.mean:
            raise KilnError(f"{where}.mean and std must have one value per channel")

    def to_params(self) -> dict[str, Any]:
        from kiln.core.settings import to_params

        return to_params(self)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def sample_shape(self) -> tuple[int, ...]:
        c, s = self.channels, self.crop
        return (c, s, s) if self.layout == "NCHW" else (s, s, c)

    def __call__(self, path: Path) -> np.ndarray:
        arr = self.decode(path)  # the same steps as from_image, for a file
        if self.dtype == "uint8":
            return np.ascontiguousarray(arr.transpose(2, 0, 1) if self.layout == "NCHW" else arr)
        return self.normalize(arr[None])[0]

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, C] images -> float32 scaled, normalised, in this layout (the part an export can fold)."""
        out = (images.astype(np.float32) / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2) if self.layout == "NCHW" else out)

    def folded(self) -> "Preprocess":
        """What a graph with folded preprocessing takes: the decoded, cropped uint8 image, HWC."""
        return Preprocess(self.resize, self.crop, self.mean, self.std, "NHWC", "uint8")

    def decode(self, path: Path) -> np.ndarray:
        """Decode, resize the short side, centre-crop: uint8 [H, W, C]."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                return self.resize_crop(to_8bit(im, path))
        except (UnidentifiedImageError, OSError) as e:
            raise KilnError(f"cannot read image {path}: {e}; remove it or replace it with a jpg/png") from e

    def geometry(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized width, resized height, crop left, crop top) for an image of that size: what labels
        (boxes, masks) go through to line up with the image the model sees."""
        scale = self.resize / min(width, height)
        rw, rh = max(self.resize, round(width * scale)), max(self.resize, round(height * scale))
        return rw, rh, (rw - self.crop) // 2, (rh - self.crop) // 2

    def resize_crop(self, im: Any) -> np.ndarray:
        """A PIL image -> uint8 [H, W, C]: resize the short side, centre-crop."""
        from PIL import Image

        im = im.convert("RGB" if self.channels == 3 else "L")
        rw, rh, left, top = self.geometry(*im.size)
        im = im.resize((rw, rh), Image.BILINEAR)
        arr = np.asarray(im.crop((left, top, left + self.crop, top + self.crop)), dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def from_image(self, im: Any) -> np.ndarray:
        """A PIL image, preprocessed like a file would be."""
        arr = self.resize_crop(im)
        if self.dtype == "uint8":
            return np.ascontiguousarray(arr.transpose(2, 0, 1) if self.layout == "NCHW" else arr)
        return self.normalize(arr[None])[0]


def to_8bit(im: Any, path: Path) -> Any:
    """16-bit greyscale images scaled to 8 bits. Pillow's own convert() clips them at 255, which turns
    most of a 16-bit photograph white; float images have no agreed range and are refused."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise KilnError(f"image {path} is a 32-bit integer image with values outside 0..65535: convert it to an 8-bit jpg/png")
        return Image.fromarray((arr * 255 // 65535).astype(np.uint8), mode="L")
    if im.mode == "F":
        raise KilnError(f"image {path} holds floating-point pixels, whose range kiln cannot know: convert it to an 8-bit jpg/png")
    return im


def preprocess_for(spec: Any, data: Mapping[str, Any]) -> Preprocess:
    """data.preprocess as the engines take it: all of it, or with the folded part left to the graph."""
    preprocess = Preprocess.from_params(data.get("preprocess"))
    return preprocess.folded() if spec.fold else preprocess


def is_image_file(path: Path) -> bool:
    # Hidden files (.DS_Store, AppleDouble "._x.jpg" twins) are never images, whatever their suffix.
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


@dataclass(frozen=True)
class ImageSet:
    """The images under a folder (any depth, sorted); labelled when laid out as `<class>/<image>`."""

    root: Path
    paths: tuple[Path, ...]
    labels: tuple[int, ...] | None
    classes: tuple[str, ...] | None

    @classmethod
    def scan(cls, root: str | Path, what: str = "image folder") -> "ImageSet":
        root = Path(root)
        if not root.is_dir():
            raise KilnError(f"{what} '{root}' does not exist; put jpg/png images in it (any depth)")
        # Label folders next to the images (segmentation masks, YOLO txt) are not images to run.
        paths = tuple(
            sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p) and p.relative_to(root).parts[0] not in LABEL_FOLDERS)
        )
        if not paths:
            raise KilnError(f"{what} '{root}' holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))} at any depth)")
        # ImageFolder layout: every image exactly one directory below the root.
        parents = {p.parent for p in paths}
        if all(p.parent.parent == root for p in paths) and len(parents) > 1:
            classes = tuple(sorted(p.name for p in parents))
            index = {c: i for i, c in enumerate(classes)}
            return cls(root, paths, tuple(index[p.parent.name] for p in paths), classes)
        return cls(root, paths, None, None)

    def __len__(self) -> int:
        return len(self.paths)

    def small_images(self, preprocess: Preprocess) -> list[tuple[Path, tuple[int, int]]]:
        """Images whose short side is far below the crop (read from the headers only: cheap)."""
        from PIL import Image, UnidentifiedImageError

        small = []
        for path in self.paths:
            try:
                with Image.open(path) as im:
                    size = im.size
            except (UnidentifiedImageError, OSError):
                continue  # decode() names the broken file when it is read
            if min(size) < preprocess.crop * SMALL_IMAGE_SHARE:
                small.append((path, size))
        return small

    def warn_small(self, preprocess: Preprocess, what: str) -> None:
        """One warning for the images that preprocessing will blow up many times over."""
        import logging

        small = self.small_images(preprocess)
        if small:
            examples = ", ".join(f"{p.relative_to(self.root)} ({w}x{h})" for p, (w, h) in small[:3])
            logging.getLogger("kiln.data.images").warning(
                "%d of %d images in %s '%s' are far smaller than the %d-pixel crop (%s%s): they are upscaled, "
                "so they carry little of what serving sees; use images at least %d pixels on the short side",
                len(small),
                len(self),
                what,
                self.root,
                preprocess.crop,
                examples,
                ", ..." if len(small) > 3 else "",
                preprocess.crop,
            )

    def target_indices(self) -> np.ndarray | None:
        """The model's class index for each image: folders named by index ("0".."999") map to that index,
        other names to their sorted position. None when the folder is not labelled."""
        if self.labels is None or self.classes is None:
            return None
        if all(c.isdigit() for c in self.classes):
            return np.array([int(self.classes[i]) for i in self.labels])
        return np.array(self.labels)

    def subset(self, n: int, what: str = "calibration set") -> "ImageSet":
        if n > len(self):
            raise KilnError(
                f"{what} '{self.root}' has {len(self)} images, fewer than the {n} asked for; add images or lower the subset size"
            )
        return ImageSet(self.root, self.paths[:n], self.labels[:n] if self.labels else None, self.classes)

    def batches(self, preprocess: Preprocess, batch: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self), batch):
            yield np.stack([preprocess(p) for p in self.paths[start : start + batch]])

    def load(self, preprocess: Preprocess) -> np.ndarray:
        return np.stack([preprocess(p) for p in self.paths])


def folder_contents(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """(images kiln reads, every other file) under `folder`, at any depth; both empty when it does not exist."""
    root = Path(folder)
    if not root.is_dir():
        return [], []
    files = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    images = [p for p in files if is_image_file(p)]
    return images, [p for p in files if not is_image_file(p)]


def check_user_folder(folder: str | Path, what: str) -> list[Path]:
    """The images of a folder that holds files (the user's): an error naming the files when none is an image.
    Kiln never deletes or replaces a file it did not write, so such a folder is never filled with samples."""
    root = Path(folder)
    images, others = folder_contents(root)
    if not images:
        names = ", ".join(str(p.relative_to(root)) for p in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise KilnError(
            f"{what} '{root}' holds {len(others)} file(s) but no image kiln reads ({names}); kiln reads "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} (any depth, hidden files skipped). Add images in one of those formats, or "
            f"move the folder away to get kiln's sample photographs there; kiln does not touch a folder that holds files"
        )
    if others:
        import logging

        logging.getLogger("kiln.data.images").warning(
            "%s '%s': %d file(s) are not images kiln reads and are left alone: %s%s",
            what,
            root,
            len(others),
            ", ".join(str(p.relative_to(root)) for p in others[:5]),
            ", ..." if len(others) > 5 else "",
        )
    return images


# The sample photographs and the package folders that ship them, read as sklearn.datasets.load_sample_image and
# skimage.data do (np.asarray of the PIL image), without importing either: scikit-learn's import (scipy.stats) is
# ~2 s and skimage.io's ~0.4 s, paid by every stage that makes demo weights or times preprocessing.
PHOTOGRAPH_FILES = {
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "coffee": ("skimage", "data/coffee.png"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
}


def photograph(name: str) -> np.ndarray:
    """One of the photographs scikit-image and scikit-learn ship: kiln's offline sample images."""
    import importlib.util

    from PIL import Image

    if name not in PHOTOGRAPH_FILES:
        raise KilnError(f"no sample photograph '{name}': kiln ships {', '.join(sorted(PHOTOGRAPH_FILES))}")
    package, file = PHOTOGRAPH_FILES[name]
    found = importlib.util.find_spec(package)
    path = Path(found.submodule_search_locations[0]) / file if found and found.submodule_search_locations else None
    if path is None or not path.is_file():
        raise KilnError(f"the sample photograph '{name}' ships with {package}, and {package} has no {file} here: reinstall kiln's dependencies")
    with Image.open(path) as image:
        return np.asarray(image)


def random_square_crop(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A square crop of a photograph, 35-100% of its short side, anywhere in it: kiln's sample-image recipe."""
    h, w = src.shape[:2]
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return src[top : top + side, left : left + side]


def make_sample_images(out_dir: str | Path, sources: Sequence[np.ndarray], count: int, seed: int, size: int = 256) -> list[Path]:
    """Random crops (scale, position, flip) of photographs, saved as JPEG: a reproducible offline image set."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for i in range(count):
        crop = Image.fromarray(random_square_crop(sources[i % len(sources)], rng)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        path = out / f"{i:04d}.jpg"
        crop.save(path, quality=92)
        written.append(path)
    return written
