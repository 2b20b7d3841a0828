"""A small classifier trained on scikit-learn's digits (they ship with the package), as image folders.

Int8 can only be judged on a trained model: a random network's logits sit too close
together for top-1 agreement to mean anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tinymodels import TinyCNN

from kiln.data.images import ImageSet, Preprocess

PREPROCESS = {"resize": 16, "crop": 16, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "layout": "NCHW", "dtype": "float32"}


def write_digits(root: Path) -> dict[str, Path]:
    """data/train/<digit>/, data/calibration/ (from the training split) and data/eval/<digit>/ as 16x16 PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.images))
    split = {"train": order[:1200], "eval": order[1200:]}
    dirs = {"train": root / "train", "calibration": root / "calibration", "eval": root / "eval"}
    for name, idx in split.items():
        for i in idx:
            img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16), Image.BILINEAR)
            d = dirs[name] / str(digits.target[i])
            d.mkdir(parents=True, exist_ok=True)
            img.save(d / f"{i:04d}.png")
    # Calibration images come from the training split, never from eval.
    dirs["calibration"].mkdir(parents=True, exist_ok=True)
    for i in order[:300]:
        Image.open(dirs["train"] / str(digits.target[i]) / f"{i:04d}.png").save(dirs["calibration"] / f"{i:04d}.png")
    return dirs


def train(train_dir: Path, epochs: int = 12, seed: int = 0, width: int = 16, size: int = 16) -> TinyCNN:
    torch.manual_seed(seed)
    images = ImageSet.scan(train_dir)
    x = torch.from_numpy(images.load(Preprocess.from_params(preprocess(size))))
    y = torch.tensor([int(images.classes[i]) for i in images.labels])
    model = TinyCNN(num_classes=10, width=width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = perm[start : start + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def preprocess(size: int = 16) -> dict[str, Any]:
    """PREPROCESS at another size (the 8x8 digits scaled up: a bigger network for speed figures)."""
    return {**PREPROCESS, "resize": size, "crop": size}


def digits_cnn(width: int = 16) -> TinyCNN:
    """The entrypoint the checkpoint belongs to."""
    return TinyCNN(num_classes=10, width=width)


def digits_params(dirs: dict[str, Path], checkpoint: Path, width: int = 16, size: int = 16) -> dict[str, Any]:
    return {
        "model": {
            "name": None,
            "entrypoint": "digits:digits_cnn",
            "checkpoint": str(checkpoint),
            "weights": None,
            "kwargs": {} if width == 16 else {"width": width},
            "inputs": {"input": {"shape": [3, size, size], "dtype": "float32"}},
            "outputs": ["logits"],
            "seed": 0,
        },
        "data": {
            "calibration_dir": str(dirs["calibration"]),
            "eval_dir": str(dirs["eval"]),
            "eval_limit": 600,
            "preprocess": preprocess(size),
        },
        "calibration": {"subset_size": 300, "batch": 16, "method": "minmax", "ignored_scope": [], "options": {}},
    }
