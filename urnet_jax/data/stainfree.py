"""The stain-free *proxy*: a documented, deterministic degradation of stained images.

No public stain-free white-blood-cell data set with the paper's classes exists, so the project
imitates the unstained brightfield condition by degrading the stained PBC images. This is a proxy,
not stain-free data: it removes colour and contrast, but cannot reproduce how unstained cells look.

Steps, on float images in [0, 1] (parameters drawn per image from the ranges in `PROXY_RANGES`,
with a random generator seeded by the image's sha256, so a given file always gets the same result):
1. grayscale: luminance 0.299 R + 0.587 G + 0.114 B (the stain colour is gone);
2. compressed contrast: level + contrast * (gray - mean(gray)), i.e. deviations from the mean
   shrunk to 15-35 % around a mid-gray level of 0.45-0.65;
3. slight defocus: Gaussian blur with sigma 1.0-2.0 px at 200 px (scaled with the image size);
4. uneven illumination: multiplied by 1 + f, f a smooth field (a linear ramp plus three cosines of
   at most one cycle per image) scaled to a peak-to-peak amplitude of 10-30 %;
5. sensor noise: additive Gaussian noise, standard deviation 0.01-0.03;
then clipped, quantised to uint8 and copied into three equal channels (the models take RGB).
The same ranges apply to the train and test splits: it is the imaging condition, not augmentation.

The *severe* proxy (`severe_proxy`) is the same degradation with harsher ranges (`SEVERE_RANGES`: contrast
5-12 %, defocus sigma 2.5-4 px at 200 px, illumination 20-40 %, noise 0.03-0.06): much lower contrast,
stronger blur and noise. Its contrast, blur and noise ranges are config knobs (`data.severe_contrast`,
`data.severe_blur_sigma`, `data.severe_noise_std`), to be tuned on the validation split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

VARIANTS = ("raw", "stainfree_proxy", "severe_proxy")


@dataclasses.dataclass(frozen=True)
class ProxyRanges:
    """Uniform ranges (low, high) of the per-image degradation parameters."""

    contrast: tuple[float, float] = (0.15, 0.35)  # factor on deviations from the mean gray level
    level: tuple[float, float] = (0.45, 0.65)  # mean gray level after compression, [0, 1]
    blur_sigma: tuple[float, float] = (1.0, 2.0)  # Gaussian defocus, pixels at 200 px
    illumination: tuple[float, float] = (0.10, 0.30)  # peak-to-peak relative amplitude of the field
    noise_std: tuple[float, float] = (0.01, 0.03)  # additive Gaussian noise, [0, 1] units


PROXY_RANGES = ProxyRanges()
SEVERE_RANGES = ProxyRanges(contrast=(0.05, 0.12), blur_sigma=(2.5, 4.0), illumination=(0.20, 0.40),
                            noise_std=(0.03, 0.06))
_REFERENCE_SIZE = 200  # pixels at which blur_sigma is given


def _illumination_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth field (H, W) with zero mean and peak-to-peak 1 (low spatial frequencies only)."""
    y = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    x = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    field = np.float32(np.cos(angle)) * x + np.float32(np.sin(angle)) * y
    for _ in range(3):
        frequency = rng.uniform(0.2, 1.0)
        direction = rng.uniform(0, 2 * np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        weight = rng.uniform(0.2, 0.6)
        wave_x, wave_y = (np.float32(2 * np.pi * frequency * f(direction)) for f in (np.cos, np.sin))
        field = field + np.float32(weight) * np.cos(wave_x * x + wave_y * y + np.float32(phase))
    field = field - field.mean()
    return field / max(float(field.max() - field.min()), 1e-6)


def stainfree_proxy(image: np.ndarray, sha256: str, ranges: ProxyRanges = PROXY_RANGES) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> the stain-free proxy, uint8 (H, W, 3) with three equal channels.

    Deterministic: the parameters and the noise come from a generator seeded by `sha256` (the hex
    digest of the source file), see the module docstring.
    """
    rng = np.random.default_rng(int(sha256, 16))
    contrast, level, blur_sigma, illumination, noise_std = (
        rng.uniform(*getattr(ranges, field.name)) for field in dataclasses.fields(ranges))
    height, width = image.shape[:2]
    rgb = image.astype(np.float32) / 255.0
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gray = level + contrast * (gray - gray.mean())
    gray = ndimage.gaussian_filter(gray, sigma=blur_sigma * height / _REFERENCE_SIZE, mode="reflect")
    gray = gray * (1.0 + illumination * _illumination_field(rng, height, width))
    gray = gray + rng.normal(0.0, noise_std, size=gray.shape).astype(np.float32)
    gray_u8 = np.round(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(gray_u8[..., None], 3, axis=-1)


def severe_proxy(image: np.ndarray, sha256: str, ranges: ProxyRanges = SEVERE_RANGES) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> the severe stain-free proxy (see the module docstring): `stainfree_proxy`
    with `SEVERE_RANGES` by default, deterministic per sha256."""
    return stainfree_proxy(image, sha256, ranges)


def severe_ranges(data_config: Mapping) -> ProxyRanges:
    """SEVERE_RANGES with the contrast, blur and noise ranges of `config.data` (severe_contrast, ...)."""
    return dataclasses.replace(SEVERE_RANGES, contrast=tuple(data_config["severe_contrast"]),
                               blur_sigma=tuple(data_config["severe_blur_sigma"]),
                               noise_std=tuple(data_config["severe_noise_std"]))


def apply_variant(image: np.ndarray, sha256: str, data_config: Mapping) -> np.ndarray:
    """The imaging condition `data.variant` (one of VARIANTS) applied to a uint8 RGB (H, W, 3) image."""
    variant = data_config["variant"]
    if variant == "raw":
        return image
    if variant == "stainfree_proxy":
        return stainfree_proxy(image, sha256)
    if variant == "severe_proxy":
        return severe_proxy(image, sha256, severe_ranges(data_config))
    raise ValueError(f"unknown data variant {variant!r}")
