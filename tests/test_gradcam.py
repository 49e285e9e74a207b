"""Grad-CAM: localises a planted discriminative patch, equals CAM on a ResNet, runs on every classifier family."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from urnet_jax import compiler_options
from urnet_jax.evaluation.gradcam import _gradcam, gradcam
from urnet_jax.models import create
from urnet_jax.models.layers import conv

SIZE, PATCH = 32, 8


class TinyClassifier(nn.Module):
    """Three convs (32 -> 8 px) marked like the zoo's classifiers, global average pool, dense head."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(conv(8, 3, 1, 1)(x))
        x = nn.relu(conv(16, 3, 2, 1)(x))
        x = nn.relu(conv(16, 3, 2, 1)(x))
        x = self.perturb("last_conv", x)
        self.sow("intermediates", "last_conv", x)
        return nn.Dense(2)(x.mean(axis=(1, 2)))


def toy_batch(rng, n):
    """Dim noise with a red (class 0) or green (class 1) patch and a blue distractor patch in every
    image, at random non-overlapping places. Returns images, labels, patch masks, distractor masks."""
    images = rng.uniform(0.0, 0.2, (n, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    patch_masks = np.zeros((n, SIZE, SIZE), bool)
    distractor_masks = np.zeros((n, SIZE, SIZE), bool)
    for i in range(n):
        while True:
            a, b = rng.integers(0, SIZE - PATCH + 1, (2, 2))
            if np.abs(a - b).max() >= PATCH:
                break
        patch_masks[i, a[0]:a[0] + PATCH, a[1]:a[1] + PATCH] = True
        distractor_masks[i, b[0]:b[0] + PATCH, b[1]:b[1] + PATCH] = True
        images[i][patch_masks[i], labels[i]] = 1.0
        images[i][distractor_masks[i], 2] = 1.0
    return images, labels, patch_masks, distractor_masks


def mass_fraction(heatmaps, masks):
    return (heatmaps * masks).sum(axis=(1, 2)) / np.maximum(heatmaps.sum(axis=(1, 2)), 1e-12)


def test_gradcam_highlights_the_planted_patch():
    rng = np.random.default_rng(0)
    model = TinyClassifier()
    params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, images, labels):
        def loss_fn(p):
            logits = model.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(60):
        images, labels, _, _ = toy_batch(rng, 32)
        params, state, loss = step(params, state, images, labels)
    assert loss < 0.05

    images, labels, patches, distractors = toy_batch(rng, 64)
    heatmaps, explained = gradcam(model, {"params": params}, images, return_class=True)
    np.testing.assert_array_equal(explained, labels)  # the model is right, and explains its prediction
    assert heatmaps.shape == (64, SIZE, SIZE) and heatmaps.min() >= 0.0
    np.testing.assert_allclose(heatmaps.max(axis=(1, 2)), 1.0, rtol=1e-6)
    chance = PATCH * PATCH / SIZE**2  # 1/16 of the image
    in_patch = mass_fraction(heatmaps, patches).mean()
    assert in_patch > 3 * chance, in_patch
    assert in_patch > 2 * mass_fraction(heatmaps, distractors).mean()
    # Explaining the class the image is *not*: no positive evidence in the patch.
    other = gradcam(model, {"params": params}, images, class_index=1 - labels)
    assert mass_fraction(other, patches).mean() < chance


def test_gradcam_equals_cam_on_resnet():
    """With global average pooling then one dense layer, Grad-CAM is CAM: relu(A . W[:, c])."""
    model = create("resnet18", num_classes=3, width=8)
    images = jax.random.normal(jax.random.key(1), (2, 96, 96, 3))
    variables = compiler_options.run_unoptimised(model.init, jax.random.key(0), images[:1])
    logits, state = model.apply(variables, images, mutable=["intermediates"])
    activation = state["intermediates"]["last_conv"][0]  # (2, 3, 3, 64)
    kernel = variables["params"]["fc"]["kernel"]
    heatmaps, explained = gradcam(model, variables, images, return_class=True)
    np.testing.assert_array_equal(explained, np.argmax(logits, axis=-1))
    cam = nn.relu(jnp.einsum("nhwc,cn->nhw", activation, kernel[:, explained]))
    cam = np.asarray(jax.image.resize(cam, (2, 96, 96), "bilinear"))
    assert cam.max(axis=(1, 2)).min() > 0  # a non-degenerate case
    np.testing.assert_allclose(heatmaps, cam / cam.max(axis=(1, 2), keepdims=True), atol=1e-5)


# One model per architecture class of the zoo (resnet34/101/152 share ResNet with resnet18/50, vgg16 VGG).
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "densenet121"])
def test_gradcam_traces_on_every_classifier(name):
    """Each architecture exposes exactly one 'last_conv' target; traced only (no compilation)."""
    model = create(name, num_classes=3, width=8)
    images = jax.ShapeDtypeStruct((2, 96, 96, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    heatmaps, explained = jax.eval_shape(lambda v, x: _gradcam(model, v, x, None), variables, images)
    assert heatmaps.shape == (2, 96, 96) and explained.shape == (2,)


class Unmarked(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_gradcam_rejects_unmarked_models():
    model = Unmarked()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="last_conv"):
        gradcam(model, variables, np.zeros((1, 4, 4, 3)))
