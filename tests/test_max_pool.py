"""`layers.max_pool_by_phase`: `max_pool`'s values and gradients, ties included, without XLA's select-and-scatter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urnet_jax.models import layers

# (height, width, kernel size, stride, padding): ResNet's and DenseNet's 3x3 / 2 / 1, the U-Nets' 2x2 / 2, odd
# sizes, stride 1 (every pixel in 9 windows), stride = kernel with no overlap, and stride > kernel (pixels in no
# window at all).
GEOMETRIES = [(16, 16, 3, 2, 1), (12, 12, 2, 2, 0), (11, 9, 3, 2, 1), (7, 8, 3, 1, 1), (9, 9, 3, 3, 0),
              (10, 11, 2, 3, 0), (13, 13, 5, 2, 2)]


@pytest.mark.parametrize("height, width, kernel_size, stride, padding", GEOMETRIES)
def test_values_and_gradients_equal_lax_max_pool_with_ties(height, width, kernel_size, stride, padding):
    rng = np.random.default_rng(height * width + kernel_size + stride)
    # After a ReLU, and rounded to a few levels: most windows hold their maximum more than once.
    x = jnp.asarray(np.maximum(np.round(rng.normal(size=(2, height, width, 3)) * 2), 0), jnp.float32)
    expected_value, expected_vjp = jax.vjp(lambda x: layers._lax_max_pool(x, kernel_size, stride, padding), x)
    value, vjp = jax.vjp(lambda x: layers.max_pool_by_phase(x, kernel_size, stride, padding), x)
    cotangent = jnp.asarray(rng.normal(size=expected_value.shape), jnp.float32)
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected_value))
    (grad,), (expected,) = jax.jit(vjp)(cotangent), expected_vjp(cotangent)
    assert grad.shape == x.shape
    # Each window's gradient goes to the same pixel (its first maximum in row-major order) ...
    np.testing.assert_array_equal(np.asarray(grad) != 0, np.asarray(expected) != 0)
    # ... and a pixel that is the maximum of several windows sums their gradients (in another order).
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_the_backward_pass_has_no_select_and_scatter():
    x = jnp.ones((1, 8, 8, 2))
    own = str(jax.make_jaxpr(jax.grad(lambda x: layers.max_pool_by_phase(x, 3, 2, 1).sum()))(x))
    lax_own = str(jax.make_jaxpr(jax.grad(lambda x: layers._lax_max_pool(x, 3, 2, 1).sum()))(x))
    assert "select_and_scatter_add" in lax_own and "select_and_scatter_add" not in own
