"""RSGUNet (Huang et al., "Range Scaling Global U-Net for Perceptual Image Enhancement on Mobile Devices",
ECCV 2018 workshops) as an image enhancer: image (N, H, W, 3) in [0, 1] -> same-size image in [0, 1].

The layout follows the authors' public TensorFlow code (`net/unet.py` of MTlab's rsgunet_image_enhance):
  * a 3x3 stride-2 'input_conv' maps the image to features f at half resolution (C_1 channels);
  * a U-Net encoder of `depth` levels at resolutions H/2 .. H/2**depth (two 3x3 convs per level), each
    level followed by a 3x3 stride-2 conv (the authors' "pooling");
  * the global branch: one 3x3 conv at H/2**(depth+1), global average pooling, a fully connected layer
    with ReLU, and that vector tiled over the deepest encoder level and concatenated to it (the deepest
    feature map itself is used only through this vector, as in the authors' code);
  * a decoder back to H/2 (2x2 transposed convs, skip concatenation, two 3x3 convs per level);
  * the range scaling layer: the decoder output s multiplies f element-wise, r = f * s (`RangeScaling`):
    the network learns a per-pixel, per-channel scale of the input's own features instead of a residual;
  * a 2x2 transposed conv back to H x W with 3 channels, a 3x3 conv 'head' to RGB and the library's
    output activation.
Channels: C_l = width * 2**(l - 1) at encoder/decoder level l = 1..depth, the bottom conv has
width * 2**depth and the global vector C_depth units; width=16, depth=4 is the authors' network
(16-32-64-128, bottom 256, global 128). Activations are LeakyReLU(0.2) (the authors' lrelu), there is
no normalisation by default (the authors use none) and every 3x3 conv has a bias.

Departures from the authors' code, for the library's conventions: torch-style symmetric padding
(TensorFlow 'SAME' pads stride-2 convs asymmetrically), sizes that are not multiples of 2**(depth+1)
(transposed-conv outputs are cropped/padded by `match_size`), and the output activation: the authors
map the head through tanh * 0.58 + 0.52 (range about [-0.06, 1.10]); here it is `output_activation`
('sigmoid' by default) so that the output lies in [0, 1] like every other enhancer's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers
from urnet_jax.models.enhancer_blocks import (
    NORMS,
    OUTPUT_ACTIVATIONS,
    ConvBlock,
    ConvNormAct,
    UpConv2x2,
    apply_output_activation,
    check_choice,
    check_image,
    match_size,
)

Array = jax.Array

LEAKY_SLOPE = 0.2  # the authors' lrelu: max(0.2 x, x)


class RangeScaling(nn.Module):
    """The range scaling layer: (features, scale), both (N, h, w, C) -> features * scale (element-wise).

    Parameter-free; a module so that it shows in the module tree and can be intercepted.
    """

    @nn.compact
    def __call__(self, features: Array, scale: Array) -> Array:
        return features * scale.astype(features.dtype)


class RSGUNet(nn.Module):
    """Range Scaling Global U-Net. (N, H, W, C) in [0, 1] -> (N, H, W, C) in [0, 1], float32.

    Needs H, W >= 2**(depth + 1) (32 for the default depth 4); any size above works.
    Submodules, in call order:
      'input_conv'              ConvNormAct(C_1, 3x3, stride 2): the features f that range scaling scales;
      for l = 1..depth:
        'down{l}_block'         ConvBlock(C_l) (two 3x3 convs), the level-l skip;
        'down{l}_strided_conv'  ConvNormAct(C_l, 3x3, stride 2);
      'bottom_conv'             ConvNormAct(width * 2**depth, 3x3);
      'global_dense'            Dense(C_depth) + ReLU on the spatial mean of 'bottom_conv';
      'up{depth}_block'         ConvBlock(C_depth) on concat([skip_depth, tiled global vector]);
      for l = depth-1..1:
        'up{l}_transpose'       UpConv2x2(C_l), then `match_size` to skip_l;
        'up{l}_block'           ConvBlock(C_l) on concat([upsampled, skip_l]);
      'range_scaling'           RangeScaling: f * (output of 'up1_block');
      'output_transpose'        UpConv2x2(C), then `match_size` to (H, W);
      'head'                    3x3 conv C -> C with bias, then `output_activation`.
    """

    width: int = 16
    depth: int = 4
    norm: str = "none"
    output_activation: str = "sigmoid"
    leaky_slope: float = LEAKY_SLOPE
    dtype: layers.Dtype = None

    def channels(self, level: int) -> int:
        """C_level = width * 2**(level - 1), for levels 1..depth (depth + 1: the bottom conv)."""
        return self.width * 2 ** (level - 1)

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """(N, H, W, C) in [0, 1] -> (N, H, W, C) in [0, 1], float32."""
        model_name = type(self).__name__
        check_choice(f"{model_name} norm", self.norm, NORMS)
        check_choice(f"{model_name} output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        check_image(x, self.depth + 1, model_name)

        def conv(features: int, stride: int, name: str) -> ConvNormAct:
            return ConvNormAct(features, 3, stride, 1, self.norm, True, self.leaky_slope, self.dtype, name=name)

        def block(level: int, name: str) -> ConvBlock:
            return ConvBlock(self.channels(level), False, self.norm, self.leaky_slope, self.dtype, name=name)

        features = conv(self.channels(1), 2, "input_conv")(x.astype(self.dtype or jnp.float32), train)
        h = features
        skips = []
        for level in range(1, self.depth + 1):
            h = block(level, f"down{level}_block")(h, train)
            skips.append(h)
            h = conv(self.channels(level), 2, f"down{level}_strided_conv")(h, train)
        bottom = conv(self.channels(self.depth + 1), 1, "bottom_conv")(h, train)
        global_vector = nn.relu(layers.dense(self.channels(self.depth), dtype=self.dtype, name="global_dense")(
            layers.global_avg_pool(bottom)))
        deepest = skips[-1]
        tiled = jnp.broadcast_to(global_vector[:, None, None, :].astype(deepest.dtype),
                                 (*deepest.shape[:3], global_vector.shape[-1]))
        h = block(self.depth, f"up{self.depth}_block")(jnp.concatenate([deepest, tiled], axis=-1), train)
        for level in reversed(range(1, self.depth)):
            skip = skips[level - 1]
            h = UpConv2x2(self.channels(level), self.dtype, name=f"up{level}_transpose")(h)
            h = match_size(h, skip.shape[1], skip.shape[2])
            h = block(level, f"up{level}_block")(jnp.concatenate([h, skip.astype(h.dtype)], axis=-1), train)
        scaled = RangeScaling(name="range_scaling")(features, h)
        image = UpConv2x2(x.shape[-1], self.dtype, name="output_transpose")(scaled)
        image = match_size(image, x.shape[1], x.shape[2])
        head = layers.conv(x.shape[-1], 3, 1, 1, use_bias=True, dtype=self.dtype, name="head")(image)
        return apply_output_activation(head, x, self.output_activation)
