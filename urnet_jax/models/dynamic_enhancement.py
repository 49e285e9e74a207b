"""Classification-driven dynamic enhancement (Sharma, Diba, Neven, Brown, Van Gool, Stiefelhagen, CVPR 2018)
as an image enhancer: image (N, H, W, 3) in [0, 1] -> same-size image in [0, 1].

A filter-generating encoder-decoder looks at the image's luminance Y (BT.601 / JPEG YCbCr) and
predicts, for every pixel, a k x k filter; the dynamic local filtering layer applies each pixel's own
filter to the k x k neighbourhood of Y around it; the enhanced Y' is recombined with the image's
unchanged chroma (Cb, Cr) and converted back to RGB. The filters therefore vary per pixel and per image.
The paper first trains the network to emulate fixed enhancement operators (see
`urnet_jax.data.enhancement_operators`), then end to end with the classifier.

Choices where the paper is not specific enough to rebuild it, exposed as constructor arguments:
  * the filter-generating network is the library's U-shaped encoder-decoder pieces: `depth` levels of
    two 3x3 convs (`width * 2**l` channels), 3x3 stride-2 convs down, 2x2 transposed convs up with skip
    concatenation, BatchNorm and LeakyReLU(0.01); a 1x1 'filter_head' gives k * k raw weights per pixel.
    The head starts at zero, so training starts from the identity ('unit_sum') or a box blur ('softmax');
  * `filter_normalization`: 'unit_sum' (default) w = delta + (raw - mean(raw)): weights sum to one, so
    mean brightness is kept and both smoothing and sharpening (negative weights) are expressible;
    'softmax' w = softmax(raw): positive weights summing to one, smoothing only (dynamic filter
    networks' usual choice);
  * borders: Y is padded by repeating edge pixels (no dark frame from zero padding);
  * `kernel_size` (default 5): large enough for the emulation operators at their default settings.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers
from urnet_jax.models.enhancer_blocks import (
    NORMS,
    ConvBlock,
    ConvNormAct,
    UpConv2x2,
    check_choice,
    check_image,
    match_size,
)

Array = jax.Array

FILTER_NORMALIZATIONS = ("unit_sum", "softmax")
# BT.601 luma weights, the first row of JPEG's RGB -> YCbCr matrix.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def luminance(rgb: Array) -> Array:
    """Y of JPEG YCbCr: (..., 3) RGB in [0, 1] -> (...) in [0, 1]."""
    return rgb @ jnp.asarray(LUMA_WEIGHTS, rgb.dtype)


def replace_luminance(rgb: Array, new_luminance: Array) -> Array:
    """RGB with its Y replaced by `new_luminance` and its Cb, Cr kept: (..., 3), (...) -> (..., 3).

    In JPEG YCbCr the Cb and Cr rows of the RGB -> YCbCr matrix sum to zero and the Y row to one, so
    grey (1, 1, 1) maps to (1, 0, 0) and the inverse matrix's Y column is (1, 1, 1): converting to
    YCbCr, replacing Y and converting back is exactly rgb + (new_luminance - Y) on every channel.
    Not clipped.
    """
    return rgb + (new_luminance - luminance(rgb))[..., None]


def neighbourhoods(image: Array, kernel_size: int) -> Array:
    """The k x k neighbourhood of every pixel, edge-padded: (N, H, W) -> (N, H, W, k * k).

    Entry [n, i, j, a * k + b] is image[n, i + a - k // 2, j + b - k // 2] (indices clamped to the image).
    """
    radius = kernel_size // 2
    height, width = image.shape[1:3]
    padded = jnp.pad(image, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    return jnp.stack([padded[:, a:a + height, b:b + width] for a in range(kernel_size) for b in range(kernel_size)],
                     axis=-1)


def apply_dynamic_filters(image: Array, filters: Array) -> Array:
    """The dynamic local filtering layer: out[n, i, j] = sum_t filters[n, i, j, t] * neighbourhoods(image)[n, i, j, t].

    image (N, H, W); filters (N, H, W, k * k) with k odd -> (N, H, W).
    """
    kernel_size = round(filters.shape[-1] ** 0.5)
    return jnp.sum(neighbourhoods(image, kernel_size) * filters.astype(image.dtype), axis=-1)


def normalize_filters(raw: Array, kind: str) -> Array:
    """Raw per-pixel weights (..., k * k) -> filters whose weights sum to one (see the module docstring)."""
    if kind == "softmax":
        return jax.nn.softmax(raw, axis=-1)
    taps = raw.shape[-1]
    identity = jnp.zeros((taps,), raw.dtype).at[taps // 2].set(1.0)
    return identity + raw - jnp.mean(raw, axis=-1, keepdims=True)


class DynamicEnhancer(nn.Module):
    """Per-pixel dynamic filtering of the luminance. (N, H, W, 3) in [0, 1] -> (N, H, W, 3) in [0, 1], float32.

    Needs H, W >= 2**depth. Sows the normalised filters (N, H, W, k * k), float32, as
    `intermediates/filters`. Submodules, in call order:
      'down0_block'                    ConvBlock(width) on Y (N, H, W, 1);
      for l = 1..depth: 'down{l}_strided_conv' (3x3, stride 2), 'down{l}_block' ConvBlock(width * 2**l);
      for l = depth-1..0: 'up{l}_transpose' UpConv2x2(width * 2**l), `match_size`,
                          'up{l}_block' ConvBlock(width * 2**l) on concat([skip, upsampled]);
      'filter_head'                    1x1 conv to k * k raw weights (zero-initialised).
    """

    width: int = 16
    depth: int = 3
    kernel_size: int = 5
    filter_normalization: str = "unit_sum"
    norm: str = "batch"
    leaky_slope: float = 0.01
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """(N, H, W, 3) RGB in [0, 1] -> enhanced RGB (N, H, W, 3) in [0, 1], float32."""
        model_name = type(self).__name__
        check_choice(f"{model_name} norm", self.norm, NORMS)
        check_choice(f"{model_name} filter_normalization", self.filter_normalization, FILTER_NORMALIZATIONS)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{model_name}: kernel_size must be odd and >= 1, got {self.kernel_size}")
        check_image(x, self.depth, model_name)
        if x.shape[-1] != 3:
            raise ValueError(f"{model_name} expects RGB images (N, H, W, 3), got shape {tuple(x.shape)}")

        def block(level: int, name: str) -> ConvBlock:
            return ConvBlock(self.width * 2**level, False, self.norm, self.leaky_slope, self.dtype, name=name)

        rgb = x.astype(jnp.float32)
        luma = luminance(rgb)
        h = block(0, "down0_block")(luma[..., None].astype(self.dtype or jnp.float32), train)
        skips = []
        for level in range(1, self.depth + 1):
            skips.append(h)
            h = ConvNormAct(h.shape[-1], 3, 2, 1, self.norm, True, self.leaky_slope, self.dtype,
                            name=f"down{level}_strided_conv")(h, train)
            h = block(level, f"down{level}_block")(h, train)
        for level in reversed(range(self.depth)):
            skip = skips[level]
            h = UpConv2x2(self.width * 2**level, self.dtype, name=f"up{level}_transpose")(h)
            h = match_size(h, skip.shape[1], skip.shape[2])
            h = block(level, f"up{level}_block")(jnp.concatenate([skip, h.astype(skip.dtype)], axis=-1), train)
        raw = layers.conv(self.kernel_size**2, 1, use_bias=True, dtype=self.dtype,
                          kernel_init=nn.initializers.zeros, name="filter_head")(h)
        filters = normalize_filters(raw.astype(jnp.float32), self.filter_normalization)
        self.sow("intermediates", "filters", filters)
        enhanced_luma = apply_dynamic_filters(luma, filters)
        return jnp.clip(replace_luminance(rgb, enhanced_luma), 0.0, 1.0)
