"""Pieces shared by the image enhancers (UNet, UNet++, ResUNet, UR-Net) and the U-shaped skeleton.

Every enhancer maps an image (N, H, W, C) in [0, 1] to an image of the same shape in [0, 1] (float32),
for any H, W >= 2**depth (>= 16 for the default depth 4; sizes need not be multiples of 2**depth).

Choices the UR-Net paper leaves open, shared by every enhancer and exposed as constructor arguments:
  * `norm`: 'batch' puts a `layers.BatchNorm` (torch semantics) after every 3x3 / strided conv, whose
    conv then has no bias; 'none' drops the norm and gives those convs a bias.
  * `output_activation` (`OUTPUT_ACTIVATIONS`), applied in float32 to the 1x1 output head h:
      'sigmoid'  (default) y = sigmoid(h);
      'clip'     y = clip(h, 0, 1);
      'residual' y = clip(x + h, 0, 1): the network predicts a correction of the input image. Its head
                 starts at zero (kernel and bias), so the enhancer starts as the identity. At that start
                 the head's own gradient is h's input features times dL/dy (non-zero), while the layers
                 below it receive none (the zero kernel passes nothing back); the first update makes the
                 kernel non-zero and from then on every layer learns. The clip passes no gradient for a
                 pixel pushed past 0 or 1, which only stops corrections that would leave the image range.
  * `leaky_slope`: negative slope of the activations; 0.0 is ReLU.

Resolution bookkeeping: level l has spatial size s_l, s_0 = (H, W). Max pooling (kernel 2, stride 2)
gives s_{l+1} = floor(s_l / 2); the strided conv (3x3, stride 2, padding 1) gives ceil(s_l / 2). The
2x2 transposed conv doubles the size, so on the way up 2 * s_{l+1} differs from s_l by at most one
pixel; `match_size` crops (ceil case) or zero-pads (floor case) at the bottom/right to s_l.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers, onednn
from urnet_jax.models.se import SqueezeExcitation

Array = jax.Array

NORMS = ("batch", "none")
OUTPUT_ACTIVATIONS = ("sigmoid", "clip", "residual")
DOWNSAMPLINGS = ("max_pool", "strided_conv")


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Raises a one-line ValueError when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")


def check_image(x: Array, depth: int, model_name: str) -> None:
    """Raises a one-line ValueError unless x is (N, H, W, C) with H, W >= 2**depth and depth >= 1."""
    if depth < 1:
        raise ValueError(f"{model_name}: depth must be >= 1, got {depth}")
    if x.ndim != 4:
        raise ValueError(f"{model_name} expects images (N, H, W, C), got shape {tuple(x.shape)}")
    min_size = 2**depth
    if min(x.shape[1], x.shape[2]) < min_size:
        raise ValueError(
            f"{model_name} with depth {depth} needs H, W >= {min_size}, got {x.shape[1]}x{x.shape[2]}"
        )


def activation(x: Array, negative_slope: float) -> Array:
    """ReLU when negative_slope == 0, else LeakyReLU(negative_slope)."""
    return nn.relu(x) if negative_slope == 0.0 else nn.leaky_relu(x, negative_slope)


def match_size(x: Array, height: int, width: int) -> Array:
    """Crops or zero-pads x (N, h, w, C) at the bottom/right to (N, height, width, C)."""
    x = x[:, :height, :width]
    pad_h, pad_w = height - x.shape[1], width - x.shape[2]
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return x


def output_head(features: Array, image: Array, kind: str, dtype: layers.Dtype) -> Array:
    """The enhancers' 'head' (1x1 conv with bias, features -> the image's channels, zero-initialised for
    'residual'; call it inside the enhancer's compact `__call__`), then `apply_output_activation`."""
    kernel_init = nn.initializers.zeros if kind == "residual" else layers.kaiming_fan_out
    conv = layers.conv(image.shape[-1], 1, use_bias=True, dtype=dtype, kernel_init=kernel_init, name="head")
    return apply_output_activation(conv(features), image, kind)


def apply_output_activation(head: Array, image: Array, kind: str) -> Array:
    """Maps the output head (N, H, W, C) to an image in [0, 1], float32 (see module docstring)."""
    head = head.astype(jnp.float32)
    if kind == "sigmoid":
        return nn.sigmoid(head)
    if kind == "clip":
        return jnp.clip(head, 0.0, 1.0)
    return jnp.clip(image.astype(jnp.float32) + head, 0.0, 1.0)


class ConvNormAct(nn.Module):
    """conv (k x k, stride, explicit symmetric padding) -> norm -> activation (if `activate`).

    Submodules: 'conv' (kernel HWIO; bias only when norm == 'none'), 'norm' (when norm == 'batch'). A strided
    conv's input gradient is computed phase by phase (`layers.strided_conv`).
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    norm: str = "batch"
    activate: bool = True
    negative_slope: float = 0.0
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = layers.conv(self.features, self.kernel_size, self.stride, self.padding,
                        use_bias=self.norm == "none", dtype=self.dtype, input_grad_by_phase=True, name="conv")(x)
        if self.norm == "batch":
            x = layers.BatchNorm(dtype=self.dtype, name="norm")(x, train)
        return activation(x, self.negative_slope) if self.activate else x


class ConvBlock(nn.Module):
    """Two 3x3 convs (padding 1, stride 1), optionally residual. (N, H, W, C_in) -> (N, H, W, features).

    residual=False (UNet's double conv): act(norm(conv2(act(norm(conv1(x)))))).
    residual=True (ResNet basic block): act(norm(conv2(act(norm(conv1(x))))) + shortcut(x)), where
    shortcut is the identity when C_in == features, else 'shortcut' = 1x1 conv + norm (no activation).
    Submodules: 'conv1', 'conv2' and, when projecting, 'shortcut' (all `ConvNormAct`).
    """

    features: int
    residual: bool = False
    norm: str = "batch"
    negative_slope: float = 0.0
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        def conv_norm(kernel_size: int, activate: bool, name: str) -> ConvNormAct:
            return ConvNormAct(self.features, kernel_size, 1, kernel_size // 2, self.norm, activate,
                               self.negative_slope, self.dtype, name=name)

        y = conv_norm(3, True, "conv1")(x, train)
        y = conv_norm(3, not self.residual, "conv2")(y, train)
        if not self.residual:
            return y
        shortcut = x if x.shape[-1] == self.features else conv_norm(1, False, "shortcut")(x, train)
        return activation(y + shortcut.astype(y.dtype), self.negative_slope)


class MaxPool2x2(nn.Module):
    """`torch.nn.MaxPool2d(2, 2)` (floor mode) as a parameter-free module, so it shows in the module tree."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return layers.max_pool(x, 2, 2)


class UpConv2x2(nn.Module):
    """`torch.nn.ConvTranspose2d(C_in, features, kernel_size=2, stride=2)`: (N, H, W, C_in) -> (N, 2H, 2W, features).

    With kernel_size == stride the output pixels (2i + a, 2j + b) only see input pixel (i, j):
        y[n, 2i + a, 2j + b, o] = sum_c x[n, i, j, c] * kernel[a, b, c, o] + bias[o].
    It is computed as a 1x1 conv (a matmul, `layers.channel_matmul`) to 4 * features channels followed by
    depth-to-space, which is exact and much faster on CPU than XLA's transposed convolution; with the 'onednn'
    backend (`layers.use_conv_backend`) in float32 it is `onednn.conv_transpose`, without the depth-to-space
    copies.

    Params: 'kernel' (2, 2, C_in, features), 'bias' (features,). Porting from / mirroring PyTorch:
    kernel = torch_weight.permute(2, 3, 0, 1) (torch weight is (C_in, C_out, 2, 2)); bias as is.
    Init: normal with variance 1 / C_in (each output pixel sums over C_in inputs); bias zero.
    """

    features: int
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", batch_axis=(0, 1))
        kernel = self.param("kernel", kernel_init, (2, 2, in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        dtype = self.dtype or x.dtype
        if layers.conv_backend() == "onednn" and dtype == jnp.float32:
            return onednn.conv_transpose(x.astype(dtype), kernel, (2, 2)) + bias
        batch, height, width, _ = x.shape
        # (C_in, 2 * 2 * C_out) with columns ordered (a, b, o): the 1x1 conv.
        matrix = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(in_features, 4 * self.features)
        y = layers.channel_matmul(x.astype(dtype), matrix.astype(dtype))
        y = y.reshape(batch, height, width, 2, 2, self.features)
        # depth-to-space: (N, H, W, a, b, O) -> (N, H, a, W, b, O) -> (N, 2H, 2W, O).
        y = jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(batch, 2 * height, 2 * width, self.features)
        return y + bias.astype(dtype)


class UShapedEnhancer(nn.Module):
    """The U-shaped encoder-decoder behind UNet, ResUNet and the UR-Net enhancer (see their modules).

    Channels at level l: C_l = width * 2**l, l = 0..depth. Submodules, in call order:
      'down0_block'                      ConvBlock(C_0) on the input image;
      for l = 1..depth:
        'down{l}_pool'                   MaxPool2x2                     (downsampling='max_pool'), or
        'down{l}_strided_conv'           ConvNormAct(C_{l-1}, 3x3, stride 2, padding 1, activated)
                                                                        (downsampling='strided_conv');
        'down{l}_block'                  ConvBlock(C_l);
      for l = depth-1..0 (h = output of level l+1):
        'up{l}_se'                       SqueezeExcitation(se_ratio) on h (only when se_ratio > 0);
        'up{l}_transpose'                UpConv2x2(C_l), then `match_size` to the level-l skip;
        'skip{l}_1x1'                    1x1 conv C_l -> C_l with bias on the skip (only when skip_conv);
        'up{l}_block'                    ConvBlock(C_l) on concat([skip, upsampled], channel axis);
      'head'                             1x1 conv C_0 -> C (image channels) with bias, then
                                         `output_activation` (`output_head`).
    ConvBlocks are residual when `residual_blocks`; every activation uses `leaky_slope`.
    """

    width: int = 64
    depth: int = 4
    norm: str = "batch"
    output_activation: str = "sigmoid"
    residual_blocks: bool = False
    downsampling: str = "max_pool"
    leaky_slope: float = 0.0
    skip_conv: bool = False
    se_ratio: int = 0
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """(N, H, W, C) in [0, 1] -> (N, H, W, C) in [0, 1], float32."""
        model_name = type(self).__name__
        check_choice(f"{model_name} norm", self.norm, NORMS)
        check_choice(f"{model_name} output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        check_choice(f"{model_name} downsampling", self.downsampling, DOWNSAMPLINGS)
        check_image(x, self.depth, model_name)

        def block(level: int, name: str) -> ConvBlock:
            return ConvBlock(self.width * 2**level, self.residual_blocks, self.norm, self.leaky_slope,
                             self.dtype, name=name)

        h = x.astype(self.dtype or jnp.float32)
        h = block(0, "down0_block")(h, train)
        skips = []
        for level in range(1, self.depth + 1):
            skips.append(h)
            if self.downsampling == "max_pool":
                h = MaxPool2x2(name=f"down{level}_pool")(h)
            else:
                h = ConvNormAct(h.shape[-1], 3, 2, 1, self.norm, True, self.leaky_slope, self.dtype,
                                name=f"down{level}_strided_conv")(h, train)
            h = block(level, f"down{level}_block")(h, train)
        for level in reversed(range(self.depth)):
            skip = skips[level]
            features = self.width * 2**level
            if self.se_ratio > 0:
                h = SqueezeExcitation(self.se_ratio, dtype=self.dtype, name=f"up{level}_se")(h)
            h = UpConv2x2(features, self.dtype, name=f"up{level}_transpose")(h)
            h = match_size(h, skip.shape[1], skip.shape[2])
            if self.skip_conv:
                skip = layers.conv(features, 1, use_bias=True, dtype=self.dtype, name=f"skip{level}_1x1")(skip)
            h = block(level, f"up{level}_block")(jnp.concatenate([skip, h.astype(skip.dtype)], axis=-1), train)
        return output_head(h, x, self.output_activation, self.dtype)
