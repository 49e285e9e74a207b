"""Squeeze-and-excitation channel attention (Hu et al., CVPR 2018), as used by the UR-Net enhancer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models import layers


class SqueezeExcitation(nn.Module):
    """Rescales every channel of x by a learned gate computed from the channel means.

    s = mean of x over H and W (N, C); e = sigmoid(fc2(relu(fc1(s)))) (N, C); y = x * e, per channel.
    fc1: C -> hidden, fc2: hidden -> C, both `torch.nn.Linear`-like with bias (kernels (in, out)).
    hidden = max(min_hidden, C // reduction): the SE paper's C / 16 at real widths; `min_hidden` keeps
    tiny test models (C < 4 * reduction) from a fragile one- or two-unit bottleneck.

    (N, H, W, C) -> (N, H, W, C), same dtype as x. The squeeze (mean) is taken in float32.
    """

    reduction: int = 16
    min_hidden: int = 4
    dtype: layers.Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.reduction < 1 or self.min_hidden < 1:
            raise ValueError(
                f"SqueezeExcitation needs reduction >= 1 and min_hidden >= 1, "
                f"got reduction={self.reduction}, min_hidden={self.min_hidden}"
            )
        channels = x.shape[-1]
        hidden = max(self.min_hidden, channels // self.reduction)
        squeezed = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        hidden_activations = nn.relu(layers.dense(hidden, dtype=self.dtype, name="fc1")(squeezed))
        gate = nn.sigmoid(layers.dense(channels, dtype=self.dtype, name="fc2")(hidden_activations))
        return x * gate[:, None, None, :].astype(x.dtype)
