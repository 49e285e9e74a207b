"""ResUNet (UNet with residual blocks; the UR-Net paper's unmodified enhancer, its ablation Net2)."""

from __future__ import annotations

from urnet_jax.models.enhancer_blocks import UShapedEnhancer


class ResUNet(UShapedEnhancer):
    """UNet whose double convs are residual blocks (identity or 1x1-conv + norm projection shortcut),
    with 2x2 max pooling down, ReLU, plain skip concatenation and 2x2 transposed conv up.
    Layer-by-layer layout and arguments: `enhancer_blocks.UShapedEnhancer`.

    ResUNet(width=64, depth=4, norm='batch', output_activation='sigmoid', residual_blocks=True,
    downsampling='max_pool', leaky_slope=0.0, skip_conv=False, se_ratio=0, dtype=None) (pass keywords).
    downsampling='strided_conv', leaky_slope > 0, skip_conv=True and se_ratio > 0 switch on
    UR-Net's modifications one at a time (for ablations); `URNetEnhancer` has all four on.
    """

    residual_blocks: bool = True
