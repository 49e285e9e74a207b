"""Phase 1's training loss: the enhanced image against its target, per image (`pretrain.loss`).

'mse' is the per-image mean squared error (UR-Net's identity reconstruction); 'rsgunet' is RSGUNet's
objective (Huang et al. 2018, `urnet_jax.models.rsgunet_losses`: L1 + SSIM + total variation, plus the
VGG16 perceptual term when `pretrain.perceptual_vgg` names ImageNet weights), computed image by image
so that it is a per-example loss like the MSE. Phase 1's evaluation (and so `pretrain_best`) measures
the MSE whatever the training loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from urnet_jax import sharding
from urnet_jax.models.rsgunet_losses import LossWeights, rsgunet_loss
from urnet_jax.models.vgg import VGG, vgg16

IMAGENET_CLASSES = 1000  # the perceptual VGG16 keeps its ImageNet head (only its conv features are used)


@dataclasses.dataclass(frozen=True)
class ReconstructionLoss:
    """kind 'mse' | 'rsgunet'; weights: the rsgunet terms' weights; vgg: the perceptual network (None: no
    perceptual term), whose variables are passed with every call."""

    kind: str = "mse"
    weights: LossWeights = LossWeights()
    vgg: VGG | None = None

    def __call__(self, output: jax.Array, target: jax.Array, vgg_variables: Any = None) -> jax.Array:
        """output, target (N, H, W, 3) in [0, 1] -> the loss of each image (N,), float32."""
        output, target = output.astype(jnp.float32), target.astype(jnp.float32)
        if self.kind == "mse":
            return jnp.mean(jnp.square(output - target), axis=(1, 2, 3))

        def one_image(prediction: jax.Array, reference: jax.Array) -> jax.Array:
            return rsgunet_loss(prediction[None], reference[None], self.weights, self.vgg, vgg_variables)[0]

        return jax.vmap(one_image)(output, target)


def from_config(pretrain_config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh) -> tuple[ReconstructionLoss, Any]:
    """(the loss of `config.pretrain`, the perceptual VGG16's variables replicated over `mesh` or None)."""
    weights = LossWeights(**pretrain_config.rsgunet_weights.to_dict())
    if not pretrain_config.perceptual_vgg:
        return ReconstructionLoss(pretrain_config.loss, weights), None
    from urnet_jax.port import load_pretrained  # deferred: reads torch files only when used

    variables = load_pretrained(pretrain_config.perceptual_vgg, "vgg16", IMAGENET_CLASSES, jax.random.PRNGKey(0))
    variables = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), variables)
    return ReconstructionLoss(pretrain_config.loss, weights, vgg16()), sharding.replicate(variables, mesh)
