"""Grad-CAM (Selvaraju et al. 2017) for every model of the zoo, in JAX.

Every classifier marks the output of its last convolutional stage with
`layers.mark_gradcam_target` (a 'last_conv' perturbation and sown intermediate). Grad-CAM needs the
activation A (N, h, w, C) and the gradient dS/dA of the explained class's logit S; adding a zero
'perturbations' variable at that point makes dS/dA the gradient of S with respect to that variable,
so one `jax.grad` gives it without changing the model. The same holds through
`EnhanceClassify` (the image goes through the enhancer first; the heatmap is over the input image).

Heatmap = ReLU(sum_c w_c A[..., c]) with w_c = spatial mean of dS/dA[..., c], resized bilinearly to
the input's H x W and divided by its per-image maximum (an all-zero map stays zero), so values lie
in [0, 1] and 0 means "no positive evidence".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from urnet_jax import compiler_options

TARGET = "last_conv"


def _target_path(tree: Mapping[str, Any], collection: str) -> tuple[str, ...]:
    """The path of the unique 'last_conv' entry of a (nested) variable collection."""
    paths = [path for path in flatten_dict(tree) if path[-1] == TARGET]
    if len(paths) != 1:
        raise ValueError(f"expected exactly one '{TARGET}' entry in the '{collection}' collection, "
                         f"found {len(paths)}: the model must mark its last conv stage with "
                         f"self.perturb('{TARGET}', x) and self.sow('intermediates', '{TARGET}', x)")
    return paths[0]


@functools.partial(compiler_options.jit, static_argnames=("model",))
def _gradcam(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
             class_index: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Heatmaps (N, H, W) in [0, 1] and the explained class (N,) for `images` (N, H, W, 3)."""
    shapes = jax.eval_shape(lambda x: model.apply(variables, x, train=False, mutable=["perturbations"]),
                            images)[1].get("perturbations", {})
    path = _target_path(shapes, "perturbations")
    perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def explained_logit(perturbations):
        logits, state = model.apply({**variables, "perturbations": perturbations}, images, train=False,
                                    mutable=["intermediates"])
        logits = logits.astype(jnp.float32)
        target = jnp.argmax(logits, axis=-1) if class_index is None else class_index
        score = jnp.take_along_axis(logits, target[:, None], axis=-1).sum()
        intermediates = state.get("intermediates", {})
        activation = flatten_dict(intermediates)[_target_path(intermediates, "intermediates")]
        activation = activation[-1] if isinstance(activation, tuple) else activation
        return score, (activation.astype(jnp.float32), target)

    grads, (activation, target) = jax.grad(explained_logit, has_aux=True)(perturbations)
    grad = flatten_dict(grads)[path].astype(jnp.float32)  # (N, h, w, C)
    weights = grad.mean(axis=(1, 2))  # (N, C)
    cam = nn.relu(jnp.einsum("nhwc,nc->nhw", activation, weights))
    cam = jax.image.resize(cam, (images.shape[0], images.shape[1], images.shape[2]), "bilinear")
    cam = jnp.maximum(cam, 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
    return cam, target


def gradcam(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray | jax.Array,
            class_index: int | np.ndarray | jax.Array | None = None,
            return_class: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps of `model` (any zoo classifier, or `EnhanceClassify`) for `images`.

    Args:
      model: a Flax module called as `model.apply(variables, x, train=False)` -> logits (N, K), with
        its last conv stage marked 'last_conv' (see the module docstring).
      variables: its variables ({'params', 'batch_stats'}); evaluated in inference mode.
      images: (N, H, W, 3) float, exactly what `model` takes (ImageNet-normalised for a bare
        classifier, [0, 1] for `EnhanceClassify`).
      class_index: the class to explain: None = each image's predicted class, an int = that class for
        every image, or an int array (N,).
      return_class: also return the explained class of each image.

    Returns:
      heatmaps (N, H, W) float32 in [0, 1] (and the explained classes (N,) int32 if `return_class`).
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if class_index is not None:
        class_index = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (images.shape[0],))
    heatmaps, target = _gradcam(model, {k: v for k, v in variables.items() if k != "perturbations"},
                                images, class_index)
    heatmaps = np.asarray(heatmaps)
    return (heatmaps, np.asarray(target, np.int32)) if return_class else heatmaps
