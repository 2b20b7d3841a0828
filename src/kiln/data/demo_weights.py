"""Make a random-init network's fp32 reference prove something, offline and reproducibly.

A network built with `weights=None` keeps BatchNorm's initial statistics (mean 0, variance 1), which
fit no real activations: deep networks then answer the same class for every image, and a
zero-initialised head (torchvision's ViT) answers exactly zero. Agreement with such a reference is not
evidence. `model.demo_weights` fixes the two, the same way before export and in every eager reference
(kiln.export.models.build_model applies it, seeded, to every copy of the model):
- `batchnorm`: re-estimate every BatchNorm's running mean and variance on kiln's sample photographs
  (the scikit-image/scikit-learn photographs sample-data uses, cropped in memory: no dependency on your
  folders), through data.preprocess;
- `redraw_zero_layers`: re-draw, with PyTorch's default init and the model's seed, every Conv/Linear
  layer whose weights are all zero.
Both are on by default for every model taken as random (config.ModelSpec.trained_weights: a model.name with
neither checkpoint nor weights, or model.trained: false), wherever its model file came from, and the log
says so in one line. Turn them off with `model.demo_weights: false` (or each part with
`{batchnorm: false, redraw_zero_layers: false}`). The weights stay random: speed figures are real, accuracy
against labels is not. Trained weights (model.checkpoint or model.weights) never get it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from kiln.core.errors import KilnError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

# The start of the one log line (per model built): demo weights were applied, what they did, how to turn them off.
APPLIED = "model.demo_weights applied (random weights; turn off with model.demo_weights: false)"


@dataclass(frozen=True)
class DemoWeights:
    """`model.demo_weights` (read by kiln.data.engine_input, which imports no framework: torch stays in the functions below).
    The defaults live here, not in the model files: on, for random weights only."""

    batchnorm: bool = True
    redraw_zero_layers: bool = True
    images: int = 32

    @classmethod
    def from_params(cls, raw: Mapping[str, Any] | bool | None) -> "DemoWeights":
        """A mapping of the fields above; `false` turns both parts off, `true` (or nothing) is the defaults."""
        from kiln.core.settings import parse

        if raw is False:
            return cls(batchnorm=False, redraw_zero_layers=False)
        return parse(cls, None if raw is True else raw, "model.demo_weights")

    def check(self, where: str) -> None:
        if self.images < 2:
            raise KilnError(f"{where}.images must be an integer >= 2 (BatchNorm needs a batch), got {self.images!r}")

    @property
    def enabled(self) -> bool:
        return self.batchnorm or self.redraw_zero_layers

    def to_params(self) -> dict[str, Any]:
        from kiln.core.settings import to_params

        return to_params(self)


PHOTOGRAPHS = ("astronaut", "chelsea", "rocket", "coffee", "china", "flower")


def sample_batch(preprocess_params: Mapping[str, Any], count: int, seed: int) -> np.ndarray:
    """`count` random crops of the sample photographs, preprocessed like data.preprocess does."""
    from PIL import Image

    from kiln.data.images import Preprocess, photograph, random_square_crop

    preprocess = Preprocess.from_params(preprocess_params)
    rng = np.random.default_rng(seed)
    sources = [photograph(n) for n in PHOTOGRAPHS]
    images = []
    for i in range(count):
        src = sources[i % len(sources)]
        if src.ndim == 2:
            src = np.stack([src] * 3, axis=-1)
        crop = Image.fromarray(np.ascontiguousarray(random_square_crop(src, rng)[..., :3]))
        images.append(preprocess.from_image(crop))
    return np.stack(images)


def redraw_zero_layers(model: nn.Module, seed: int) -> list[str]:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    redrawn = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not torch.any(module.weight != 0):
            module.reset_parameters()
            redrawn.append(name)
    return redrawn


def _has_batchnorm(model: nn.Module) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def reestimate_batchnorm(model: nn.Module, batch: np.ndarray, chunk: int = 8) -> int:
    """Running statistics from `batch` (a cumulative average over its chunks); returns how many layers."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative: every chunk counts the same
        m.train()
    try:
        with torch.no_grad():
            for start in range(0, len(batch), chunk):
                model(torch.from_numpy(batch[start : start + chunk]))
    finally:
        for m in norms:
            m.momentum = saved[m]
            m.eval()
    return len(norms)


def make_meaningful(
    model: nn.Module, demo: Mapping[str, Any], seed: int, inputs: list[tuple[int, ...]] | None = None, max_batch: int | None = None
) -> list[str]:
    """Apply `model.demo_weights` to `model` (in place); returns lines for the log and the manifest. `inputs`: the
    model's per-sample input shapes (None: one image input, as data.preprocess makes it). BatchNorm statistics are
    re-estimated only for a model that takes one image shaped like data.preprocess makes it, `max_batch` images
    per call at most (the model's limit: model.max_batch)."""
    from kiln.data.images import Preprocess

    settings = DemoWeights.from_params({k: v for k, v in demo.items() if k != "preprocess"})
    notes = []
    if settings.redraw_zero_layers:
        redrawn = redraw_zero_layers(model, seed)
        if redrawn:
            more = f" and {len(redrawn) - 5} more" if len(redrawn) > 5 else ""
            notes.append(
                f"re-drew {len(redrawn)} all-zero layer(s) with PyTorch's default init, seed {seed}: {', '.join(redrawn[:5])}{more}"
            )
    image = tuple(Preprocess.from_params(demo["preprocess"]).sample_shape()) if settings.batchnorm else ()
    if settings.batchnorm and inputs is not None and [tuple(i) for i in inputs] != [image] and _has_batchnorm(model):
        notes.append(
            f"BatchNorm statistics not re-estimated: the model's inputs {[list(i) for i in inputs]} are not one image "
            f"shaped like data.preprocess makes it {list(image)}"
        )
    elif settings.batchnorm and (inputs is None or [tuple(i) for i in inputs] == [image]):
        count = settings.images
        batch = sample_batch(demo["preprocess"], count, seed)
        layers = reestimate_batchnorm(model, batch, chunk=min(8, max_batch or 8))
        if layers:
            notes.append(f"re-estimated {layers} BatchNorm layer(s) on {count} crops of kiln's sample photographs")
    model.eval()
    if notes:
        log.info("%s: %s", APPLIED, "; ".join(notes))
    return notes
