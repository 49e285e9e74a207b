"""UNet++ (Zhou et al., 2018): UNet with nested, dense skip pathways, as an image enhancer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers
from urnet_jax.models.enhancer_blocks import (
    NORMS,
    OUTPUT_ACTIVATIONS,
    ConvBlock,
    MaxPool2x2,
    UpConv2x2,
    check_choice,
    check_image,
    match_size,
    output_head,
)


class UNetPlusPlus(nn.Module):
    """UNet++ without deep supervision: the image comes from the final node X^{0,depth}.

    Nodes X^{i,j}, i = level (channels C_i = width * 2**i, spatial size as in `enhancer_blocks`),
    j = 0..depth-i, each a `ConvBlock(C_i)` (two 3x3 conv + norm + activation) named 'x{i}_{j}':
      X^{0,0} = x0_0(image);  X^{i,0} = x{i}_0(pool{i}(X^{i-1,0}))  (2x2 max pooling 'pool{i}');
      X^{i,j} = x{i}_{j}(concat[X^{i,0}, ..., X^{i,j-1}, match_size(x{i}_{j}_up(X^{i+1,j-1}))]),
    where 'x{i}_{j}_up' is an `UpConv2x2(C_i)` (2x2 transposed conv, as in the authors' code). So the
    input of X^{i,j} has (j + 1) * C_i channels. Output: 'head' (1x1 conv with bias to the image
    channels) on X^{0,depth}, then `output_activation`. Arguments as in `UShapedEnhancer`.
    """

    width: int = 64
    depth: int = 4
    norm: str = "batch"
    output_activation: str = "sigmoid"
    leaky_slope: float = 0.0
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(N, H, W, C) in [0, 1] -> (N, H, W, C) in [0, 1], float32."""
        check_choice("UNetPlusPlus norm", self.norm, NORMS)
        check_choice("UNetPlusPlus output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        check_image(x, self.depth, "UNetPlusPlus")

        def node(i: int, j: int) -> ConvBlock:
            return ConvBlock(self.width * 2**i, False, self.norm, self.leaky_slope, self.dtype, name=f"x{i}_{j}")

        nodes: dict[tuple[int, int], jax.Array] = {}
        h = x.astype(self.dtype or jnp.float32)
        for i in range(self.depth + 1):
            if i > 0:
                h = MaxPool2x2(name=f"pool{i}")(h)
            h = nodes[i, 0] = node(i, 0)(h, train)
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                same_level = [nodes[i, k] for k in range(j)]
                up = UpConv2x2(self.width * 2**i, self.dtype, name=f"x{i}_{j}_up")(nodes[i + 1, j - 1])
                up = match_size(up, same_level[0].shape[1], same_level[0].shape[2]).astype(same_level[0].dtype)
                nodes[i, j] = node(i, j)(jnp.concatenate([*same_level, up], axis=-1), train)
        return output_head(nodes[0, self.depth], x, self.output_activation, self.dtype)
