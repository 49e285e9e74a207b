"""DenseNet-121 in torchvision's exact layout (DenseNet-BC, growth rate 32, bottleneck 4x, compression 0.5).

Parameter names mirror torchvision's state_dict: `features/conv0`, `features/norm0`,
`features/denseblock1/denselayer1/norm1`, ..., `features/transition1/conv`, `features/norm5`, `classifier`.
(torchvision's released .pth uses the legacy names `norm.1`, `conv.2`, ...; `urnet_jax.port` accepts both.)
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers

Array = jax.Array

DENSENET121_BLOCKS = (6, 12, 24, 16)
_TORCHVISION_GROWTH = 32
_BOTTLENECK_FACTOR = 4  # torchvision's bn_size

# torchvision's DenseNet conv init: kaiming_normal_ with its defaults (fan_in, ReLU gain).
_kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _norm_relu_conv(
    x: Array, train: bool, features: int, kernel_size: int, suffix: str, dtype: layers.Dtype
) -> Array:
    """BatchNorm `norm{suffix}` -> ReLU -> conv `conv{suffix}` (padding keeps the size), created in the caller."""
    x = layers.relu(layers.BatchNorm(dtype=dtype, name=f"norm{suffix}")(x, train))
    conv = layers.conv(features, kernel_size, 1, kernel_size // 2, dtype=dtype, kernel_init=_kaiming_fan_in,
                       name=f"conv{suffix}")
    return conv(x)


class DenseLayer(nn.Module):
    """norm1-relu-conv1 (1x1, 4*growth) -> norm2-relu-conv2 (3x3, growth). (N,H,W,C) -> (N,H,W,growth)."""

    growth_rate: int
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = _norm_relu_conv(x, train, _BOTTLENECK_FACTOR * self.growth_rate, 1, "1", self.dtype)
        return _norm_relu_conv(x, train, self.growth_rate, 3, "2", self.dtype)


class DenseBlock(nn.Module):
    """`num_layers` DenseLayers, each fed the concatenation of all earlier outputs.

    (N,H,W,C) -> (N,H,W,C + num_layers*growth).
    """

    num_layers: int
    growth_rate: int
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        features = [x]
        for index in range(self.num_layers):
            layer = DenseLayer(self.growth_rate, self.dtype, name=f"denselayer{index + 1}")
            features.append(layer(jnp.concatenate(features, axis=-1), train))
        return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
    """norm-relu-conv (1x1, `features` channels) -> 2x2 average pool. (N,H,W,C) -> (N,H/2,W/2,features)."""

    features: int
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        return layers.avg_pool(_norm_relu_conv(x, train, self.features, 1, "", self.dtype), 2, 2)


class DenseFeatures(nn.Module):
    """torchvision's `DenseNet.features`: stem, dense blocks with transitions, final BatchNorm `norm5`.

    (N,H,W,3) -> (N,H/32,W/32,C) before the final ReLU.
    """

    growth_rate: int
    block_sizes: Sequence[int]
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        channels = 2 * self.growth_rate  # torchvision's num_init_features
        x = layers.conv(channels, 7, 2, 3, dtype=self.dtype, kernel_init=_kaiming_fan_in, name="conv0")(x)
        x = layers.relu(layers.BatchNorm(dtype=self.dtype, name="norm0")(x, train))
        x = layers.max_pool(x, 3, 2, 1)
        for index, num_layers in enumerate(self.block_sizes):
            x = DenseBlock(num_layers, self.growth_rate, self.dtype, name=f"denseblock{index + 1}")(x, train)
            channels += num_layers * self.growth_rate
            if index != len(self.block_sizes) - 1:
                channels //= 2
                x = Transition(channels, self.dtype, name=f"transition{index + 1}")(x, train)
        return layers.BatchNorm(dtype=self.dtype, name="norm5")(x, train)


class DenseNet(nn.Module):
    """torchvision's DenseNet. (N,H,W,3) ImageNet-normalised -> logits (N, num_classes) float32.

    `growth_rate` is torchvision's (32 for DenseNet-121); the stem has 2*growth_rate channels. The
    Grad-CAM target 'last_conv' is the ReLU of `features` (the map that is average-pooled).
    """

    num_classes: int = 1000
    growth_rate: int = _TORCHVISION_GROWTH
    block_sizes: Sequence[int] = DENSENET121_BLOCKS
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = DenseFeatures(self.growth_rate, self.block_sizes, self.dtype, name="features")(x, train)
        x = layers.relu(x)
        x = layers.mark_gradcam_target(self, x)
        x = layers.global_avg_pool(x)
        x = layers.dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=layers.torch_linear_kernel_init,
            bias_init=nn.initializers.zeros,
            name="classifier",
        )(x)
        return x.astype(jnp.float32)


def densenet121(num_classes: int = 1000, width: int | None = None, dtype: layers.Dtype = None) -> DenseNet:
    """torchvision's densenet121. `width` is the growth rate (torchvision: 32; stem 2*width channels)."""
    return DenseNet(num_classes, width or _TORCHVISION_GROWTH, DENSENET121_BLOCKS, dtype)
