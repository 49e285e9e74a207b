"""Test-time BatchNorm re-estimation: exact pooled statistics, parameters untouched, inputs not mutated."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urnet_jax import compiler_options
from urnet_jax.adapt_bn import adapt_batch_stats
from urnet_jax.errors import ConfigError, DataError
from urnet_jax.models import layers, resnet


class ConvBatchNorm(nn.Module):
    """One 3x3 conv (no bias, padding 1) followed by one BatchNorm: (N, H, W, 3) -> (N, H, W, 4)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = layers.conv(4, 3, 1, 1, name="conv")(x)
        return layers.BatchNorm(name="bn")(x, train)


def _images(seed, count, size, brighten=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (count, size, size, 3)) + brighten, 0, 255).astype(np.uint8)


def test_toy_model_stats_equal_numpy_over_all_images_whatever_the_batching():
    model = ConvBatchNorm()
    images = _images(0, 10, 8)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    kernel = np.asarray(variables["params"]["conv"]["kernel"], np.float64)  # (3, 3, 3, 4) HWIO
    padded = np.pad(images / 255.0, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(np.einsum("nhwc,cd->nhwd", padded[:, i:i + 8, j:j + 8], kernel[i, j])
               for i in range(3) for j in range(3)).reshape(-1, 4)

    for batch_size in (10, 3):  # uneven batches: 3, 3, 3, 1
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        adapted = adapt_batch_stats(model, variables, batches)
        np.testing.assert_allclose(adapted["batch_stats"]["bn"]["mean"], conv.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(adapted["batch_stats"]["bn"]["var"], conv.var(0, ddof=1), rtol=1e-4)


def test_resnet_params_untouched_inputs_not_mutated_first_bn_follows_brightness():
    model = resnet.resnet18(num_classes=3, width=8)
    variables = compiler_options.run_unoptimised(model.init, jax.random.key(1), jnp.zeros((1, 96, 96, 3)))
    before = jax.tree.map(np.array, variables)
    dark, bright = _images(2, 4, 96), _images(2, 4, 96, brighten=50)

    adapted_dark = adapt_batch_stats(model, variables, [dark[:2], dark[2:]])
    adapted_bright = adapt_batch_stats(model, variables, [bright])

    for adapted in (adapted_dark, adapted_bright):
        chex.assert_trees_all_equal(adapted["params"], before["params"])
        chex.assert_trees_all_equal_structs(adapted["batch_stats"], before["batch_stats"])
    chex.assert_trees_all_equal(variables, before)  # the input variables are not mutated
    # Every layer's statistics moved away from the initial (0, 1).
    for leaf in jax.tree.leaves(adapted_dark["batch_stats"]):
        assert not np.allclose(leaf, 0) and not np.allclose(leaf, 1)
    # Brighter inputs: the first conv's outputs (the first BatchNorm's inputs) shift by the conv of a
    # constant, which is the sum of each output channel's kernel times the brightening.
    first_means = [np.asarray(adapted["batch_stats"]["bn1"]["mean"]) for adapted in (adapted_dark, adapted_bright)]
    shift = first_means[1] - first_means[0]
    kernel_sums = np.asarray(variables["params"]["conv1"]["kernel"]).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(shift, kernel_sums * 50 / 255, rtol=0.15, atol=0.02 * np.abs(kernel_sums).max())


def test_group_norm_model_and_empty_iterator_are_errors():
    gn_model = resnet.resnet18(num_classes=3, width=8, norm="group")
    gn_variables = compiler_options.run_unoptimised(gn_model.init, jax.random.key(0), jnp.zeros((1, 96, 96, 3)))
    with pytest.raises(ConfigError):
        adapt_batch_stats(gn_model, gn_variables, [_images(0, 2, 96)])
    model = ConvBatchNorm()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(DataError):
        adapt_batch_stats(model, variables, [])
