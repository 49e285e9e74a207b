"""An image enhancer (or none) in front of an ImageNet classifier, trained as one model.

The single place where images are ImageNet-normalised for the classifier is `imagenet_normalize`,
called by `EnhanceClassify.__call__`: inputs and enhancer outputs are images in [0, 1]; the
classifier (torchvision-layout, ImageNet-pretrained) receives (image - IMAGENET_MEAN) / IMAGENET_STD.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.models.registry import CLASSIFIER_NAMES, ENHANCER_NAMES, NO_ENHANCER, create, default_width, spec

# torchvision's ImageNet statistics (RGB, for images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(image: jax.Array) -> jax.Array:
    """(N, H, W, 3) RGB in [0, 1] -> (image - IMAGENET_MEAN) / IMAGENET_STD, per channel, same dtype."""
    mean = jnp.asarray(IMAGENET_MEAN, image.dtype)
    std = jnp.asarray(IMAGENET_STD, image.dtype)
    return (image - mean) / std


class EnhanceClassify(nn.Module):
    """logits = classifier(imagenet_normalize(enhancer(x))); the enhancer is skipped when None.

    Variables: {'params': {'enhancer': ..., 'classifier': ...}, 'batch_stats': {...}} ('enhancer' absent
    when there is none). x: (N, H, W, 3) RGB in [0, 1] -> logits (N, num_classes) float32.
    freeze_enhancer: in `__call__` the enhancer runs in inference mode (its BatchNorm statistics, if any,
    stay fixed) and no gradient flows into it; `enhance` (what phase 1 trains) is unaffected.
    """

    enhancer: nn.Module | None
    classifier: nn.Module
    freeze_enhancer: bool = False

    def enhance(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(N, H, W, 3) in [0, 1] -> the enhanced image (N, H, W, 3) in [0, 1] (x itself without enhancer)."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"EnhanceClassify expects RGB images (N, H, W, 3), got shape {tuple(x.shape)}")
        return x if self.enhancer is None else self.enhancer(x, train=train)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """(N, H, W, 3) in [0, 1] -> logits (N, num_classes)."""
        if self.freeze_enhancer:
            enhanced = jax.lax.stop_gradient(self.enhance(x, train=False))
        else:
            enhanced = self.enhance(x, train)
        return self.classifier(imagenet_normalize(enhanced), train=train)


def build_model(model_config: Any, num_classes: int, dtype: Any = None,
                freeze_enhancer: bool = False) -> EnhanceClassify:
    """Builds the model described by `config.model` (keys enhancer, classifier, enhancer_width,
    classifier_width; a width of 0 means the default: the registry's `default_width` for enhancers,
    torchvision's for classifiers; enhancer_output, norm and num_groups where the model accepts them).

    dtype: computation dtype of both parts (e.g. jnp.bfloat16); parameters stay float32.
    freeze_enhancer: see `EnhanceClassify` (train.freeze_enhancer).
    Raises ValueError (one line) on an unknown enhancer or classifier name.
    """
    enhancer_name, classifier_name = model_config.enhancer, model_config.classifier
    if enhancer_name not in (NO_ENHANCER, *ENHANCER_NAMES):
        raise ValueError(f"unknown enhancer {enhancer_name!r}; expected one of "
                         f"{', '.join((NO_ENHANCER, *ENHANCER_NAMES))}")
    if classifier_name not in CLASSIFIER_NAMES:
        raise ValueError(f"unknown classifier {classifier_name!r}; expected one of {', '.join(CLASSIFIER_NAMES)}")
    enhancer = None
    if enhancer_name != NO_ENHANCER:
        options = {}
        if spec(enhancer_name).residual_output:
            options["output_activation"] = getattr(model_config, "enhancer_output", "sigmoid")
        enhancer = create(enhancer_name, width=model_config.enhancer_width or default_width(enhancer_name),
                          dtype=dtype, **options)
    options = {}
    if spec(classifier_name).group_norm:
        options = {"norm": getattr(model_config, "norm", "batch"), "num_groups": getattr(model_config, "num_groups", 32)}
    classifier = create(classifier_name, num_classes=num_classes, width=model_config.classifier_width or None,
                        dtype=dtype, **options)
    return EnhanceClassify(enhancer, classifier, freeze_enhancer)
