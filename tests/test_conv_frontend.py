"""The plain convolutional front end (the capacity control): shapes, range, gradients, parameter matching."""

import jax
import jax.numpy as jnp
import pytest

from urnet_jax.models.conv_frontend import (
    ConvFrontend,
    parameter_count,
    urnet_parameter_count,
    width_for_parameter_count,
    width_matching_urnet,
)


def count(tree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("width, num_layers", [(5, 2), (7, 3), (12, 5)])
def test_parameter_count_formula_matches_the_module(width, num_layers):
    model = ConvFrontend(width=width, num_layers=num_layers)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    assert count(shapes["params"]) == parameter_count(width, num_layers)


@pytest.mark.parametrize("urnet_width", [4, 8, 16])
def test_width_matching_urnet_gives_about_its_parameter_count(urnet_width):
    width = width_matching_urnet(urnet_width)
    target = urnet_parameter_count(urnet_width)
    assert abs(parameter_count(width) - target) / target < 0.02
    # no other width is closer
    assert all(abs(parameter_count(other) - target) >= abs(parameter_count(width) - target)
               for other in (width - 1, width + 1))
    assert width_for_parameter_count(1) == 1


def test_output_is_an_image_of_the_input_size_with_finite_gradients():
    model = ConvFrontend(width=6, num_layers=3)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 21, 34, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    output, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert output.shape == x.shape and output.dtype == jnp.float32
    assert bool(jnp.all((output >= 0) & (output <= 1)))

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.square(out - x))

    grads = jax.grad(loss)(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


def test_receptive_field_is_local():
    """No down-sampling: a pixel change moves only outputs within num_layers pixels of it."""
    model = ConvFrontend(width=4, num_layers=3)
    x = jax.random.uniform(jax.random.PRNGKey(2), (1, 24, 24, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    changed = x.at[0, 12, 12].set(1.0 - x[0, 12, 12])
    difference = jnp.any(model.apply(variables, changed) != model.apply(variables, x), axis=-1)[0]
    rows, cols = jnp.nonzero(difference)
    assert bool(difference[12, 12])
    assert int(jnp.max(jnp.abs(rows - 12))) <= 3 and int(jnp.max(jnp.abs(cols - 12))) <= 3


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(ValueError, match="num_layers must be >= 2"):
        ConvFrontend(num_layers=1).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="unknown ConvFrontend norm 'layer'"):
        ConvFrontend(norm="layer").init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
