"""Contrast-limited adaptive histogram equalisation (CLAHE), the fixed enhancement of Shahzad et al. 2021.

A thin wrapper of scikit-image's `exposure.equalize_adapthist` (Zuiderveld's CLAHE) for uint8 RGB images.
On an RGB image scikit-image equalises the V channel of HSV and converts back, so hue and saturation
are kept: equalising R, G and B separately would change the colour balance of every region differently.
On the stain-free proxy (three equal channels) V is the grey level, so both choices coincide there.
Parameters (scikit-image's, with its defaults):
  kernel_size  tile size in pixels (int or (h, w)); None = 1/8 of the image height and width;
  clip_limit   in (0, 1]: the histogram clip as a fraction of the tile's pixels (higher: more contrast);
  nbins        histogram bins.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from skimage import exposure

from urnet_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class ClaheParameters:
    """`equalize_adapthist` parameters (see the module docstring)."""

    kernel_size: int | tuple[int, int] | None = None
    clip_limit: float = 0.01
    nbins: int = 256


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, rounded to the nearest level."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def clahe(images: np.ndarray, parameters: ClaheParameters = ClaheParameters()) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) or (H, W, 3) -> CLAHE-equalised uint8 of the same shape, image by image.

    Raises DataError unless the input is uint8 with 3 channels.
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise DataError(f"clahe expects uint8 RGB images (N, H, W, 3) or (H, W, 3), "
                        f"got {images.dtype} {tuple(images.shape)}")
    if images.ndim == 3:
        return clahe(images[None], parameters)[0]
    return np.stack([
        to_uint8(exposure.equalize_adapthist(image, kernel_size=parameters.kernel_size,
                                             clip_limit=parameters.clip_limit, nbins=parameters.nbins))
        for image in images
    ])
