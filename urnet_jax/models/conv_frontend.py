"""A plain convolutional front end: the capacity control for the learned enhancers.

image (N, H, W, 3) in [0, 1] -> same-size image in [0, 1]. `num_layers` 3x3 convs (stride 1, padding 1)
at full resolution: the first `num_layers - 1` are conv + norm + LeakyReLU with `width` channels, the
last ('head') maps to the image's channels with a bias, then `output_activation`. No down-sampling, no
skips, no attention: whatever an enhancer gains from its U shape, it gains over this network of the same
parameter count (`width_matching_urnet`).

Parameters (norm 'batch', C = width, L = num_layers, image channels 3):
    27 C + 2 C  (first conv, no bias, and its BatchNorm scale and bias)
  + (L - 2) (9 C**2 + 2 C)  (middle convs)
  + 27 C + 3  (head)
  = 9 (L - 2) C**2 + (54 + 2 (L - 1)) C + 3           (`parameter_count`).
All of it runs at full resolution: its compute per image is about parameter_count * H * W
multiply-adds, far more than a U-shaped enhancer of the same size, which spends most of its
parameters on small maps.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers
from urnet_jax.models.enhancer_blocks import (
    NORMS,
    OUTPUT_ACTIVATIONS,
    ConvNormAct,
    apply_output_activation,
    check_choice,
)
from urnet_jax.models.urnet import URNetEnhancer

Array = jax.Array

NUM_LAYERS = 5
IMAGE_CHANNELS = 3


class ConvFrontend(nn.Module):
    """`num_layers` full-resolution 3x3 convs. (N, H, W, C) in [0, 1] -> (N, H, W, C) in [0, 1], float32.

    Submodules: 'conv{i}' ConvNormAct(width, 3x3) for i = 1..num_layers-1, 'head' 3x3 conv to C with bias.
    """

    width: int = 64
    num_layers: int = NUM_LAYERS
    norm: str = "batch"
    output_activation: str = "sigmoid"
    leaky_slope: float = 0.01
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """(N, H, W, C) in [0, 1] -> (N, H, W, C) in [0, 1], float32."""
        model_name = type(self).__name__
        check_choice(f"{model_name} norm", self.norm, NORMS)
        check_choice(f"{model_name} output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        if self.num_layers < 2:
            raise ValueError(f"{model_name}: num_layers must be >= 2, got {self.num_layers}")
        if x.ndim != 4:
            raise ValueError(f"{model_name} expects images (N, H, W, C), got shape {tuple(x.shape)}")
        h = x.astype(self.dtype or jnp.float32)
        for index in range(1, self.num_layers):
            h = ConvNormAct(self.width, 3, 1, 1, self.norm, True, self.leaky_slope, self.dtype,
                            name=f"conv{index}")(h, train)
        head = layers.conv(x.shape[-1], 3, 1, 1, use_bias=True, dtype=self.dtype, name="head")(h)
        return apply_output_activation(head, x, self.output_activation)


def parameter_count(width: int, num_layers: int = NUM_LAYERS) -> int:
    """Parameters of ConvFrontend(width, num_layers, norm='batch') on RGB images (module docstring)."""
    return 9 * (num_layers - 2) * width**2 + (54 + 2 * (num_layers - 1)) * width + IMAGE_CHANNELS


def width_for_parameter_count(target: int, num_layers: int = NUM_LAYERS) -> int:
    """The width (>= 1) whose `parameter_count` is closest to `target` parameters."""
    a, b, c = 9 * (num_layers - 2), 54 + 2 * (num_layers - 1), IMAGE_CHANNELS - target
    root = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    candidates = {max(1, math.floor(root)), max(1, math.ceil(root))}
    return min(candidates, key=lambda width: abs(parameter_count(width, num_layers) - target))


def urnet_parameter_count(urnet_width: int) -> int:
    """Parameters of the UR-Net enhancer (`URNetEnhancer`, default depth 4) of width `urnet_width` (shapes only)."""
    model = URNetEnhancer(width=urnet_width)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, IMAGE_CHANNELS)))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


def width_matching_urnet(urnet_width: int, num_layers: int = NUM_LAYERS) -> int:
    """The ConvFrontend width with about the UR-Net enhancer's parameter count at `urnet_width` (the
    capacity control: use it as `model.enhancer_width` of a conv_frontend run)."""
    return width_for_parameter_count(urnet_parameter_count(urnet_width), num_layers)
