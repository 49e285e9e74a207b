"""UNet (Ronneberger et al., 2015) as an image enhancer: image in [0, 1] -> same-size image in [0, 1]."""

from __future__ import annotations

from urnet_jax.models.enhancer_blocks import UShapedEnhancer


class UNet(UShapedEnhancer):
    """Classic UNet: per level two 3x3 conv + norm + ReLU, 2x2 max pooling down, 2x2 transposed conv up,
    skip concatenation. Layer-by-layer layout and arguments: `enhancer_blocks.UShapedEnhancer`.

    UNet(width=64, depth=4, norm='batch', output_activation='sigmoid', residual_blocks=False,
    downsampling='max_pool', leaky_slope=0.0, skip_conv=False, se_ratio=0, dtype=None) (pass keywords).
    """

    residual_blocks: bool = False
