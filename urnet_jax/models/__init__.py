"""The model zoo: classifiers in torchvision's layouts, image enhancers, and their composition.

`create(name, **kwargs)` builds any model by name; every module is also importable on its own, e.g.
`from urnet_jax.models.resnet import ResNet`. All models take NHWC float inputs and `train: bool`.
"""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn

# name -> "module:factory" (imported lazily so that using one model does not import the others).
_REGISTRY: dict[str, str] = {
    "resnet18": "urnet_jax.models.resnet:resnet18",
    "resnet34": "urnet_jax.models.resnet:resnet34",
    "resnet50": "urnet_jax.models.resnet:resnet50",
    "resnet101": "urnet_jax.models.resnet:resnet101",
    "resnet152": "urnet_jax.models.resnet:resnet152",
    "vgg16": "urnet_jax.models.vgg:vgg16",
    "vgg16_bn": "urnet_jax.models.vgg:vgg16_bn",
    "mobilenet_v2": "urnet_jax.models.mobilenet:mobilenet_v2",
    "densenet121": "urnet_jax.models.densenet:densenet121",
    "unet": "urnet_jax.models.unet:UNet",
    "unetpp": "urnet_jax.models.unetpp:UNetPlusPlus",
    "resunet": "urnet_jax.models.resunet:ResUNet",
    "urnet": "urnet_jax.models.urnet:URNetEnhancer",
}

CLASSIFIERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg16_bn",
               "mobilenet_v2", "densenet121")
ENHANCERS = ("unet", "unetpp", "resunet", "urnet")


def names() -> tuple[str, ...]:
    """Every name `create` accepts."""
    return tuple(_REGISTRY)


def create(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered as `name` with constructor keyword arguments `kwargs`.

    Raises ValueError naming the known models when `name` is unknown.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}")
    module_name, attr = _REGISTRY[name].split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**kwargs)
