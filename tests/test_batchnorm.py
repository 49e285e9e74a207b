"""`layers.BatchNorm` against `torch.nn.BatchNorm2d`: train-mode outputs and running-average updates
(momentum, unbiased variance), eval mode, bfloat16, and a whole ResNet-18 in train mode."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urnet_jax import models, port
from urnet_jax.models.layers import BatchNorm

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

CHANNELS = 7


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_batchnorm_train_steps_and_eval_match_torch():
    rng = np.random.default_rng(0)
    torch_norm = torch.nn.BatchNorm2d(CHANNELS)  # momentum 0.1 = Flax/ours 0.9, eps 1e-5
    with torch.no_grad():
        torch_norm.weight.uniform_(0.5, 1.5)
        torch_norm.bias.normal_()
    variables = {
        "params": {"scale": jnp.asarray(torch_norm.weight.detach().numpy()),
                   "bias": jnp.asarray(torch_norm.bias.detach().numpy())},
        "batch_stats": {"mean": jnp.zeros(CHANNELS), "var": jnp.ones(CHANNELS)},
    }
    norm = BatchNorm()
    train_step = jax.jit(functools.partial(norm.apply, train=True, mutable=["batch_stats"]))
    for step in range(3):  # the running averages compound: a wrong momentum or variance shows up
        x = (3.0 + 2.0 * rng.normal(size=(4, 5, 6, CHANNELS)) * np.arange(1, CHANNELS + 1)).astype(np.float32)
        torch_norm.train()
        expected = torch_norm(_nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
        y, updates = train_step(variables, x)
        variables = {**variables, **updates}
        np.testing.assert_allclose(y, expected, atol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(variables["batch_stats"]["mean"], torch_norm.running_mean.numpy(), rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(variables["batch_stats"]["var"], torch_norm.running_var.numpy(), rtol=1e-6)
    torch_norm.eval()
    x = rng.normal(size=(2, 3, 3, CHANNELS)).astype(np.float32)
    expected = torch_norm(_nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(norm.apply(variables, x, train=False), expected, atol=1e-5)


def test_init_in_train_mode_leaves_running_statistics_at_defaults():
    x = jnp.full((2, 3, 3, CHANNELS), 5.0)
    variables = BatchNorm().init(jax.random.key(0), x, train=True)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(CHANNELS))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(CHANNELS))


def test_bfloat16_batchnorm_keeps_float32_statistics():
    x = jnp.asarray(np.random.default_rng(1).normal(3.0, 2.0, size=(4, 5, 6, CHANNELS)), jnp.float32)
    variables = BatchNorm().init(jax.random.key(0), x)
    y32, stats32 = BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])
    y16, stats16 = BatchNorm(dtype=jnp.bfloat16).apply(variables, x.astype(jnp.bfloat16), train=True,
                                                       mutable=["batch_stats"])
    assert y16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(stats16))
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.05)
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats16["batch_stats"][name], stats32["batch_stats"][name], rtol=0.02)


def test_resnet18_train_mode_forward_and_running_statistics_match_torch():
    """A full train-mode forward: every BatchNorm normalises with batch statistics and updates its running
    averages exactly as torch does (checked on all 20 BatchNorms of ResNet-18)."""
    torch.manual_seed(0)
    torch_model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    variables = port.from_torchvision("resnet18", torch_model.state_dict())  # a copy, before torch updates
    image = np.random.default_rng(0).normal(size=(4, 96, 96, 3)).astype(np.float32)  # layer4 maps: 3x3
    torch_model.train()
    with torch.no_grad():
        expected_logits = torch_model(_nchw(image)).numpy()
    model = models.create("resnet18")
    logits, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, image)
    assert expected_logits.std() > 0.1
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4)
    torch_buffers = torch_model.state_dict()
    before = flax.traverse_util.flatten_dict(variables["batch_stats"])
    after = flax.traverse_util.flatten_dict(updates["batch_stats"])
    assert len(after) == 40
    for path, value in after.items():
        key = port.torch_key(path)
        assert not np.allclose(value, before[path]), f"{key} was not updated"
        np.testing.assert_allclose(value, torch_buffers[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
