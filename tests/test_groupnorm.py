"""GroupNorm classifiers: torch parity of the layer, no batch_stats, training makes progress."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from urnet_jax import compiler_options
from urnet_jax.errors import ConfigError
from urnet_jax.models import layers, resnet


@pytest.mark.parametrize(("channels", "num_groups", "expected"), [(64, 32, 32), (8, 32, 8), (24, 16, 12), (7, 4, 1)])
def test_group_count_is_the_largest_divisor_not_above_the_request(channels, num_groups, expected):
    assert layers.group_count(channels, num_groups) == expected


def test_group_norm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (2, 5, 6, 12)).astype(np.float32)
    scale, bias = rng.normal(size=12).astype(np.float32), rng.normal(size=12).astype(np.float32)
    ours = layers.GroupNorm(num_groups=4).apply({"params": {"scale": scale, "bias": bias}}, x)
    reference = torch.nn.GroupNorm(4, 12, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(scale))
        reference.bias.copy_(torch.from_numpy(bias))
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_unknown_norm_is_a_config_error():
    with pytest.raises(ConfigError):
        resnet.resnet18(num_classes=3, norm="layer")


def test_group_norm_resnet_has_no_batch_stats_and_its_loss_goes_down():
    images = jax.random.uniform(jax.random.key(0), (6, 96, 96, 3))
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    model = resnet.resnet18(num_classes=3, width=8, norm="group")
    variables = compiler_options.run_unoptimised(model.init, jax.random.key(1), images[:1])
    assert "batch_stats" not in variables
    assert "batch_stats" in jax.eval_shape(resnet.resnet18(num_classes=3, width=8).init, jax.random.key(1), images[:1])
    assert set(variables["params"]["layer2_0"]["bn1"]) == {"scale", "bias"}  # GroupNorm under BatchNorm's name

    optimizer = optax.adam(1e-3)

    def loss_fn(params):
        logits = model.apply({"params": params}, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = variables["params"], optimizer.init(variables["params"])
    losses = []
    for _ in range(8):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    # Per-example normalisation: an example's logits do not depend on the rest of the batch.
    alone = model.apply({"params": params}, images[:1])
    together = model.apply({"params": params}, images)[:1]
    np.testing.assert_allclose(alone, together, rtol=1e-4, atol=1e-5)
