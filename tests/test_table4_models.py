"""The Table 4 comparison methods: RSGUNet and its losses, the dynamic enhancer and its emulation targets,
CLAHE, freezing the enhancer. Torch-free."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage
from skimage import exposure, metrics

from urnet_jax.config import base_config
from urnet_jax.data.clahe import ClaheParameters, clahe
from urnet_jax.data.enhancement_operators import OPERATORS, SHARPEN_AMOUNT, SHARPEN_SIGMA, emulation_target
from urnet_jax.errors import ConfigError, DataError
from urnet_jax.freezing import freeze_enhancer
from urnet_jax.models import create
from urnet_jax.models.composite import EnhanceClassify
from urnet_jax.models.dynamic_enhancement import (
    DynamicEnhancer,
    apply_dynamic_filters,
    luminance,
    replace_luminance,
)
from urnet_jax.models.rsgunet import RangeScaling, RSGUNet
from urnet_jax.models.rsgunet_losses import (
    LossWeights,
    content_layer_names,
    perceptual_loss,
    rsgunet_loss,
    ssim,
    total_variation,
)
from urnet_jax.models.vgg import vgg16, vgg16_bn
from urnet_jax.reconstruction_loss import ReconstructionLoss
from urnet_jax.train_state import current_learning_rate, make_optimizer
from tiny_run import jit_fast

KEY = jax.random.key(0, impl="rbg")  # compiles much faster than threefry on XLA:CPU
ENHANCERS = {
    "rsgunet": RSGUNet(width=4, depth=3),
    "dynamic": DynamicEnhancer(width=4, depth=2, kernel_size=5),
}
SIZES = [(64, 64), (72, 88)]


def images(height: int, width: int, batch: int = 2, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, height, width, 3))


def random_variables(model: nn.Module, shape=(1, 64, 64, 3), seed: int = 0) -> dict:
    """He-scaled random params (random heads included) and non-trivial BatchNorm statistics, from shapes only."""
    shapes = jax.eval_shape(model.init, KEY, jnp.zeros(shape))
    rng = np.random.default_rng(seed)

    def sample(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, (2 / np.prod(leaf.shape[:-1])) ** 0.5, leaf.shape)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape)
        return rng.normal(0, 0.1, leaf.shape)

    return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(sample(p, s), jnp.float32), shapes)


@pytest.fixture(scope="module")
def enhancer_variables():
    return {name: random_variables(model) for name, model in ENHANCERS.items()}


@pytest.mark.parametrize("name", list(ENHANCERS))
def test_output_keeps_shape_and_lies_in_unit_range(enhancer_variables, name):
    model, variables = ENHANCERS[name], enhancer_variables[name]
    apply = jit_fast(model.apply)
    for height, width in SIZES:
        x = images(height, width)
        output = apply(variables, x)
        assert output.shape == x.shape and output.dtype == jnp.float32
        assert float(output.min()) >= 0.0 and float(output.max()) <= 1.0
        assert float(jnp.std(output)) > 0.0


@pytest.mark.parametrize("name", list(ENHANCERS))
def test_every_parameter_gets_a_finite_gradient(enhancer_variables, name):
    model, variables = ENHANCERS[name], enhancer_variables[name]
    x = images(*SIZES[1], seed=1)

    @jit_fast
    def grads(params):
        def loss(params):
            output, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.square(output - 0.5))

        return jax.grad(loss)(params)

    flat = jax.tree_util.tree_leaves_with_path(grads(variables["params"]))
    assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in flat)
    assert not [jax.tree_util.keystr(path) for path, g in flat if not bool(jnp.any(g != 0))]


def test_rsgunet_range_scaling_multiplies_the_input_features(enhancer_variables):
    model, variables = ENHANCERS["rsgunet"], enhancer_variables["rsgunet"]
    x = images(*SIZES[1])
    calls = []

    def record(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        if isinstance(context.module, RangeScaling):
            calls.append((*args, output))
        return output

    with nn.intercept_methods(record):
        model.apply(variables, x)
    [(features, scale, scaled)] = calls
    assert features.shape == scale.shape == (2, 36, 44, model.width)
    np.testing.assert_array_equal(np.asarray(scaled), np.asarray(features * scale))
    assert float(jnp.std(scale)) > 0.0  # a per-pixel, per-channel scale, not a constant

    # With the input features at zero nothing of the image reaches the output: every image gives the same.
    params = dict(variables["params"])
    params["input_conv"] = jax.tree.map(jnp.zeros_like, params["input_conv"])
    apply = jit_fast(model.apply)
    x2, x3 = images(*SIZES[1], seed=2), images(*SIZES[1], seed=3)
    assert float(jnp.max(jnp.abs(apply(variables, x2) - apply(variables, x3)))) > 0.1
    np.testing.assert_array_equal(np.asarray(apply({**variables, "params": params}, x2)),
                                  np.asarray(apply({**variables, "params": params}, x3)))


def test_rsgunet_global_branch_sees_the_whole_image(enhancer_variables):
    """Changing one corner changes the output at the opposite corner (through the global vector)."""
    model, variables = ENHANCERS["rsgunet"], enhancer_variables["rsgunet"]
    x = images(*SIZES[0], batch=1)
    changed = x.at[:, :8, :8].set(1.0 - x[:, :8, :8])
    apply = jit_fast(model.apply)
    assert float(jnp.max(jnp.abs(apply(variables, x)[:, -4:, -4:] - apply(variables, changed)[:, -4:, -4:]))) > 0


def dynamic_filters(model, variables, x):
    _, state = model.apply(variables, x, mutable=["intermediates"])
    return state["intermediates"]["filters"][0]


@pytest.mark.parametrize("normalization", ["unit_sum", "softmax"])
def test_dynamic_filters_vary_per_pixel_and_per_image(enhancer_variables, normalization):
    model = ENHANCERS["dynamic"].clone(filter_normalization=normalization)
    x = jnp.concatenate([images(*SIZES[1], batch=1, seed=4), images(*SIZES[1], batch=1, seed=5) ** 2])
    filters = jit_fast(dynamic_filters, static_argnums=0)(model, enhancer_variables["dynamic"], x)
    assert filters.shape == (2, *SIZES[1], 25) and filters.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(filters.sum(-1)), 1.0, atol=1e-5)
    if normalization == "softmax":
        assert float(filters.min()) > 0.0
    # Per pixel: filters differ across positions of one image; per image: at the same position.
    assert float(jnp.mean(jnp.std(filters[0].reshape(-1, 25), axis=0))) > 1e-3
    assert float(jnp.mean(jnp.abs(filters[0] - filters[1]))) > 1e-3


def test_identity_filters_give_back_the_image(enhancer_variables):
    """A zero filter head gives delta filters (unit_sum): Y is unchanged and the recombination is exact."""
    model, variables = ENHANCERS["dynamic"], enhancer_variables["dynamic"]
    params = dict(variables["params"])
    params["filter_head"] = jax.tree.map(jnp.zeros_like, params["filter_head"])
    x = images(*SIZES[0])
    output = jit_fast(model.apply)({**variables, "params": params}, x)
    np.testing.assert_allclose(np.asarray(output), np.asarray(x), atol=1e-6)


def test_replace_luminance_is_the_ycbcr_round_trip():
    to_ycbcr = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    rgb = np.random.default_rng(6).uniform(size=(5, 7, 3))
    new_luma = np.random.default_rng(7).uniform(size=(5, 7))
    ycbcr = rgb @ to_ycbcr.T
    ycbcr[..., 0] = new_luma
    expected = ycbcr @ np.linalg.inv(to_ycbcr).T
    np.testing.assert_allclose(np.asarray(replace_luminance(jnp.asarray(rgb), jnp.asarray(new_luma))), expected,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(luminance(jnp.asarray(expected))), new_luma, atol=1e-5)


def test_dynamic_filtering_matches_a_direct_loop():
    rng = np.random.default_rng(8)
    image = rng.uniform(size=(2, 6, 7))
    filters = rng.normal(size=(2, 6, 7, 9))
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="edge")
    expected = np.zeros_like(image)
    for n, i, j in np.ndindex(*image.shape):
        expected[n, i, j] = np.sum(padded[n, i:i + 3, j:j + 3] * filters[n, i, j].reshape(3, 3))
    output = apply_dynamic_filters(jnp.asarray(image, jnp.float32), jnp.asarray(filters, jnp.float32))
    np.testing.assert_allclose(np.asarray(output), expected, rtol=1e-5, atol=1e-5)


def test_a_fixed_dynamic_filter_reproduces_the_sharpening_target():
    """The unsharp-mask target is a 5x5 unit-sum filter on Y: the dynamic filtering layer can represent it."""
    rng = np.random.default_rng(9)
    x = ndimage.gaussian_filter(rng.integers(0, 256, (2, 40, 48, 3)).astype(float), (0, 1, 1, 0))
    x = x.round().astype(np.uint8)
    offsets = np.arange(-2, 3)
    gaussian = np.exp(-0.5 * (offsets / SHARPEN_SIGMA) ** 2)
    gaussian = np.outer(gaussian, gaussian) / gaussian.sum() ** 2
    kernel = -SHARPEN_AMOUNT * gaussian
    kernel[2, 2] += 1.0 + SHARPEN_AMOUNT
    rgb = jnp.asarray(x, jnp.float32) / 255.0
    filters = jnp.broadcast_to(jnp.asarray(kernel.reshape(-1), jnp.float32), (*x.shape[:3], 25))
    output = jnp.clip(replace_luminance(rgb, apply_dynamic_filters(luminance(rgb), filters)), 0.0, 1.0)
    output = np.round(np.asarray(output) * 255.0).astype(np.int32)
    target = emulation_target(x, "unsharp_mask").astype(np.int32)
    assert np.abs(output - target).max() <= 1
    assert np.abs(target - x.astype(np.int32)).max() > 10  # the operator does something


@pytest.mark.parametrize("operator", OPERATORS)
def test_emulation_operators_are_deterministic_and_shape_preserving(operator):
    rng = np.random.default_rng(10)
    clean = np.kron(rng.uniform(0.2, 0.8, (4, 4)), np.ones((12, 12)))  # blocks with sharp edges
    noisy = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1)
    batch = np.stack([np.round(noisy * 255), np.round(clean * 255)]).astype(np.uint8)
    batch = np.repeat(batch[..., None], 3, axis=-1)
    batch[..., 0] = np.clip(batch[..., 0].astype(int) + 20, 0, 255)  # some colour
    first, second = emulation_target(batch, operator), emulation_target(batch, operator)
    assert first.shape == batch.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(emulation_target(batch[1], operator), first[1])
    # Only Y changes: where nothing is clipped, every channel moves by the same amount, up to rounding.
    difference = first.astype(int) - batch.astype(int)
    unclipped = np.all((first > 0) & (first < 255), axis=-1)
    assert unclipped.mean() > 0.9
    assert np.abs(difference[..., 0] - difference[..., 1])[unclipped].max() <= 1
    assert np.abs(difference[..., 2] - difference[..., 1])[unclipped].max() <= 1
    roughness_before = float(total_variation(jnp.asarray(batch[:1] / 255.0)))
    roughness_after = float(total_variation(jnp.asarray(first[:1] / 255.0)))
    if operator == "unsharp_mask":
        assert roughness_after > 1.5 * roughness_before
    else:
        assert roughness_after < 0.7 * roughness_before


def test_emulation_target_errors():
    with pytest.raises(ConfigError, match="unknown enhancement operator 'wls'"):
        emulation_target(np.zeros((8, 8, 3), np.uint8), "wls")
    with pytest.raises(DataError, match="uint8 RGB"):
        emulation_target(np.zeros((8, 8, 3), np.float32), "bilateral")


def test_clahe_is_scikit_image_and_raises_contrast():
    rng = np.random.default_rng(11)
    low_contrast = (110 + 30 * ndimage.gaussian_filter(rng.uniform(size=(2, 64, 80)), 3)).astype(np.uint8)
    batch = np.repeat(low_contrast[..., None], 3, axis=-1)
    batch[1, ..., 2] //= 2  # a coloured image
    parameters = ClaheParameters(kernel_size=16, clip_limit=0.02, nbins=128)
    output = clahe(batch, parameters)
    assert output.shape == batch.shape and output.dtype == np.uint8
    for image, result in zip(batch, output):
        expected = exposure.equalize_adapthist(image, kernel_size=16, clip_limit=0.02, nbins=128)
        np.testing.assert_array_equal(result, np.round(expected * 255).astype(np.uint8))
    np.testing.assert_array_equal(clahe(batch[0], parameters), output[0])
    assert output[0].std() > 2 * batch[0].std()
    with pytest.raises(DataError, match="uint8 RGB"):
        clahe(batch[..., :1])


def test_losses_match_references_and_vanish_on_equal_images():
    rng = np.random.default_rng(12)
    target = rng.uniform(size=(2, 32, 40, 3)).astype(np.float32)
    prediction = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1).astype(np.float32)
    expected_ssim = np.mean([metrics.structural_similarity(p, t, data_range=1.0, channel_axis=-1,
                                                           gaussian_weights=True, sigma=1.5,
                                                           use_sample_covariance=False)
                             for p, t in zip(prediction, target)])
    np.testing.assert_allclose(float(ssim(jnp.asarray(prediction), jnp.asarray(target))), expected_ssim, rtol=1e-4)
    expected_tv = (np.mean(np.diff(prediction, axis=1) ** 2) + np.mean(np.diff(prediction, axis=2) ** 2))
    np.testing.assert_allclose(float(total_variation(jnp.asarray(prediction))), expected_tv, rtol=1e-5)
    total, terms = rsgunet_loss(jnp.asarray(prediction), jnp.asarray(target))
    assert set(terms) == {"l1", "ssim", "total_variation"}  # no VGG weights: no perceptual term
    weights = LossWeights()
    np.testing.assert_allclose(float(total), float(terms["l1"] + weights.ssim * terms["ssim"]
                                                   + weights.total_variation * terms["total_variation"]), rtol=1e-6)
    _, same = rsgunet_loss(jnp.asarray(target), jnp.asarray(target))
    assert float(same["l1"]) == 0.0 and abs(float(same["ssim"])) < 1e-5


def test_content_layers_are_the_last_conv_of_stages_1_3_5():
    assert content_layer_names(vgg16()) == ("features_2", "features_14", "features_28")
    assert content_layer_names(vgg16_bn()) == ("features_4", "features_21", "features_41")


def test_perceptual_loss_compares_vgg_features():
    vgg = vgg16(num_classes=3, width=8)
    vgg_variables = random_variables(vgg, shape=(1, 32, 32, 3))
    target = images(32, 32, seed=13)
    prediction = images(32, 32, seed=14)
    loss_and_grad = jit_fast(jax.value_and_grad(lambda p: perceptual_loss(p, target, vgg, vgg_variables)))
    loss, grad = loss_and_grad(prediction)
    assert float(loss) > 0.0 and bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0.0
    assert float(loss_and_grad(target)[0]) == 0.0
    _, terms = rsgunet_loss(prediction, target, vgg=vgg, vgg_variables=vgg_variables)
    assert float(terms["perceptual"]) == pytest.approx(float(loss), rel=1e-5)


def test_rsgunet_learns_a_contrast_stretch_with_its_loss():
    """Adam steps on RSGUNet's objective reduce it, on a (low-contrast -> original) pair like proxy -> stained."""
    model = RSGUNet(width=4, depth=2)
    smooth = ndimage.gaussian_filter(np.random.default_rng(15).uniform(size=(4, 32, 32, 3)), (0, 2, 2, 0))
    target = jnp.asarray(np.clip(0.5 + 4 * (smooth - 0.5), 0, 1), jnp.float32)
    source = 0.5 + 0.3 * (target - 0.5)
    params = jit_fast(model.init)(KEY, source)["params"]
    optimizer = optax.adam(1e-2)

    @jit_fast
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: rsgunet_loss(model.apply({"params": p}, source), target)[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    losses = []
    for _ in range(40):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


@pytest.fixture(scope="module")
def composites(enhancer_variables):
    classifier = create("resnet18", num_classes=3, width=8)
    result = {}
    for name, enhancer in ENHANCERS.items():
        model = EnhanceClassify(enhancer=enhancer, classifier=classifier)
        variables = random_variables(model)
        params = {**variables["params"], "enhancer": enhancer_variables[name]["params"]}
        stats = {**variables["batch_stats"], **({"enhancer": enhancer_variables[name]["batch_stats"]}
                                                if "batch_stats" in enhancer_variables[name] else {})}
        result[name] = model, {"params": params, "batch_stats": stats}
    return result


@pytest.mark.parametrize("name", list(ENHANCERS))
def test_enhancers_plug_into_enhance_classify(composites, enhancer_variables, name):
    model, variables = composites[name]
    x = images(*SIZES[0])
    logits = jit_fast(model.apply)(variables, x)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    enhanced = jit_fast(functools.partial(model.apply, method="enhance"))(variables, x)
    np.testing.assert_allclose(np.asarray(enhanced),
                               np.asarray(jit_fast(ENHANCERS[name].apply)(enhancer_variables[name], x)), atol=1e-6)


def test_frozen_enhancer_stays_fixed_while_the_classifier_trains(composites):
    model, variables = composites["rsgunet"]
    x, labels = images(*SIZES[0], batch=4, seed=16), jnp.array([0, 1, 2, 0])
    optimizer = freeze_enhancer(optax.sgd(0.1, momentum=0.9))

    @jit_fast
    def step(params, opt_state):
        def loss(params):
            logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                    mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    params, opt_state, grads = step(variables["params"], optimizer.init(variables["params"]))
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads["enhancer"]))  # it would have moved
    unchanged = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params["enhancer"],
                              variables["params"]["enhancer"])
    assert all(jax.tree.leaves(unchanged))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params["classifier"], variables["params"]["classifier"])
    assert all(jax.tree.leaves(moved))


def test_enhance_classify_freezes_its_enhancer_only_in_the_classification_pass(composites):
    """freeze_enhancer: no gradient into the enhancer and its BatchNorm statistics fixed in __call__;
    `enhance` (phase 1) still trains it."""
    model, variables = composites["dynamic"]  # the dynamic enhancer has BatchNorm
    frozen = model.clone(freeze_enhancer=True)
    x, labels = images(*SIZES[0], batch=2, seed=17), jnp.array([0, 2])

    def loss(params, module):
        logits, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                       mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    def loss_and_gradients(module):
        return jit_fast(jax.value_and_grad(functools.partial(loss, module=module), has_aux=True))(variables["params"])

    (_, updates), grads = loss_and_gradients(frozen)
    assert all(not bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads["enhancer"]))
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads["classifier"]))
    same_stats = jax.tree.map(jnp.array_equal, updates["batch_stats"]["enhancer"], variables["batch_stats"]["enhancer"])
    assert all(jax.tree.leaves(same_stats))
    (_, updates), grads = loss_and_gradients(model)
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads["enhancer"]))
    enhance = functools.partial(frozen.apply, train=True, method="enhance", mutable=["batch_stats"])
    _, enhance_updates = jit_fast(enhance)(variables, x)
    assert not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, enhance_updates["batch_stats"]["enhancer"],
                                                variables["batch_stats"]["enhancer"])))


def test_reconstruction_loss_per_image_averages_to_the_batch_loss():
    prediction, target = images(40, 48, batch=3, seed=18), images(40, 48, batch=3, seed=19)
    weights = LossWeights(ssim=0.3, total_variation=0.2)
    per_image = ReconstructionLoss("rsgunet", weights)(prediction, target)
    assert per_image.shape == (3,)
    np.testing.assert_allclose(float(jnp.mean(per_image)), float(rsgunet_loss(prediction, target, weights)[0]),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ReconstructionLoss()(prediction, target)),
                               np.mean(np.square(np.asarray(prediction) - np.asarray(target)), axis=(1, 2, 3)),
                               rtol=1e-6)


def test_frozen_optimizer_keeps_its_learning_rate_readable():
    """train.freeze_enhancer wraps the optimiser inside inject_hyperparams: the logged lr still reads."""
    config = base_config().optimizer
    config.weight_decay = 0.1  # would move a zero-gradient enhancer if it were not frozen
    optimizer = make_optimizer(config, 10, freeze_enhancer=True)
    params = {"enhancer": {"w": jnp.ones(3)}, "classifier": {"w": jnp.ones(3)}}
    state = optimizer.init(params)
    updates, state = optimizer.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert float(current_learning_rate(state)) == np.float32(config.lr)
    assert not bool(jnp.any(updates["enhancer"]["w"] != 0)) and bool(jnp.all(updates["classifier"]["w"] != 0))
