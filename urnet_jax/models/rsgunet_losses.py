"""RSGUNet's training objective, as pure functions of images (N, H, W, 3) in [0, 1].

The authors' public code (`loss/compute_loss.py`) trains RSGUNet on
    750 * L1 + 500 * (1 - MS-SSIM) + 100 * TV + 0.001 * content(VGG-19) + 17.5 * adversarial texture
(weights rewritten for per-element means on its 100x100 training patches; "color" loss = L1). Here:
  * 'l1'               mean |prediction - target|                              (the authors' colour loss);
  * 'ssim'             1 - SSIM(prediction, target), single-scale SSIM with an 11x11 Gaussian window
                       (sigma 1.5, K1 0.01, K2 0.03, data range 1) in place of 5-scale MS-SSIM, which
                       needs images >= 176 px and so rules out small crops and test sizes;
  * 'total_variation'  mean squared difference of vertical plus of horizontal neighbours (as the authors');
  * 'perceptual'       mean over three layers of the mean squared difference of VGG features (ReLU
                       outputs of the last conv of stages 1, 3 and 5: relu1_2, relu3_3, relu5_3 of the
                       library's torchvision-layout VGG16, the VGG16 counterparts of the authors'
                       VGG-19 relu1_2, relu3_4, relu5_4), on ImageNet-normalised inputs.
The adversarial texture term (a grayscale discriminator trained in alternation) is left out.
`LossWeights` keeps the authors' ratios with L1 at 1. The perceptual weight is converted from the
authors' Caffe-VGG units (inputs in 0..255) to ImageNet-normalised inputs (about 57.6x smaller) as
0.001 / 750 * 57.6**2 ~ 4.4e-3: an order-of-magnitude match, since the networks and weights differ.

The perceptual term needs a VGG16 with ImageNet weights (ported from torchvision, see `urnet_jax.port`);
they are optional: without them (vgg_variables=None) the term is left out and the loss is
L1 + SSIM + TV. Features of an untrained VGG would measure distances in an arbitrary feature space.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from urnet_jax.models import layers
from urnet_jax.models.composite import imagenet_normalize
from urnet_jax.models.vgg import VGG

Array = jax.Array

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
CONTENT_STAGES = (1, 3, 5)  # VGG stages whose last conv's ReLU output the perceptual term compares


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the four terms (the authors' ratios, L1 = 1; see the module docstring)."""

    l1: float = 1.0
    ssim: float = 500 / 750
    total_variation: float = 100 / 750
    perceptual: float = 0.001 / 750 * 57.6**2


def l1_loss(prediction: Array, target: Array) -> Array:
    """Mean absolute difference, a scalar float32."""
    return jnp.mean(jnp.abs(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def total_variation(image: Array) -> Array:
    """mean((x[i+1, j] - x[i, j])**2) + mean((x[i, j+1] - x[i, j])**2) over (N, H, W, C), float32."""
    image = image.astype(jnp.float32)
    vertical = jnp.mean(jnp.square(image[:, 1:] - image[:, :-1]))
    horizontal = jnp.mean(jnp.square(image[:, :, 1:] - image[:, :, :-1]))
    return vertical + horizontal


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    window = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return (window / window.sum()).astype(np.float32)


def _blur_valid(x: Array) -> Array:
    """Separable Gaussian blur of every channel, 'valid' borders: (N, H, W, C) -> (N, H-10, W-10, C)."""
    channels = x.shape[-1]
    window = jnp.asarray(_gaussian_window())
    for kernel_shape in ((SSIM_WINDOW, 1, 1, 1), (1, SSIM_WINDOW, 1, 1)):
        kernel = jnp.tile(window.reshape(kernel_shape), (1, 1, 1, channels))
        x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=channels)
    return x


def ssim(prediction: Array, target: Array) -> Array:
    """Mean SSIM (Wang et al. 2004) of images in [0, 1], a scalar float32. Needs H, W >= 11."""
    if min(prediction.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs H, W >= {SSIM_WINDOW}, got {prediction.shape[1]}x{prediction.shape[2]}")
    x, y = prediction.astype(jnp.float32), target.astype(jnp.float32)
    mu_x, mu_y = _blur_valid(x), _blur_valid(y)
    var_x = _blur_valid(x * x) - mu_x**2
    var_y = _blur_valid(y * y) - mu_y**2
    covariance = _blur_valid(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    index = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return jnp.mean(index)


def content_layer_names(vgg: VGG) -> tuple[str, ...]:
    """Names of the modules whose output, after ReLU, is the last conv of each stage in CONTENT_STAGES.

    For VGG16 these are 'features_2', 'features_14', 'features_28' (relu1_2, relu3_3, relu5_3); with
    batch norm, the BatchNorm after that conv.
    """
    names, stage, torch_index, last_of_stage = [], 1, 0, None
    for value in vgg.layout:
        if value == "M":
            if stage in CONTENT_STAGES:
                names.append(last_of_stage)
            stage += 1
            torch_index += 1
            continue
        last_of_stage = f"features_{torch_index + 1}" if vgg.batch_norm else f"features_{torch_index}"
        torch_index += 3 if vgg.batch_norm else 2
    return tuple(names)


def vgg_features(vgg: VGG, vgg_variables: Any, images: Array) -> list[Array]:
    """ReLU features of `images` (N, H, W, 3) in [0, 1] at `content_layer_names(vgg)`, in that order."""
    names = content_layer_names(vgg)
    _, state = vgg.apply(vgg_variables, imagenet_normalize(images), capture_intermediates=lambda module, method:
                         method == "__call__" and module.name in names, mutable=["intermediates"])
    return [layers.relu(state["intermediates"][name]["__call__"][0]).astype(jnp.float32) for name in names]


def perceptual_loss(prediction: Array, target: Array, vgg: VGG, vgg_variables: Any) -> Array:
    """Mean over the content layers of the mean squared feature difference; no gradient into the target."""
    batch = prediction.shape[0]
    features = vgg_features(vgg, vgg_variables, jnp.concatenate([prediction, jax.lax.stop_gradient(target)]))
    return jnp.mean(jnp.stack([jnp.mean(jnp.square(f[:batch] - jax.lax.stop_gradient(f[batch:])))
                               for f in features]))


def rsgunet_loss(
    prediction: Array,
    target: Array,
    weights: LossWeights = LossWeights(),
    vgg: VGG | None = None,
    vgg_variables: Any = None,
) -> tuple[Array, dict[str, Array]]:
    """The weighted objective and its unweighted terms {'l1', 'ssim', 'total_variation'[, 'perceptual']}.

    ssim's term is 1 - SSIM. The perceptual term is included only when both `vgg` and `vgg_variables`
    are given (ImageNet weights; see the module docstring).
    """
    terms = {
        "l1": l1_loss(prediction, target),
        "ssim": 1.0 - ssim(prediction, target),
        "total_variation": total_variation(prediction),
    }
    if vgg is not None and vgg_variables is not None:
        terms["perceptual"] = perceptual_loss(prediction, target, vgg, vgg_variables)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, terms
