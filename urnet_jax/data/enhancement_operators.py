"""Fixed enhancement operators whose outputs the dynamic enhancer (Sharma et al., CVPR 2018) first learns
to emulate (`urnet_jax.models.dynamic_enhancement`).

Every operator acts on the luminance Y = 0.299 R + 0.587 G + 0.114 B of an image in [0, 1] and the
result replaces Y with Cb, Cr kept (RGB + (Y' - Y) per channel, exactly the YCbCr round trip), as the
dynamic enhancer does; a target the network can reach. Each is a local filter whose weights sum to one
and whose support fits the enhancer's default 5 x 5 dynamic filters (with edge-replicated borders):
  'unsharp_mask'   detail enhancement Y + AMOUNT * (Y - G * Y), G a Gaussian with sigma SHARPEN_SIGMA
                   truncated at 2 sigma (5 x 5);
  'guided_filter'  He et al.'s edge-preserving guided filter with Y as its own guide, box radius
                   GUIDED_RADIUS (3 x 3 boxes, 5 x 5 support), regulariser GUIDED_EPS;
  'bilateral'      scikit-image's `restoration.denoise_bilateral`, 5 x 5 window, range sigma
                   BILATERAL_SIGMA_COLOR, spatial sigma BILATERAL_SIGMA_SPATIAL.
Of the paper's operators, the weighted-least-squares smoothing (a sparse linear solve per image) and
histogram equalisation (a global intensity mapping, not a local filter) are not provided.
All operators are deterministic.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import restoration

from urnet_jax.data.clahe import to_uint8
from urnet_jax.errors import ConfigError, DataError

OPERATORS = ("unsharp_mask", "guided_filter", "bilateral")

SHARPEN_SIGMA = 1.0
SHARPEN_AMOUNT = 1.0
GUIDED_RADIUS = 1
GUIDED_EPS = 0.01  # in squared [0, 1] intensity units
BILATERAL_WINDOW = 5
BILATERAL_SIGMA_COLOR = 0.1
BILATERAL_SIGMA_SPATIAL = 1.0

_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def unsharp_mask(luma: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> sharpened (H, W), not clipped."""
    blurred = ndimage.gaussian_filter(luma, SHARPEN_SIGMA, mode="nearest", truncate=2.0)
    return luma + SHARPEN_AMOUNT * (luma - blurred)


def guided_filter(luma: np.ndarray) -> np.ndarray:
    """Self-guided filter (He, Sun, Tang 2010): (H, W) in [0, 1] -> smoothed (H, W).

    q = mean(a) * I + mean(b), a = var(I) / (var(I) + eps), b = (1 - a) * mean(I), with box means of
    radius GUIDED_RADIUS.
    """

    def box(values: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(values, size=2 * GUIDED_RADIUS + 1, mode="nearest")

    mean = box(luma)
    variance = box(luma * luma) - mean * mean
    a = variance / (variance + GUIDED_EPS)
    b = (1.0 - a) * mean
    return box(a) * luma + box(b)


def bilateral(luma: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> bilateral-filtered (H, W)."""
    return restoration.denoise_bilateral(luma, win_size=BILATERAL_WINDOW, sigma_color=BILATERAL_SIGMA_COLOR,
                                         sigma_spatial=BILATERAL_SIGMA_SPATIAL, mode="edge")


_FUNCTIONS = {"unsharp_mask": unsharp_mask, "guided_filter": guided_filter, "bilateral": bilateral}


def emulation_target(images: np.ndarray, operator: str) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) or (H, W, 3) -> the operator's output on Y with chroma kept, uint8, same shape.

    Raises ConfigError for an unknown operator and DataError unless the input is uint8 with 3 channels.
    """
    if operator not in _FUNCTIONS:
        raise ConfigError(f"unknown enhancement operator {operator!r}; expected one of {', '.join(OPERATORS)}")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise DataError(f"emulation_target expects uint8 RGB images (N, H, W, 3) or (H, W, 3), "
                        f"got {images.dtype} {tuple(images.shape)}")
    if images.ndim == 3:
        return emulation_target(images[None], operator)[0]
    rgb = images.astype(np.float64) / 255.0
    outputs = []
    for image in rgb:
        luma = image @ _LUMA_WEIGHTS
        outputs.append(image + (_FUNCTIONS[operator](luma) - luma)[..., None])
    return to_uint8(np.stack(outputs))
