"""Training-only random augmentation, applied to each example as the training batches are read.

`urnet_jax.data.train_batches(..., data_config=config.data)` applies it; evaluation never does. The keys
of `config.data` (ONLINE_KEYS; none of them changes the prepared data set):
  online_augment  one of the 8 symmetries of the square (identity, 90/180/270-degree rotations, flips,
                  transposes; exact, `augment.apply_augmentation`), drawn uniformly;
  random_scale    () or (low, high): a random zoom about the centre by a factor in [low, high]
                  (`cell_crop.random_scale`; below 1 zooms out, filling with the border colour);
  stain_augment   the scale of the HED stain jitter (`color.hed_jitter`, shift fixed at
                  STAIN_SHIFT); 0 = off, 0.05 is Tellez et al.'s "HED-light";
  color_jitter    random brightness, contrast, hue and gamma (`color.colour_jitter`, its defaults).
Order: zoom, symmetry (geometric: applied alike to the image and to its phase-1 target), stain jitter,
colour jitter (photometric: the image only, the target keeps its colours), then grayscale again when
data.grayscale is set (so a grayscale model only ever sees grayscale).
Seeding: example i of the training split in epoch e draws from np.random.default_rng([seed, e, i, STREAM]),
so an example's augmentation depends on (seed, epoch, index) only -- not on the batch, the process or the
step a run resumed at -- and a resumed run reads bit-identical batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from urnet_jax.data.augment import DIHEDRAL, apply_augmentation
from urnet_jax.data.cell_crop import random_scale
from urnet_jax.data.color import colour_jitter, hed_jitter, to_grayscale

ONLINE_KEYS = ("online_augment", "random_scale", "stain_augment", "color_jitter")
STAIN_SHIFT = 0.005  # hed_jitter's additive range, in scikit-image's stain units
STREAM = 0x6F6E6C  # separates these generators from the other users of (seed, epoch)


@dataclasses.dataclass(frozen=True)
class OnlineAugmentation:
    """The training-only augmentation of a data config (see the module docstring)."""

    symmetries: bool = False
    zoom: tuple[float, float] | None = None
    stain_scale: float = 0.0
    colour: bool = False
    grayscale: bool = False

    @classmethod
    def from_config(cls, data_config: Mapping) -> OnlineAugmentation:
        """From `config.data` (keys it lacks are off)."""
        zoom = tuple(data_config.get("random_scale") or ())
        return cls(symmetries=bool(data_config.get("online_augment", False)),
                   zoom=(float(zoom[0]), float(zoom[1])) if zoom else None,
                   stain_scale=float(data_config.get("stain_augment", 0.0)),
                   colour=bool(data_config.get("color_jitter", False)),
                   grayscale=bool(data_config.get("grayscale", False)))

    @property
    def active(self) -> bool:
        return self.symmetries or self.zoom is not None or self.stain_scale > 0 or self.colour

    def apply(self, image: np.ndarray, target: np.ndarray | None, seed: int, epoch: int,
              index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Training example `index` of `epoch`: uint8 (S, S, 3) image and optional target -> augmented pair."""
        rng = np.random.default_rng([seed, epoch, index, STREAM])
        if self.zoom is not None:
            zoom_seed = int(rng.integers(2**63))  # one draw, the same zoom for the image and its target
            image = random_scale(image, np.random.default_rng(zoom_seed), *self.zoom)
            if target is not None:
                target = random_scale(target, np.random.default_rng(zoom_seed), *self.zoom)
        if self.symmetries:
            name = DIHEDRAL[int(rng.integers(len(DIHEDRAL)))]
            image = apply_augmentation(image, name)
            target = None if target is None else apply_augmentation(target, name)
        if self.stain_scale > 0:
            image = hed_jitter(image, rng, scale=self.stain_scale, shift=STAIN_SHIFT)
        if self.colour:
            image = colour_jitter(image, rng)
        if self.grayscale and (self.stain_scale > 0 or self.colour):
            image = to_grayscale(image)
        return np.ascontiguousarray(image), None if target is None else np.ascontiguousarray(target)
