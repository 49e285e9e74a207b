"""The UR-Net enhancer: ResUNet with the paper's four modifications (Zheng et al., Sensors 2023, sec. 3.2)."""

from __future__ import annotations

from urnet_jax.models.resunet import ResUNet


class URNetEnhancer(ResUNet):
    """ResUNet with (1) pooling replaced by strided convs ('down{l}_strided_conv': 3x3, stride 2,
    padding 1, + norm + LeakyReLU, halving the map to ceil(size / 2)); (2) LeakyReLU in every conv
    block and strided conv (`leaky_slope`, torch's default 0.01; the SE bottleneck keeps its ReLU);
    (3) a 1x1 conv on every skip before concatenation ('skip{l}_1x1'); (4) a squeeze-and-excitation
    block before every transposed conv ('up{l}_se', reduction `se_ratio`, the SE paper's 16).
    Layer-by-layer layout: `enhancer_blocks.UShapedEnhancer`.

    URNetEnhancer(width=64, depth=4, norm='batch', output_activation='sigmoid', residual_blocks=True,
    downsampling='strided_conv', leaky_slope=0.01, skip_conv=True, se_ratio=16, dtype=None)
    (pass keywords). Its SE blocks use `SqueezeExcitation`'s default min_hidden (4).
    """

    downsampling: str = "strided_conv"
    leaky_slope: float = 0.01
    skip_conv: bool = True
    se_ratio: int = 16
