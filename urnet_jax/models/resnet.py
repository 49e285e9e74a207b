"""ResNet-18/34/50/101/152 in torchvision's exact layout (V1.5: the bottleneck's stride is on its 3x3 conv).

Parameter names mirror torchvision's state_dict with '.' before an index written as '_':
`conv1`, `bn1`, `layer3_22/conv2`, `layer1_0/downsample_0` (conv), `layer1_0/downsample_1` (BatchNorm, or
GroupNorm), `fc`.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers

Array = jax.Array


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34). (N,H,W,Cin) -> (N,H/s,W/s,planes)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: layers.Dtype = None
    norm: str = "batch"
    num_groups: int = 32

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        out = layers.conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv1")(x)
        out = layers.relu(_norm(self, "bn1")(out, train))
        out = layers.conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
        out = _norm(self, "bn2")(out, train)
        return layers.relu(out + _shortcut(self, x, train))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, V1.5) -> 1x1 (x4 channels) with a residual connection (ResNet-50/101/152).

    (N,H,W,Cin) -> (N,H/s,W/s,4*planes).
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: layers.Dtype = None
    norm: str = "batch"
    num_groups: int = 32

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        out = layers.conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = layers.relu(_norm(self, "bn1")(out, train))
        out = layers.conv(self.planes, 3, self.stride, 1, dtype=self.dtype, name="conv2")(out)
        out = layers.relu(_norm(self, "bn2")(out, train))
        out = layers.conv(self.planes * self.expansion, 1, dtype=self.dtype, name="conv3")(out)
        out = _norm(self, "bn3")(out, train)
        return layers.relu(out + _shortcut(self, x, train))


def _shortcut(block: BasicBlock | Bottleneck, x: Array, train: bool) -> Array:
    """The block's identity, or torchvision's `downsample` (1x1 strided conv + norm) when it has one."""
    if not block.downsample:
        return x
    out = layers.conv(block.planes * block.expansion, 1, block.stride, dtype=block.dtype, name="downsample_0")(x)
    return _norm(block, "downsample_1")(out, train)


def _norm(module: BasicBlock | Bottleneck | ResNet, name: str) -> nn.Module:
    """The module's normalisation layer (`norm`, `num_groups`, `dtype`) named `name`."""
    return layers.norm_layer(module.norm, num_groups=module.num_groups, dtype=module.dtype, name=name)


class ResNet(nn.Module):
    """torchvision's ResNet. (N,H,W,3) ImageNet-normalised -> logits (N, num_classes) float32.

    `width` is the channel count of the first stage (torchvision: 64); stage i has width * 2**i planes.
    `norm` 'batch' is torchvision's BatchNorm; 'group' puts `layers.GroupNorm` (up to `num_groups`
    groups) in every BatchNorm's place, under the same names, so the model has no batch_stats and its
    predictions do not depend on the statistics of the training set (Wu & He, "Group Normalization",
    ECCV 2018). The torchvision port applies to norm='batch' only.
    Sows 'stem' (after the max pool), 'layer1'..'layer4' and 'last_conv' (= layer4, the Grad-CAM target,
    also marked with `perturb`) into 'intermediates'.
    """

    block: type[BasicBlock] | type[Bottleneck]
    stage_sizes: Sequence[int]
    num_classes: int = 1000
    width: int = 64
    dtype: layers.Dtype = None
    norm: str = "batch"
    num_groups: int = 32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = layers.conv(self.width, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
        x = layers.relu(_norm(self, "bn1")(x, train))
        x = layers.max_pool(x, 3, 2, 1)
        self.sow("intermediates", "stem", x)
        in_channels = self.width
        for stage, num_blocks in enumerate(self.stage_sizes):
            planes = self.width * 2**stage
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                downsample = index == 0 and (stride != 1 or in_channels != planes * self.block.expansion)
                x = self.block(planes, stride, downsample, self.dtype, self.norm, self.num_groups,
                               name=f"layer{stage + 1}_{index}")(x, train)
                in_channels = planes * self.block.expansion
            self.sow("intermediates", f"layer{stage + 1}", x)
        x = layers.mark_gradcam_target(self, x)
        x = layers.global_avg_pool(x)
        x = layers.dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=layers.torch_linear_kernel_init,
            bias_init=layers.torch_linear_bias_init(x.shape[-1]),
            name="fc",
        )(x)
        return x.astype(jnp.float32)


def _resnet(
    block: type[BasicBlock] | type[Bottleneck],
    stage_sizes: Sequence[int],
    num_classes: int,
    width: int | None,
    dtype: layers.Dtype,
    norm: str,
    num_groups: int,
) -> ResNet:
    layers.check_norm(norm)
    return ResNet(block, tuple(stage_sizes), num_classes, width or 64, dtype, norm, num_groups)


def resnet18(num_classes: int = 1000, width: int | None = None, dtype: layers.Dtype = None, norm: str = "batch",
             num_groups: int = 32) -> ResNet:
    """torchvision's resnet18."""
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes, width, dtype, norm, num_groups)


def resnet34(num_classes: int = 1000, width: int | None = None, dtype: layers.Dtype = None, norm: str = "batch",
             num_groups: int = 32) -> ResNet:
    """torchvision's resnet34."""
    return _resnet(BasicBlock, (3, 4, 6, 3), num_classes, width, dtype, norm, num_groups)


def resnet50(num_classes: int = 1000, width: int | None = None, dtype: layers.Dtype = None, norm: str = "batch",
             num_groups: int = 32) -> ResNet:
    """torchvision's resnet50 (V1.5)."""
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes, width, dtype, norm, num_groups)


def resnet101(num_classes: int = 1000, width: int | None = None, dtype: layers.Dtype = None, norm: str = "batch",
              num_groups: int = 32) -> ResNet:
    """torchvision's resnet101 (V1.5; 44,549,160 parameters at width 64 with 1000 classes)."""
    return _resnet(Bottleneck, (3, 4, 23, 3), num_classes, width, dtype, norm, num_groups)


def resnet152(num_classes: int = 1000, width: int | None = None, dtype: layers.Dtype = None, norm: str = "batch",
              num_groups: int = 32) -> ResNet:
    """torchvision's resnet152 (V1.5)."""
    return _resnet(Bottleneck, (3, 8, 36, 3), num_classes, width, dtype, norm, num_groups)
