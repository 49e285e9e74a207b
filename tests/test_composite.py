"""EnhanceClassify: the one ImageNet normalisation, the identity without enhancer, joint gradients, build_model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_enhancers import random_variables  # tests/ is on sys.path (rootdir conftest)
from tiny_run import jit_fast

from urnet_jax.config import base_config
from urnet_jax.models import ENHANCERS
from urnet_jax.models.composite import IMAGENET_MEAN, IMAGENET_STD, EnhanceClassify, build_model
from urnet_jax.models.resnet import ResNet
from urnet_jax.models.resunet import ResUNet
from urnet_jax.models.unet import UNet
from urnet_jax.models.unetpp import UNetPlusPlus
from urnet_jax.models.conv_frontend import ConvFrontend
from urnet_jax.models.dynamic_enhancement import DynamicEnhancer
from urnet_jax.models.rsgunet import RSGUNet
from urnet_jax.models.urnet import URNetEnhancer

KEY = jax.random.key(0, impl="rbg")
ENHANCER_TYPES = {"unet": UNet, "unetpp": UNetPlusPlus, "resunet": ResUNet, "urnet": URNetEnhancer,
                  "rsgunet": RSGUNet, "dynamic_enhancement": DynamicEnhancer, "conv_frontend": ConvFrontend}


class StandInClassifier(nn.Module):
    """A tiny classifier that records the image it receives ('intermediates'/'input')."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self.sow("intermediates", "input", x)
        return nn.Dense(self.num_classes)(jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1))


def images(seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (2, 96, 96, 3))


def enhanced_and_classifier_input(model: EnhanceClassify, variables, x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(model.enhance(x), the image the classifier receives in model(x)), eval mode."""

    @jit_fast
    def run(variables, x):
        _, state = model.apply(variables, x, mutable=["intermediates"])
        return model.apply(variables, x, method="enhance"), state["intermediates"]["classifier"]["input"][0]

    enhanced, received = run(variables, x)
    return np.asarray(enhanced), np.asarray(received)


def test_without_enhancer_the_classifier_gets_the_imagenet_normalised_input():
    model = EnhanceClassify(None, StandInClassifier())
    x = images()
    variables = model.init(KEY, x)
    assert set(variables["params"]) == {"classifier"}
    enhanced, received = enhanced_and_classifier_input(model, variables, x)
    np.testing.assert_array_equal(enhanced, np.asarray(x))
    expected = (np.asarray(x) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(received, expected, rtol=1e-6, atol=1e-6)
    assert model.apply(variables, x).shape == (2, 3)


def test_with_enhancer_the_classifier_gets_the_normalised_enhanced_image_and_both_parts_learn():
    model = EnhanceClassify(UNet(width=2, depth=2), StandInClassifier())
    variables = random_variables(model)
    assert set(variables["params"]) == {"enhancer", "classifier"}
    assert set(variables["batch_stats"]) == {"enhancer"}
    x = images(1)
    enhanced, received = enhanced_and_classifier_input(model, variables, x)
    assert enhanced.shape == x.shape and not np.allclose(enhanced, np.asarray(x))
    expected = (enhanced - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(received, expected, rtol=1e-5, atol=1e-5)

    @jit_fast
    def loss_and_grads(params):
        def loss_fn(params):
            logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 2])).mean(), updates

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, updates), grads = loss_and_grads(variables["params"])
    assert np.isfinite(float(loss))
    for part in ("enhancer", "classifier"):  # joint training: the loss reaches both parts
        assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads[part]))
    changed = jax.tree.map(lambda new, old: bool(jnp.any(new != old)), updates["batch_stats"],
                           variables["batch_stats"])
    assert all(jax.tree.leaves(changed))  # train=True reaches the enhancer's BatchNorms


def test_rgb_images_are_required():
    model = EnhanceClassify(None, StandInClassifier())
    with pytest.raises(ValueError) as error:
        model.init(KEY, jnp.zeros((1, 32, 32, 1)))
    assert "expects RGB images (N, H, W, 3), got shape (1, 32, 32, 1)" in str(error.value).splitlines()[0]


@pytest.mark.parametrize("enhancer", ["none", *ENHANCERS])
def test_build_model_for_every_enhancer(enhancer):
    config = base_config().model
    config.enhancer, config.classifier, config.enhancer_width, config.classifier_width = enhancer, "resnet18", 4, 8
    model = build_model(config, num_classes=3, dtype=jnp.bfloat16)
    assert isinstance(model.classifier, ResNet)
    assert (model.classifier.width, model.classifier.num_classes, model.classifier.dtype) == (8, 3, jnp.bfloat16)
    if enhancer == "none":
        assert model.enhancer is None
    else:
        assert type(model.enhancer) is ENHANCER_TYPES[enhancer]
        assert (model.enhancer.width, model.enhancer.dtype) == (4, jnp.bfloat16)
    x = jnp.zeros((1, 96, 96, 3))
    variables = jax.eval_shape(model.init, KEY, x)
    assert set(variables["params"]) == ({"classifier"} if enhancer == "none" else {"enhancer", "classifier"})
    assert jax.eval_shape(model.apply, variables, x).shape == (1, 3)


def test_build_model_default_widths():
    config = base_config().model
    config.enhancer_width, config.classifier_width = 0, 0
    model = build_model(config, num_classes=3)
    assert (type(model.enhancer), model.enhancer.width, model.classifier.width) == (URNetEnhancer, 64, 64)


@pytest.mark.parametrize("key, value, message", [
    ("enhancer", "resunet2", "unknown enhancer 'resunet2'; expected one of none, unet, unetpp, resunet, urnet"),
    ("classifier", "alexnet", "unknown classifier 'alexnet'; expected one of resnet18"),
])
def test_build_model_rejects_unknown_names(key, value, message):
    config = base_config().model
    config[key] = value
    with pytest.raises(ValueError, match=message):
        build_model(config, num_classes=3)


def test_urnet_and_resnet18_forward_and_enhance():
    config = base_config().model
    config.classifier, config.enhancer_width, config.classifier_width = "resnet18", 4, 8
    model = build_model(config, num_classes=3)
    variables = random_variables(model)
    x = images(2)
    logits, enhanced = jit_fast(lambda v, x: (model.apply(v, x), model.apply(v, x, method="enhance")))(variables, x)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all() and float(jnp.std(logits)) > 0
    assert enhanced.shape == x.shape
    assert float(enhanced.min()) >= 0.0 and float(enhanced.max()) <= 1.0
