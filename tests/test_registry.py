"""urnet_jax.models.registry: the one list of model names, kinds, display names, factories and torchvision heads."""

import ast
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from urnet_jax import models
from urnet_jax.models import registry
from urnet_jax.models.composite import build_model
from urnet_jax.models.conv_frontend import width_matching_urnet

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_names_kinds_and_reexports():
    assert models.names() == registry.names() == tuple(registry.MODELS)
    assert models.CLASSIFIERS == registry.CLASSIFIER_NAMES and models.ENHANCERS == registry.ENHANCER_NAMES
    assert set(models.CLASSIFIERS) | set(models.ENHANCERS) == set(models.names())
    assert not set(models.CLASSIFIERS) & set(models.ENHANCERS)
    assert models.ENHANCERS == ("unet", "unetpp", "resunet", "urnet", "rsgunet", "dynamic_enhancement",
                                "conv_frontend")
    for name, spec in registry.MODELS.items():
        assert spec.name == name and spec.kind in (registry.ENHANCER, registry.CLASSIFIER)
        assert (spec.torchvision is not None) == (spec.kind == registry.CLASSIFIER)
    assert registry.display_name("urnet") == "UR-Net" and registry.display_name("vgg16_bn") == "VGG16-BN"
    assert registry.display_name(registry.NO_ENHANCER) == "none"
    assert registry.display_name("rsgunet") == "RSGUNet (Huang et al. 2018)"
    assert registry.display_name("dynamic_enhancement") == "Dynamic enhancement (Sharma et al. 2018)"
    with pytest.raises(ValueError, match="unknown model 'alexnet'; known models: resnet18, "):
        models.create("alexnet")


def _abstract_params(name: str, **kwargs):
    model = models.create(name, **kwargs)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))["params"]


@pytest.mark.parametrize("name", registry.CLASSIFIER_NAMES)
def test_torchvision_layout_names_real_layers(name):
    """The head is the params entry whose output is the class count; the flattened-input layer exists."""
    layout = registry.MODELS[name].torchvision
    params = _abstract_params(name, num_classes=7)
    assert params[layout.head]["kernel"].shape[-1] == 7
    if layout.flattened_input:
        assert params[layout.flattened_input]["kernel"].ndim == 2
    assert "IMAGENET1K_V1" in layout.weights
    assert all(url.startswith("https://download.pytorch.org/models/" + name + "-") for url in layout.weights.values())


@pytest.mark.parametrize("name", registry.ENHANCER_NAMES)
def test_enhancer_factories_build_enhancers(name):
    model = models.create(name, width=4)
    assert type(model).__name__ == registry.MODELS[name].factory.split(":")[1]
    params = _abstract_params(name, width=4)
    assert params  # an enhancer with parameters, applied to an image


def test_importing_the_registry_is_cheap():
    """Entry points read model names for `--help` and validation: the registry imports no JAX or Flax."""
    code = "import sys, urnet_jax.models; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _literal_collections_of_model_names(source: str) -> list[int]:
    """Line numbers of tuple/list/set/dict literals in Python `source` holding two or more model names."""
    names = set(registry.names())
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            elements = node.keys if isinstance(node, ast.Dict) else node.elts
            if len({e.value for e in elements if isinstance(e, ast.Constant) and e.value in names}) >= 2:
                lines.append(node.lineno)
    return lines


def test_model_names_are_listed_only_in_the_registry():
    assert _literal_collections_of_model_names('X = 1\nENHANCERS = ("none", "unet", "urnet")\n') == [2]
    assert _literal_collections_of_model_names('HEADS = {"resnet18": "fc", "vgg16": "classifier_6"}') == [1]
    sources = [*sorted((REPO_ROOT / "urnet_jax").rglob("*.py")), *sorted(REPO_ROOT.glob("*.py"))]
    listed = {str(path.relative_to(REPO_ROOT)): lines for path in sources
              if (lines := _literal_collections_of_model_names(path.read_text()))}
    assert listed == {}, f"model names listed outside urnet_jax/models/registry.py: {listed}"


def test_enhancer_width_zero_selects_each_models_default():
    """build_model reads the registry's default width: the authors' 16 for RSGUNet and the dynamic enhancer."""
    assert {name: registry.default_width(name) for name in ("urnet", "rsgunet", "dynamic_enhancement")} == {
        "urnet": 64, "rsgunet": 16, "dynamic_enhancement": 16}
    assert registry.default_width("conv_frontend") == width_matching_urnet(64)
    with pytest.raises(ValueError, match="'resnet18' is not an enhancer"):
        registry.default_width("resnet18")
    for name in registry.ENHANCER_NAMES:
        config = types.SimpleNamespace(enhancer=name, classifier="resnet18", enhancer_width=0, classifier_width=4)
        assert build_model(config, num_classes=3).enhancer.width == registry.default_width(name)
        config.enhancer_width = 5
        assert build_model(config, num_classes=3).enhancer.width == 5
