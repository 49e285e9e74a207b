"""MobileNetV2 in torchvision's exact layout (ReLU6, `_make_divisible` channel rounding, dropout 0.2).

Parameter names are torchvision's with '_' for '.': `features_0_0` (stem conv), `features_0_1` (its
BatchNorm), `features_2/conv_0_0` (a block's expansion conv), ..., `features_18_0`, `classifier_1` (the head).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers

Array = jax.Array

# torchvision's inverted residual setting: expansion t, output channels c, repeats n, first stride s.
MOBILENET_V2_LAYOUT: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280
_ROUND_TO = 8


def make_divisible(value: float, divisor: int = _ROUND_TO) -> int:
    """torchvision's `_make_divisible`: nearest multiple of `divisor` (>= divisor), never below 90% of value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_relu6(
    x: Array,
    train: bool,
    features: int,
    kernel_size: int,
    name: str,
    stride: int = 1,
    groups: int = 1,
    dtype: layers.Dtype = None,
) -> Array:
    """torchvision's Conv2dNormActivation(activation=ReLU6), called inside a compact method: creates the conv
    `{name}_0` and the BatchNorm `{name}_1` in the calling module."""
    padding = (kernel_size - 1) // 2
    x = layers.conv(features, kernel_size, stride, padding, groups=groups, dtype=dtype, name=f"{name}_0")(x)
    return nn.relu6(layers.BatchNorm(dtype=dtype, name=f"{name}_1")(x, train))


class InvertedResidual(nn.Module):
    """Expand (1x1, unless t=1) -> depthwise 3x3 (stride) -> project (1x1, no activation), residual when the
    shapes allow. (N,H,W,Cin) -> (N,H/s,W/s,out_channels)."""

    out_channels: int
    stride: int
    expand_ratio: int
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        in_channels = x.shape[-1]
        hidden = int(round(in_channels * self.expand_ratio))
        out = x
        index = 0  # position in torchvision's `conv` nn.Sequential
        if self.expand_ratio != 1:
            out = _conv_bn_relu6(out, train, hidden, 1, f"conv_{index}", dtype=self.dtype)
            index += 1
        out = _conv_bn_relu6(out, train, hidden, 3, f"conv_{index}", self.stride, hidden, self.dtype)
        out = layers.conv(self.out_channels, 1, dtype=self.dtype, name=f"conv_{index + 1}")(out)
        out = layers.BatchNorm(dtype=self.dtype, name=f"conv_{index + 2}")(out, train)
        if self.stride == 1 and in_channels == self.out_channels:
            return x + out
        return out


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2. (N,H,W,3) ImageNet-normalised -> logits (N, num_classes) float32.

    `width_mult` is torchvision's (channels rounded by `make_divisible`; the last conv keeps 1280 channels
    for width_mult <= 1). Dropout (p=0.2) before the head is active only with train=True, which then needs
    a 'dropout' rng. The Grad-CAM target 'last_conv' is the output of the last 1x1 conv block (`features_18`).
    """

    num_classes: int = 1000
    width_mult: float = 1.0
    layout: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_LAYOUT
    dropout_rate: float = 0.2
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = _conv_bn_relu6(x, train, make_divisible(_STEM_CHANNELS * self.width_mult), 3, "features_0", 2,
                           dtype=self.dtype)
        index = 1  # position in torchvision's `features` nn.Sequential
        for expand_ratio, channels, repeats, first_stride in self.layout:
            out_channels = make_divisible(channels * self.width_mult)
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                x = InvertedResidual(out_channels, stride, expand_ratio, self.dtype, name=f"features_{index}")(
                    x, train
                )
                index += 1
        last_channels = make_divisible(_LAST_CHANNELS * max(1.0, self.width_mult))
        x = _conv_bn_relu6(x, train, last_channels, 1, f"features_{index}", dtype=self.dtype)
        x = layers.mark_gradcam_target(self, x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(layers.global_avg_pool(x))
        x = layers.dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.zeros,
            name="classifier_1",
        )(x)
        return x.astype(jnp.float32)


def mobilenet_v2(num_classes: int = 1000, width: int | None = None, dtype: layers.Dtype = None) -> MobileNetV2:
    """torchvision's mobilenet_v2. `width` is the stem's channel count (torchvision: 32), i.e. torchvision's
    width_mult = width / 32 (so width=8 is mobilenet_v2(width_mult=0.25))."""
    return MobileNetV2(num_classes, (width or _STEM_CHANNELS) / _STEM_CHANNELS, dtype=dtype)
