"""The deterministic per-image transforms applied to every image that reaches a model.

`model_input(image, data_config)` is the one entry point: `prepare` applies it to every image of the
train, validation and test splits, and inference / external evaluation apply it to every image read
from a folder (`model_input(load_image(path), config.data)`), so a model always sees its inputs made
the same way. It runs, in this order:
  1. framing (`frame`): `data.crop` = "none" resizes the whole frame to data.image_size (bicubic, the
     aspect ratio not kept); "cell" takes the cell-centred square of `data.crop_scale` x the nucleus's
     diameter (`urnet_jax.data.cell_crop`, with its documented centre-crop fallback when no cell is found);
  2. finishing (`finish`): `data.color_norm` ("none" | "reinhard" | "standardise", `urnet_jax.data.color`),
     then `data.preprocessing` ("none" | "clahe": `urnet_jax.data.clahe` with `data.clahe_clip_limit` and
     `data.clahe_kernel_size`), then `data.grayscale`.
`prepare` inserts the data variant's degradation (the stain-free proxies) between the two steps: the
cell is found on the stained image, and the degraded image is finished like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from urnet_jax.data.cell_crop import cell_crop
from urnet_jax.data.clahe import ClaheParameters, clahe
from urnet_jax.data.color import normalise_colour, to_grayscale
from urnet_jax.data.images import resize_square
from urnet_jax.errors import ConfigError, DataError

CROPS = ("none", "cell")
PREPROCESSINGS = ("none", "clahe")
# The keys read here and their defaults (those of urnet_jax.config.base_config), so that a run saved
# before a key existed reads as it was trained.
_DEFAULTS = {"image_size": 200, "crop": "none", "crop_scale": 2.5, "preprocessing": "none",
             "clahe_clip_limit": 0.01, "clahe_kernel_size": 0, "color_norm": "none", "grayscale": False}


@dataclasses.dataclass(frozen=True)
class Framed:
    """A framed image, uint8 (S, S, 3), and whether the cell crop fell back to a centre crop."""

    image: np.ndarray
    used_fallback: bool = False


def _setting(data_config: Mapping, key: str):
    value = data_config.get(key, _DEFAULTS[key])
    return _DEFAULTS[key] if value is None else value


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"model_input expects a uint8 (H, W, 3) image, got "
                        f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")


def frame(image: np.ndarray, data_config: Mapping) -> Framed:
    """Step 1: uint8 (H, W, 3) at any size -> the framed uint8 (S, S, 3), S = data.image_size."""
    _check_image(image)
    size, crop = int(_setting(data_config, "image_size")), _setting(data_config, "crop")
    if crop == "none":
        return Framed(resize_square(image, size))
    if crop == "cell":
        cropped = cell_crop(image, size, float(_setting(data_config, "crop_scale")))
        return Framed(cropped.image, cropped.used_fallback)
    raise ConfigError(f"data.crop must be one of {', '.join(CROPS)}, got {crop!r}")


def finish(image: np.ndarray, data_config: Mapping) -> np.ndarray:
    """Step 2: colour normalisation, preprocessing and grayscale of a framed uint8 (S, S, 3) image."""
    image = normalise_colour(image, _setting(data_config, "color_norm"))
    preprocessing = _setting(data_config, "preprocessing")
    if preprocessing == "clahe":
        kernel_size = int(_setting(data_config, "clahe_kernel_size"))
        image = clahe(image, ClaheParameters(kernel_size=kernel_size or None,
                                             clip_limit=float(_setting(data_config, "clahe_clip_limit"))))
    elif preprocessing != "none":
        raise ConfigError(f"data.preprocessing must be one of {', '.join(PREPROCESSINGS)}, got {preprocessing!r}")
    return to_grayscale(image) if _setting(data_config, "grayscale") else image


def model_input(image: np.ndarray, data_config: Mapping) -> np.ndarray:
    """uint8 (H, W, 3) at any size -> uint8 (S, S, 3), S = data.image_size: the image as a model sees it
    (framing then finishing, see the module docstring). data_config is `config.data` (or a dict of it);
    keys it lacks take their defaults. Deterministic."""
    return finish(frame(image, data_config).image, data_config)
