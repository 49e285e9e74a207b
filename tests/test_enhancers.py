"""Image enhancers: same-size output for any size, torch parity of the up/down convs, SE, module trees."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from urnet_jax.models import create, layers
from urnet_jax.models.enhancer_blocks import ConvBlock, ConvNormAct, MaxPool2x2, UpConv2x2, apply_output_activation
from urnet_jax.models.resunet import ResUNet
from urnet_jax.models.se import SqueezeExcitation
from urnet_jax.models.unet import UNet
from urnet_jax.models.unetpp import UNetPlusPlus
from urnet_jax.models.urnet import URNetEnhancer
from tiny_run import jit_fast

ENHANCERS = {"unet": UNet, "unetpp": UNetPlusPlus, "resunet": ResUNet, "urnet": URNetEnhancer}
WIDTH, DEPTH = 4, 4
# rbg keys compile much faster than threefry on XLA:CPU (only `init` calls in this file use them).
KEY = jax.random.key(0, impl="rbg")


def images(height: int, width: int, batch: int = 2, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, height, width, 3))


def random_variables(model: nn.Module, seed: int = 0) -> dict:
    """He-scaled random params and non-trivial BatchNorm statistics for `model`.

    Built from `jax.eval_shape(model.init)` (tracing only): compiling the real initialisers costs ~10 s
    of CPU per tiny enhancer. The parameter shapes do not depend on the image size.
    """
    shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 96, 96, 3)))
    rng = np.random.default_rng(seed)

    def sample(path, shape):
        leaf = path[-1].key
        if leaf == "kernel":
            return rng.normal(0, (2 / np.prod(shape.shape[:-1])) ** 0.5, shape.shape)
        if leaf in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape.shape)
        return rng.normal(0, 0.1, shape.shape)  # bias, mean

    return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(sample(p, s), jnp.float32), shapes)


@pytest.fixture(scope="module")
def enhancers():
    """name -> (model, variables), built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = ENHANCERS[name](width=WIDTH, depth=DEPTH)
            cache[name] = model, random_variables(model)
        return cache[name]

    return get


def module_calls(model: nn.Module, variables, x: jax.Array) -> list[tuple[tuple[str, ...], nn.Module]]:
    """(path, module) of every module __call__, in call order, while tracing one forward pass."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            calls.append((context.module.path, context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, x)
    return calls


def output_shapes(model: nn.Module, variables, x: jax.Array) -> dict:
    """Top-level submodule name -> output shape of its __call__, for one forward pass (traced only)."""
    _, state = jax.eval_shape(lambda v: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
                              variables)
    return {name: value["__call__"][0].shape for name, value in state["intermediates"].items() if name != "__call__"}


@pytest.mark.parametrize("name", list(ENHANCERS))
def test_eval_output_has_input_size_and_lies_in_unit_range(enhancers, name):
    model, variables = enhancers(name)
    assert type(create(name, width=WIDTH)) is ENHANCERS[name]
    apply = jit_fast(model.apply)
    for height, width in [(96, 96), (200, 200)]:  # odd sizes: the train-mode test below
        x = images(height, width)
        output = apply(variables, x)
        assert output.shape == x.shape and output.dtype == jnp.float32
        assert float(output.min()) >= 0.0 and float(output.max()) <= 1.0
        assert float(output.std()) > 0.0


@pytest.mark.parametrize("name", list(ENHANCERS))
def test_train_mode_on_odd_size_has_finite_gradients(enhancers, name):
    model, variables = enhancers(name)
    x = images(97, 113, seed=1)

    @jit_fast
    def loss_and_grads(params):
        def loss_fn(params):
            output, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                          train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.square(output - x)), (output, updates)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, (output, updates)), grads = loss_and_grads(variables["params"])
    assert output.shape == x.shape
    assert float(output.min()) >= 0.0 and float(output.max()) <= 1.0
    assert np.isfinite(float(loss))
    flat_grads = [(jax.tree_util.keystr(path), g) for path, g in jax.tree_util.tree_leaves_with_path(grads)]
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in flat_grads)
    # Every parameter takes part in the output, except where a tiny SE bottleneck (4 ReLU units) may
    # be dead for this batch; SE's fc2 bias always gets a gradient through the gate.
    maybe_dead = ("['fc1']", "['fc2']['kernel']")
    unused = [key for key, g in flat_grads if not bool(jnp.any(g != 0)) and not any(m in key for m in maybe_dead)]
    assert not unused
    changed = jax.tree.map(lambda new, old: bool(jnp.any(new != old)), updates["batch_stats"],
                           variables["batch_stats"])
    assert all(jax.tree.leaves(changed))


def test_up_conv_init_has_variance_one_over_input_channels():
    variables = UpConv2x2(32).init(KEY, jnp.zeros((1, 4, 4, 64)))["params"]
    assert variables["kernel"].shape == (2, 2, 64, 32) and variables["kernel"].dtype == jnp.float32
    assert abs(float(jnp.std(variables["kernel"])) - 64**-0.5) < 0.01
    assert not np.any(np.asarray(variables["bias"]))


def test_up_conv_equals_torch_conv_transpose_2x2_stride_2():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    torch_up = torch.nn.ConvTranspose2d(3, 6, kernel_size=2, stride=2)
    with torch.no_grad():
        expected = torch_up(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    params = {"kernel": jnp.asarray(torch_up.weight.detach().permute(2, 3, 0, 1).numpy()),
              "bias": jnp.asarray(torch_up.bias.detach().numpy())}
    output = UpConv2x2(6).apply({"params": params}, jnp.asarray(x))
    assert output.shape == expected.shape == (2, 10, 14, 6)
    np.testing.assert_allclose(np.asarray(output), expected, rtol=1e-5, atol=1e-5)


def test_up_conv_gradients_equal_torch_conv_transpose_gradients():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    cotangent = rng.normal(size=(2, 10, 14, 6)).astype(np.float32)
    torch_up = torch.nn.ConvTranspose2d(3, 6, kernel_size=2, stride=2)
    torch_x = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    (torch_up(torch_x) * torch.from_numpy(cotangent).permute(0, 3, 1, 2)).sum().backward()
    params = {"kernel": jnp.asarray(torch_up.weight.detach().permute(2, 3, 0, 1).numpy()),
              "bias": jnp.asarray(torch_up.bias.detach().numpy())}

    def weighted_sum(params, x):
        return jnp.sum(UpConv2x2(6).apply({"params": params}, x) * cotangent)

    params_grad, x_grad = jax.jit(jax.grad(weighted_sum, argnums=(0, 1)))(params, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(x_grad), torch_x.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(params_grad["kernel"]), torch_up.weight.grad.permute(2, 3, 0, 1).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(params_grad["bias"]), torch_up.bias.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_channel_matmul_values_and_gradients_equal_jnp_dot(dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), dtype)
    kernel = jnp.asarray(rng.normal(size=(4, 6)), dtype)
    cotangent = jnp.asarray(rng.normal(size=(2, 3, 5, 6)), dtype)
    value, vjp = jax.vjp(layers.channel_matmul, x, kernel)
    expected_value, expected_vjp = jax.vjp(jnp.dot, x, kernel)
    tolerance = 1e-6 if dtype == jnp.float32 else 2e-2
    assert value.dtype == dtype
    np.testing.assert_allclose(np.asarray(value, np.float32), np.asarray(expected_value, np.float32),
                               rtol=tolerance, atol=tolerance)
    for grad, expected in zip(vjp(cotangent), expected_vjp(cotangent)):
        assert grad.shape == expected.shape and grad.dtype == expected.dtype == dtype
        np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(expected, np.float32),
                                   rtol=tolerance, atol=tolerance * 10)


@pytest.mark.parametrize("size", [(97, 113), (7, 9)])
def test_strided_down_conv_equals_torch_conv_3x3_stride_2_padding_1(size):
    x = np.random.default_rng(1).normal(size=(1, *size, 4)).astype(np.float32)
    torch_conv = torch.nn.Conv2d(4, 5, kernel_size=3, stride=2, padding=1)
    with torch.no_grad():
        expected = torch.nn.functional.leaky_relu(torch_conv(torch.from_numpy(x).permute(0, 3, 1, 2)), 0.01)
    expected = expected.permute(0, 2, 3, 1).numpy()
    params = {"conv": {"kernel": jnp.asarray(torch_conv.weight.detach().permute(2, 3, 1, 0).numpy()),
                       "bias": jnp.asarray(torch_conv.bias.detach().numpy())}}
    down = ConvNormAct(5, kernel_size=3, stride=2, padding=1, norm="none", negative_slope=0.01)
    output = down.apply({"params": params}, jnp.asarray(x))
    assert output.shape == expected.shape == (1, (size[0] + 1) // 2, (size[1] + 1) // 2, 5)
    np.testing.assert_allclose(np.asarray(output), expected, rtol=1e-5, atol=1e-5)



# (input height, width, kernel size, stride, padding): the enhancers' 3x3 stride-2 downsampling (even and odd
# sizes), ResNet's 7x7 stem, a 1x1 shortcut (a phase no tap reaches), a stride larger than the kernel's reach.
STRIDED_CONVS = [(8, 10, 3, 2, 1), (7, 9, 3, 2, 1), (11, 12, 7, 2, 3), (6, 7, 1, 2, 0), (10, 8, 3, 3, 1),
                 (9, 9, 5, 3, 0)]


@pytest.mark.parametrize("height, width, kernel_size, stride, padding", STRIDED_CONVS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_strided_conv_values_and_gradients_equal_lax_conv(height, width, kernel_size, stride, padding, dtype):
    rng = np.random.default_rng(height * width + kernel_size + stride)
    x = jnp.asarray(rng.normal(size=(2, height, width, 3)), dtype)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 3, 5)), dtype)

    def lax_conv(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    expected_value, expected_vjp = jax.vjp(lax_conv, x, kernel)
    value, vjp = jax.vjp(lambda x, kernel: layers.strided_conv(x, kernel, stride, padding), x, kernel)
    cotangent = jnp.asarray(rng.normal(size=expected_value.shape), dtype)
    tolerance = 1e-5 if dtype == jnp.float32 else 5e-2
    assert value.shape == expected_value.shape and value.dtype == dtype
    np.testing.assert_allclose(np.asarray(value, np.float32), np.asarray(expected_value, np.float32),
                               rtol=tolerance, atol=tolerance)
    for grad, expected in zip(jax.jit(vjp)(cotangent), expected_vjp(cotangent)):
        assert grad.shape == expected.shape and grad.dtype == expected.dtype == dtype
        np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(expected, np.float32),
                                   rtol=tolerance, atol=tolerance * 10)


@pytest.mark.parametrize("size", [(12, 14), (7, 9)])
def test_strided_down_conv_gradients_equal_torch_conv_gradients(size):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, *size, 4)).astype(np.float32)
    torch_conv = torch.nn.Conv2d(4, 5, kernel_size=3, stride=2, padding=1, bias=False)
    torch_x = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    out = torch_conv(torch_x)
    cotangent = rng.normal(size=out.shape).astype(np.float32)  # (N, C, H, W)
    (out * torch.from_numpy(cotangent)).sum().backward()
    params = {"conv": {"kernel": jnp.asarray(torch_conv.weight.detach().permute(2, 3, 1, 0).numpy())}}
    down = ConvNormAct(5, kernel_size=3, stride=2, padding=1, norm="batch", activate=False)
    variables = {"params": {**params, "norm": {"scale": jnp.ones(5), "bias": jnp.zeros(5)}},
                 "batch_stats": {"norm": {"mean": jnp.zeros(5), "var": jnp.full(5, 1 - 1e-5)}}}

    def weighted_sum(params, x):  # eval-mode BatchNorm with these statistics is the identity
        output = down.apply({**variables, "params": params}, x)
        return jnp.sum(output * jnp.asarray(cotangent.transpose(0, 2, 3, 1)))

    params_grad, x_grad = jax.jit(jax.grad(weighted_sum, argnums=(0, 1)))(variables["params"], jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(x_grad), torch_x.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(params_grad["conv"]["kernel"]),
                               torch_conv.weight.grad.permute(2, 3, 1, 0).numpy(), rtol=1e-5, atol=1e-5)


def test_strided_conv_is_used_only_for_strided_convs_with_one_group():
    def conv_functions(**kwargs):
        return layers.conv(4, 3, padding=1, input_grad_by_phase=True, **kwargs).conv_general_dilated

    assert conv_functions(stride=2) is not None
    assert conv_functions(stride=1) is None and conv_functions(stride=2, groups=2) is None
    assert layers.conv(4, 3, 2, 1).conv_general_dilated is None
    x = jnp.ones((1, 8, 8, 3))
    for stride, by_phase in ((2, True), (1, False)):  # the enhancers' downsampling convs take it
        down = ConvNormAct(4, 3, stride, 1, norm="none")
        program = str(jax.make_jaxpr(down.apply)(down.init(KEY, x), x))
        assert ("custom_vjp_call" in program) == by_phase

def test_squeeze_excitation_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 6, 32)).astype(np.float32)
    se = SqueezeExcitation(reduction=8)
    variables = se.init(KEY, jnp.asarray(x))
    fc1, fc2 = variables["params"]["fc1"], variables["params"]["fc2"]
    assert fc1["kernel"].shape == (32, 4) and fc2["kernel"].shape == (4, 32)
    squeezed = x.mean(axis=(1, 2))
    hidden = np.maximum(squeezed @ np.asarray(fc1["kernel"]) + np.asarray(fc1["bias"]), 0.0)
    gate = 1.0 / (1.0 + np.exp(-(hidden @ np.asarray(fc2["kernel"]) + np.asarray(fc2["bias"]))))
    expected = x * gate[:, None, None, :]
    np.testing.assert_allclose(np.asarray(se.apply(variables, jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, x)


def test_urnet_has_the_four_modifications(enhancers):
    model, variables = enhancers("urnet")
    x = images(97, 113)
    calls = module_calls(model, variables, x)
    top = {path[0]: module for path, module in calls if len(path) == 1}
    top_order = [path[0] for path, _ in calls if len(path) == 1]
    channels = [WIDTH * 2**level for level in range(DEPTH + 1)]
    # (1) 3x3 / stride 2 / padding 1 convs instead of pooling; their sizes follow torch's Conv2d (ceil).
    assert not any(isinstance(module, MaxPool2x2) for _, module in calls)
    assert "reduce_window" not in str(jax.make_jaxpr(model.apply)(variables, x))
    shapes = output_shapes(model, variables, x)
    height, width = x.shape[1:3]
    for level in range(1, DEPTH + 1):
        down = top[f"down{level}_strided_conv"]
        assert (down.kernel_size, down.stride, down.padding) == (3, 2, 1)
        height, width = torch.nn.functional.conv2d(torch.zeros(1, 1, height, width), torch.zeros(1, 1, 3, 3),
                                                   stride=2, padding=1).shape[2:]
        assert shapes[f"down{level}_strided_conv"] == (2, height, width, channels[level - 1])
    assert (height, width) == (7, 8)
    # (2) LeakyReLU in every block and down conv.
    activated = [module for _, module in calls if isinstance(module, (ConvBlock, ConvNormAct)) and
                 getattr(module, "activate", True)]
    assert activated and all(module.negative_slope == 0.01 for module in activated)
    # (3) a 1x1 conv on every skip; (4) SE right before every transposed conv, on its input.
    params = variables["params"]
    for level in range(DEPTH):
        assert params[f"skip{level}_1x1"]["kernel"].shape == (1, 1, channels[level], channels[level])
        assert isinstance(top[f"up{level}_se"], SqueezeExcitation)
        assert top_order.index(f"up{level}_se") + 1 == top_order.index(f"up{level}_transpose")
        assert shapes[f"up{level}_se"][-1] == params[f"up{level}_transpose"]["kernel"].shape[2] == channels[level + 1]
    # Residual blocks: a 1x1 projection where the channel count changes.
    assert "shortcut" in params["down1_block"] and "shortcut" in params["up0_block"]


def test_resunet_is_plain_and_unet_has_no_residuals(enhancers):
    model, variables = enhancers("resunet")
    x = images(97, 113)
    calls = module_calls(model, variables, x)
    names = {path[0] for path, _ in calls if len(path) == 1}
    assert {f"down{level}_pool" for level in range(1, DEPTH + 1)} <= names
    assert not any(name.endswith(("_strided_conv", "_1x1", "_se")) for name in names)
    assert "reduce_window_max" in str(jax.make_jaxpr(model.apply)(variables, x))
    shapes = output_shapes(model, variables, x)
    assert [shapes[f"down{level}_pool"][1:3] for level in range(1, DEPTH + 1)] == [(48, 56), (24, 28), (12, 14), (6, 7)]
    activated = [module for _, module in calls if isinstance(module, (ConvBlock, ConvNormAct))]
    assert activated and all(module.negative_slope == 0.0 for module in activated)
    assert "shortcut" in variables["params"]["down1_block"]
    unet_params = enhancers("unet")[1]["params"]
    assert set(unet_params) == set(variables["params"])
    assert not any("shortcut" in block for block in unet_params.values())


def test_unetpp_has_nested_dense_skips(enhancers):
    _, variables = enhancers("unetpp")
    params = variables["params"]
    for i in range(DEPTH + 1):
        for j in range(DEPTH + 1 - i):
            channels = WIDTH * 2**i
            # X^{i,j} sees X^{i,0..j-1} and the upsampled X^{i+1,j-1}: (j + 1) * C_i input channels.
            in_channels = 3 if (i, j) == (0, 0) else (j + 1) * channels if j else channels // 2
            assert params[f"x{i}_{j}"]["conv1"]["conv"]["kernel"].shape == (3, 3, in_channels, channels)
            if j:
                assert params[f"x{i}_{j}_up"]["kernel"].shape == (2, 2, 2 * channels, channels)
    assert len([name for name in params if name.startswith("x") and not name.endswith("_up")]) == 15


def test_output_activations():
    head = jnp.array([-2.0, -0.3, 0.0, 0.4, 1.5])
    image = jnp.array([0.5, 0.9, 0.2, 0.8, 0.1])
    np.testing.assert_allclose(apply_output_activation(head, image, "sigmoid"), 1 / (1 + np.exp(-np.asarray(head))),
                               rtol=1e-6)
    np.testing.assert_allclose(apply_output_activation(head, image, "clip"), [0.0, 0.0, 0.0, 0.4, 1.0])
    np.testing.assert_allclose(apply_output_activation(head, image, "residual"), [0.0, 0.6, 0.2, 1.0, 1.0],
                               rtol=1e-6)


def test_residual_output_with_zero_head_is_the_identity(enhancers):
    model, variables = enhancers("unet")
    zero_head = jax.tree.map(jnp.zeros_like, variables["params"]["head"])
    variables = {**variables, "params": {**variables["params"], "head": zero_head}}
    x = images(96, 96)
    output = jit_fast(model.clone(output_activation="residual").apply)(variables, x)
    np.testing.assert_array_equal(np.asarray(output), np.asarray(x))


def test_bfloat16_compute_matches_float32(enhancers):
    model, variables = enhancers("urnet")
    x = images(96, 96)
    reference = jit_fast(model.apply)(variables, x)
    output = jit_fast(model.clone(dtype=jnp.bfloat16).apply)(variables, x)
    assert output.dtype == jnp.float32
    assert 0.0 < float(jnp.max(jnp.abs(output - reference))) < 0.05  # bf16 is really used, and close
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
        jax.eval_shape(model.clone(dtype=jnp.bfloat16).init, KEY, x)))


@pytest.mark.parametrize("model, shape, message", [
    (UNet(width=WIDTH), (1, 8, 40, 3), "needs H, W >= 16, got 8x40"),
    (URNetEnhancer(width=WIDTH), (40, 40, 3), "expects images (N, H, W, C)"),
    (ResUNet(width=WIDTH, norm="layer"), (1, 32, 32, 3), "unknown ResUNet norm 'layer'"),
    (UNetPlusPlus(width=WIDTH, output_activation="tanh"), (1, 32, 32, 3), "unknown UNetPlusPlus output_activation"),
])
def test_bad_input_gives_one_line_errors(model, shape, message):
    with pytest.raises(ValueError) as error:
        model.init(KEY, jnp.zeros(shape))  # fails before any parameter is created
    # The whole message is its first line (JAX may append a note on traceback filtering).
    assert message in str(error.value).splitlines()[0]
