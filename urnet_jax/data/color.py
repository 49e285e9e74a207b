"""Colour and stain: random augmentation for training, a per-image normalisation, grayscale input.

Every function maps a uint8 (H, W, 3) RGB image to a uint8 (H, W, 3) image; every random one draws
from the numpy Generator it is given, so a seed fixes its result.

Augmentation (training only):
  * `hed_jitter`: stain augmentation in the haematoxylin-eosin-DAB space (scikit-image's `rgb2hed`
    transform and stain matrices, after Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 23 (2001)
    291-299, but without `rgb2hed`'s clipping of negative stain amounts, so that no jitter is the
    identity):
    each stain channel s becomes s * a + b with a ~ U(1 - scale, 1 + scale), b ~ U(-shift, shift), as
    in Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference
    to train distilled stain-invariant convolutional networks", IEEE TMI 37 (2018) 2126-2136, and
    Tellez et al., "Quantifying the effects of data augmentation and stain color normalization in
    convolutional neural networks for computational pathology", Med. Image Anal. 58 (2019) 101544
    (their "HED-light" is scale = 0.05). `shift` is in scikit-image's stain units (a stained nucleus
    is about 0.05-0.1 in the H channel).
  * `colour_jitter`: brightness, contrast, hue and gamma, with torchvision's ColorJitter meanings for
    the first three (brightness multiplies, contrast blends with the mean grey level, hue rotates the
    HSV hue by a fraction of a turn) plus a gamma curve x ** g.
Normalisation (`normalise_colour`, the same at train and test time, no randomness):
  * 'reinhard': each image's CIELAB channels are standardised to the fixed mean and standard
    deviation LAB_TARGET_MEAN / LAB_TARGET_STD (Reinhard, Ashikhmin, Gooch, Shirley, "Color transfer
    between images", IEEE CG&A 21 (2001) 34-41, with CIELAB for their l-alpha-beta space, as in
    stain normalisation practice);
  * 'standardise': each image's RGB channels are standardised to RGB_TARGET_MEAN / RGB_TARGET_STD.
  The targets are the average per-image statistics of cell-centred crops (`cell_crop`) of 300 stained
  PBC training images, so a PBC image changes little and another lab's is mapped towards PBC's
  colours. Both match whole-image statistics: they work best when the images are framed alike
  (use them after the cell crop).
Grayscale (`to_grayscale`): ITU-R BT.601 luma (Pillow's "L" conversion) in all three channels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from skimage.color import hed_from_rgb, hsv2rgb, lab2rgb, rgb2hsv, rgb2lab, rgb_from_hed

from urnet_jax.errors import ConfigError, DataError

LAB_TARGET_MEAN = (77.5, 12.2, 5.5)  # L*, a*, b*
LAB_TARGET_STD = (17.7, 10.5, 16.6)
RGB_TARGET_MEAN = (217.5, 184.4, 181.3)  # R, G, B in 0..255
RGB_TARGET_STD = (45.1, 52.3, 20.4)
_MIN_INTENSITY = 1e-6  # scikit-image's floor on intensities before the logarithm of the stain transform
_MIN_STD = 1e-3  # a flat channel is shifted to the target mean, not stretched


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (values outside are clipped) -> uint8 (rounded)."""
    return np.round(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8)


def hed_jitter(image: np.ndarray, rng: np.random.Generator, scale: float = 0.05, shift: float = 0.005) -> np.ndarray:
    """Random stain augmentation in HED space (see module doc): uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    _check_rgb(image)
    factors = rng.uniform(1 - scale, 1 + scale, size=3)
    offsets = rng.uniform(-shift, shift, size=3)
    density = np.log(np.maximum(image / 255.0, _MIN_INTENSITY)) / np.log(_MIN_INTENSITY)  # rgb2hed's scaling
    stains = (density @ hed_from_rgb) * factors + offsets
    return _to_uint8(np.exp((stains @ rgb_from_hed) * np.log(_MIN_INTENSITY)))


def colour_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.2, contrast: float = 0.2,
                  hue: float = 0.02, gamma: float = 0.2) -> np.ndarray:
    """Random brightness, contrast, hue and gamma (see module doc), applied in that order.

    Factors are drawn uniformly: brightness and contrast from [1 - x, 1 + x], the hue shift from
    [-hue, hue] turns, the gamma exponent from [1 - gamma, 1 + gamma]; 0 turns a step off.
    uint8 (H, W, 3) -> uint8 (H, W, 3).
    """
    _check_rgb(image)
    brightness_factor, contrast_factor, gamma_exponent = rng.uniform(
        [1 - brightness, 1 - contrast, 1 - gamma], [1 + brightness, 1 + contrast, 1 + gamma])
    hue_shift = rng.uniform(-hue, hue)
    unit = np.clip(image / 255.0 * brightness_factor, 0.0, 1.0)
    grey_mean = float(np.mean(unit @ np.array([0.299, 0.587, 0.114])))
    unit = np.clip(grey_mean + contrast_factor * (unit - grey_mean), 0.0, 1.0)
    if hue_shift:
        hsv = rgb2hsv(unit)
        hsv[..., 0] = (hsv[..., 0] + hue_shift) % 1.0
        unit = hsv2rgb(hsv)
    return _to_uint8(unit**gamma_exponent)


def _standardise(channels: np.ndarray, target_mean: tuple[float, ...], target_std: tuple[float, ...]) -> np.ndarray:
    """(H, W, C) float -> each channel shifted and scaled to the target mean and standard deviation."""
    mean = channels.mean(axis=(0, 1))
    std = channels.std(axis=(0, 1))
    gain = np.where(std > _MIN_STD, np.asarray(target_std) / np.maximum(std, _MIN_STD), 1.0)
    return (channels - mean) * gain + np.asarray(target_mean)


def reinhard_normalise(image: np.ndarray) -> np.ndarray:
    """Per-image CIELAB standardisation to LAB_TARGET_MEAN/STD (Reinhard et al. 2001): uint8 -> uint8."""
    _check_rgb(image)
    return _to_uint8(lab2rgb(_standardise(rgb2lab(image), LAB_TARGET_MEAN, LAB_TARGET_STD)))


def rgb_standardise(image: np.ndarray) -> np.ndarray:
    """Per-image RGB standardisation to RGB_TARGET_MEAN/STD: uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    _check_rgb(image)
    return _to_uint8(_standardise(image.astype(np.float64), RGB_TARGET_MEAN, RGB_TARGET_STD) / 255)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in three equal channels: uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    _check_rgb(image)
    luma = np.asarray(Image.fromarray(image).convert("L"))
    return np.repeat(luma[..., None], 3, axis=-1)


COLOUR_NORMALISATIONS: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {
    "none": None,
    "reinhard": reinhard_normalise,
    "standardise": rgb_standardise,
}


def normalise_colour(image: np.ndarray, method: str) -> np.ndarray:
    """The per-image colour normalisation `method` (a key of COLOUR_NORMALISATIONS; 'none' returns the
    image unchanged): uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    if method not in COLOUR_NORMALISATIONS:
        raise ConfigError(f"unknown colour normalisation {method!r}; choose from {sorted(COLOUR_NORMALISATIONS)}")
    normalise = COLOUR_NORMALISATIONS[method]
    return image if normalise is None else normalise(image)
