"""Classifiers against torchvision: logits, stage features and Grad-CAM gradients with ported random weights
(eval mode, fp32, CPU, 200x200), parameter counts, tiny-width forward passes, dtypes and dropout."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urnet_jax import models, port

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
PARITY_INPUT_SHAPE = (2, 200, 200, 3)  # NHWC, the paper's 200x200 crops
TOLERANCE = 1e-4  # max abs difference of logits (of features: relative to their largest magnitude)


def _resnet_head(model, last_conv):
    return model.fc(torch.flatten(model.avgpool(last_conv), 1))


def _vgg_head(model, last_conv):
    return model.classifier(torch.flatten(model.avgpool(model.features[-1](last_conv)), 1))


def _pool_classifier_head(model, last_conv):
    return model.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(last_conv, 1), 1))


_RESNET_TAPS = {"stem": "maxpool", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3",
                "layer4": "layer4", "last_conv": "layer4"}
# Per torchvision model: the module whose output each sown JAX intermediate is, a function applied to that
# output first (DenseNet.forward applies F.relu to `features`), and the torch computation from the
# Grad-CAM target ('last_conv') to the logits.
TORCH_SPECS = {
    **{name: (_RESNET_TAPS, None, _resnet_head) for name in RESNETS},
    "vgg16": ({"last_conv": "features.29"}, None, _vgg_head),  # last conv's ReLU, before the final pool
    "vgg16_bn": ({"last_conv": "features.42"}, None, _vgg_head),
    "mobilenet_v2": ({"last_conv": "features"}, None, _pool_classifier_head),
    "densenet121": ({"last_conv": "features"}, torch.relu, _pool_classifier_head),
}


def randomise_like_trained(model: "torch.nn.Module", seed: int) -> None:
    """Random weights (He-scaled), biases and BatchNorm affine parameters; BatchNorm running statistics taken
    from a random calibration batch and then perturbed, so that eval-mode BN really normalises with running
    statistics (not the identity) while activations and logits stay O(1) even in ResNet-152."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):  # He init: O(1) activations
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (2 / fan_in) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1, generator=generator)
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.normal_(0, 0.2, generator=generator)
        for block in model.modules():
            # Trained ResNets have small gammas on each residual branch's last BN (torchvision can even start
            # them at 0: zero_init_residual); with O(1) gammas the residual stream of ResNet-152 grows so
            # large that fp32 rounding alone (torch's included) exceeds 1e-4 on the logits.
            if isinstance(block, torchvision.models.resnet.Bottleneck):
                block.bn3.weight.uniform_(0.1, 0.4, generator=generator)
            elif isinstance(block, torchvision.models.resnet.BasicBlock):
                block.bn2.weight.uniform_(0.1, 0.4, generator=generator)
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average: running stats := the calibration batch's
        if norms:
            model.train()
            model(torch.randn(2, 3, 96, 96, generator=generator))
        for norm in norms:
            norm.momentum = 0.1
            norm.running_mean += 0.2 * norm.running_var.sqrt() * torch.randn(norm.num_features, generator=generator)
            norm.running_var *= torch.empty(norm.num_features).uniform_(0.7, 1.4, generator=generator)
    model.eval()


def torch_reference(name: str, model: "torch.nn.Module", image_nhwc: np.ndarray) -> dict:
    """Eval-mode logits, tapped features (NHWC) and d(sum of class-0 logits)/d(last_conv) of a torch model."""
    taps, post, head = TORCH_SPECS[name]
    captured = {}
    hooks = []
    for tap_name, module_path in taps.items():
        def hook(module, inputs, output, tap_name=tap_name):
            captured[tap_name] = output.detach().clone()  # clone: a later in-place ReLU would change it

        hooks.append(model.get_submodule(module_path).register_forward_hook(hook))
    with torch.no_grad():
        logits = model(torch.from_numpy(image_nhwc.transpose(0, 3, 1, 2))).numpy()
    for handle in hooks:
        handle.remove()
    features = {k: (post(v) if post else v) for k, v in captured.items()}
    last_conv = features["last_conv"].requires_grad_()
    head(model, last_conv)[:, 0].sum().backward()
    return {
        "logits": logits,
        "features": {k: v.detach().numpy().transpose(0, 2, 3, 1) for k, v in features.items()},
        "grad_cam_grad": last_conv.grad.numpy().transpose(0, 2, 3, 1),
    }


def jax_outputs(model, variables: dict, image: np.ndarray) -> dict:
    """Logits, sown intermediates and d(sum of class-0 logits)/d(last_conv) (via 'perturbations')."""
    perturbations = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)[
        "perturbations"
    ]

    def class_score(perturbation, variables):
        logits, state = model.apply(
            {**variables, "perturbations": perturbation}, image, train=False, mutable=["intermediates"]
        )
        return logits[:, 0].sum(), (logits, state["intermediates"])

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), perturbations)
    grads, (logits, intermediates) = jax.jit(jax.grad(class_score, has_aux=True))(zeros, variables)
    return {
        "logits": np.asarray(logits),
        "features": {k: np.asarray(v[0]) for k, v in intermediates.items()},
        "grad_cam_grad": np.asarray(grads["last_conv"]),
    }


@pytest.fixture(scope="module")
def parity(request) -> dict:
    """A torchvision model with random weights vs. the same weights ported to JAX (eval mode, fp32, CPU)."""
    name = request.param
    image = np.random.default_rng(0).normal(size=PARITY_INPUT_SHAPE).astype(np.float32)
    torch.manual_seed(0)
    torch_model = getattr(torchvision.models, name)()
    randomise_like_trained(torch_model, seed=1)
    reference = torch_reference(name, torch_model, image)
    torch_param_count = sum(p.numel() for p in torch_model.parameters())
    variables = port.from_torchvision(name, torch_model.state_dict())
    del torch_model
    ours = jax_outputs(models.create(name), variables, image)
    return {
        "name": name,
        "torch": reference,
        "jax": ours,
        "torch_param_count": torch_param_count,
        "jax_param_count": sum(leaf.size for leaf in jax.tree.leaves(variables["params"])),
    }


def max_relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max(1, max |reference|)."""
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / max(1.0, np.abs(reference).max()))


@pytest.mark.slow
@pytest.mark.parametrize("parity", models.CLASSIFIERS, indirect=True)
def test_logits_match_torchvision(parity):
    reference, ours = parity["torch"]["logits"], parity["jax"]["logits"]
    assert ours.dtype == np.float32 and ours.shape == (2, 1000)
    assert reference.std() > 0.3, "logits too small for the absolute tolerance to mean anything"
    assert np.abs(ours - reference).max() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("parity", models.CLASSIFIERS, indirect=True)
def test_grad_cam_target_and_gradient_match_torchvision(parity):
    features = parity["jax"]["features"]["last_conv"], parity["torch"]["features"]["last_conv"]
    assert max_relative_error(*features) <= TOLERANCE
    # Grad-CAM's channel weights: the spatial mean of d(class score)/d(last_conv). (The gradient itself may
    # differ where a max pool's window has tied maxima, e.g. all-zero ReLU outputs in VGG: torch and XLA
    # route the gradient to different tied elements; the window's sum, and so this mean, is the same.)
    reference_weights = parity["torch"]["grad_cam_grad"].mean(axis=(1, 2))
    assert np.abs(reference_weights).max() > 0
    assert max_relative_error(parity["jax"]["grad_cam_grad"].mean(axis=(1, 2)), reference_weights) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("parity", models.CLASSIFIERS, indirect=True)
def test_parameter_count_matches_torchvision(parity):
    assert parity["jax_param_count"] == parity["torch_param_count"]
    if parity["name"] == "resnet101":
        assert parity["jax_param_count"] == 44_549_160


@pytest.mark.slow
@pytest.mark.parametrize("parity", ["resnet101"], indirect=True)
def test_resnet101_stages_match_torchvision(parity):
    for stage in ("stem", "layer1", "layer2", "layer3", "layer4"):
        error = max_relative_error(parity["jax"]["features"][stage], parity["torch"]["features"][stage])
        assert error <= TOLERANCE, (stage, error)


TINY_INPUT_SHAPE = (2, 96, 96, 3)  # the deepest maps are 3x3
TINY_WIDTH = 8


def random_variables(model, seed: int) -> dict:
    """O(1)-activation random params and BatchNorm statistics for `model` (cheaper to build than `init`)."""
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros(TINY_INPUT_SHAPE))
    rng = np.random.default_rng(seed)

    def sample(path, shape):
        leaf = path[-1].key
        if leaf == "kernel":
            return rng.normal(0, np.prod(shape.shape[:-1]) ** -0.5 * 1.4, shape.shape)
        if leaf in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape.shape)
        return rng.normal(0, 0.1, shape.shape)  # bias, mean

    return {
        collection: jax.tree_util.tree_map_with_path(
            lambda path, shape: jnp.asarray(sample(path, shape), jnp.float32), shapes[collection]
        )
        for collection in ("params", "batch_stats")
        if collection in shapes
    }


@pytest.mark.parametrize(
    ("name", "last_conv_shape"),  # every channel count scales with width / torchvision's width
    [("resnet18", (3, 3, 8 * TINY_WIDTH)), ("resnet50", (3, 3, 32 * TINY_WIDTH)), ("vgg16_bn", (6, 6, 8 * TINY_WIDTH))],
)
def test_tiny_width_forward(name, last_conv_shape):
    model = models.create(name, num_classes=3, width=TINY_WIDTH)
    variables = random_variables(model, seed=0)
    image = jax.random.normal(jax.random.key(1), TINY_INPUT_SHAPE)
    logits, state = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))(variables, image)
    last_conv = state["intermediates"]["last_conv"][0]
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all() and float(jnp.std(logits)) > 0
    assert last_conv.shape == (2, *last_conv_shape)


@pytest.mark.parametrize(
    ("name", "torch_factory"),
    [
        ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=3, width_mult=TINY_WIDTH / 32)),
        ("densenet121", lambda: torchvision.models.DenseNet(TINY_WIDTH, (6, 12, 24, 16), 2 * TINY_WIDTH,
                                                             num_classes=3)),
    ],
)
def test_tiny_width_is_torchvision_width(name, torch_factory):
    """`width` is torchvision's own width knob where it has one (MobileNetV2 width_mult, DenseNet growth)."""
    torch.manual_seed(0)
    torch_model = torch_factory()
    randomise_like_trained(torch_model, seed=2)
    image = np.random.default_rng(2).normal(size=TINY_INPUT_SHAPE).astype(np.float32)
    reference = torch_reference(name, torch_model, image)
    variables = port.from_torchvision(name, torch_model.state_dict(), num_classes=3, width=TINY_WIDTH)
    ours = jax_outputs(models.create(name, num_classes=3, width=TINY_WIDTH), variables, image)
    assert reference["logits"].std() > 0.3
    assert np.abs(ours["logits"] - reference["logits"]).max() <= TOLERANCE
    assert max_relative_error(ours["grad_cam_grad"], reference["grad_cam_grad"]) <= TOLERANCE


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model_fp32 = models.create("resnet18", num_classes=3, width=TINY_WIDTH)
    model_bf16 = models.create("resnet18", num_classes=3, width=TINY_WIDTH, dtype=jnp.bfloat16)
    variables = random_variables(model_fp32, seed=0)
    image = jax.random.normal(jax.random.key(1), TINY_INPUT_SHAPE)
    logits_fp32 = jax.jit(functools.partial(model_fp32.apply, train=False))(variables, image)
    logits_bf16, state = jax.jit(functools.partial(model_bf16.apply, train=True, mutable=["batch_stats"]))(
        variables, image
    )
    assert logits_bf16.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["batch_stats"]))
    eval_bf16 = jax.jit(functools.partial(model_bf16.apply, train=False))(variables, image)
    np.testing.assert_allclose(eval_bf16, logits_fp32, atol=0.05 * float(jnp.abs(logits_fp32).max()))


def test_vgg_dropout_only_in_training_and_needs_an_rng():
    model = models.create("vgg16", num_classes=3, width=TINY_WIDTH)
    variables = random_variables(model, seed=0)
    image = jax.random.normal(jax.random.key(1), TINY_INPUT_SHAPE)
    train_apply = jax.jit(lambda key: model.apply(variables, image, train=True, rngs={"dropout": key}))
    eval_apply = jax.jit(functools.partial(model.apply, train=False))
    assert not np.allclose(train_apply(jax.random.key(2)), train_apply(jax.random.key(3)))
    np.testing.assert_array_equal(eval_apply(variables, image), eval_apply(variables, image))
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        jax.eval_shape(lambda v: model.apply(v, image, train=True), variables)
