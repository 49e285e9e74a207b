"""VGG16 and VGG16-BN in torchvision's exact layout.

Parameter names are torchvision's `nn.Sequential` indices with '_' for '.': `features_0` (first conv),
`features_1` (its BatchNorm in VGG16-BN), ..., `classifier_0`, `classifier_3`, `classifier_6` (the head).
The flatten before `classifier_0` is NHWC (torch flattens NCHW); `urnet_jax.port` reorders that kernel's rows.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers

Array = jax.Array

# torchvision's configuration "D": conv output channels, "M" = 2x2 max pool with stride 2.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
)
_TORCHVISION_WIDTH = 64  # channels of the first conv
_HIDDEN = 4096  # classifier hidden units at torchvision's width
POOLED_SIZE = (7, 7)  # AdaptiveAvgPool2d((7, 7)) before the classifier

_linear_init = {"kernel_init": nn.initializers.normal(0.01), "bias_init": nn.initializers.zeros}


class VGG(nn.Module):
    """torchvision's VGG. (N,H,W,3) ImageNet-normalised -> logits (N, num_classes) float32.

    `width` is the first conv's channel count (torchvision: 64); every conv and the two hidden Linear
    layers (4096) scale by width / 64. Dropout (p=0.5) is active only with train=True, which then needs a
    'dropout' rng. The Grad-CAM target 'last_conv' is the last conv's ReLU output (before the final pool).
    """

    layout: Sequence[int | str] = VGG16_LAYOUT
    batch_norm: bool = False
    num_classes: int = 1000
    width: int = _TORCHVISION_WIDTH
    dropout_rate: float = 0.5
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        last_conv_index = max(i for i, v in enumerate(self.layout) if v != "M")
        torch_index = 0  # position in torchvision's `features` nn.Sequential
        for i, value in enumerate(self.layout):
            if value == "M":
                x = layers.max_pool(x, 2, 2)
                torch_index += 1
                continue
            channels = value * self.width // _TORCHVISION_WIDTH
            x = layers.conv(channels, 3, 1, 1, use_bias=True, dtype=self.dtype, name=f"features_{torch_index}")(x)
            if self.batch_norm:
                x = layers.BatchNorm(dtype=self.dtype, name=f"features_{torch_index + 1}")(x, train)
            x = layers.relu(x)
            torch_index += 3 if self.batch_norm else 2
            if i == last_conv_index:
                x = layers.mark_gradcam_target(self, x)
        x = layers.adaptive_avg_pool(x, POOLED_SIZE)
        x = x.reshape(x.shape[0], -1)
        hidden = _HIDDEN * self.width // _TORCHVISION_WIDTH
        for index in (0, 3):
            x = layers.dense(hidden, dtype=self.dtype, name=f"classifier_{index}", **_linear_init)(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(layers.relu(x))
        x = layers.dense(self.num_classes, dtype=self.dtype, name="classifier_6", **_linear_init)(x)
        return x.astype(jnp.float32)


def vgg16(num_classes: int = 1000, width: int | None = None, dtype: layers.Dtype = None) -> VGG:
    """torchvision's vgg16 (138,357,544 parameters with 1000 classes)."""
    return VGG(VGG16_LAYOUT, False, num_classes, width or _TORCHVISION_WIDTH, dtype=dtype)


def vgg16_bn(num_classes: int = 1000, width: int | None = None, dtype: layers.Dtype = None) -> VGG:
    """torchvision's vgg16_bn (a BatchNorm after every conv)."""
    return VGG(VGG16_LAYOUT, True, num_classes, width or _TORCHVISION_WIDTH, dtype=dtype)
