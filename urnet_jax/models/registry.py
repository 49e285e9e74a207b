"""The one list of models: every name `create` accepts, its kind, display name, factory and torchvision layout.

Adding a model means adding one `ModelSpec` below; model construction (`create`), config validation,
the composite model, the torchvision port and the report tables all read this list. Importing it is
cheap: a factory's module is imported only when that model is created.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

ENHANCER = "enhancer"
CLASSIFIER = "classifier"
NO_ENHANCER = "none"  # the config value of `model.enhancer` for a classifier alone

_DOWNLOADS = "https://download.pytorch.org/models"


@dataclasses.dataclass(frozen=True)
class TorchvisionLayout:
    """Where a classifier's torchvision weights come from and how they map onto the Flax model.

    head: the top-level params entry of the classification layer (replaced for a new number of classes).
    flattened_input: the Linear layer that follows torch's NCHW flatten ("" if none); its input rows
      need the CHW -> HWC reorder.
    weights: torchvision's ImageNet weight files by weights name; IMAGENET1K_V1 is what
      `pretrained=True` gave (and what the paper used).
    """

    head: str
    weights: Mapping[str, str]
    flattened_input: str = ""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model: `factory` is "module:attribute", a callable taking the model's keyword arguments."""

    name: str
    kind: str  # ENHANCER or CLASSIFIER
    display_name: str  # as the paper's tables spell it
    factory: str
    torchvision: TorchvisionLayout | None = None  # classifiers only


def _classifier(name: str, display_name: str, module: str, head: str, weights: Mapping[str, str],
                flattened_input: str = "") -> ModelSpec:
    files = {version: f"{_DOWNLOADS}/{file}" for version, file in weights.items()}
    return ModelSpec(name, CLASSIFIER, display_name, f"urnet_jax.models.{module}:{name}",
                     TorchvisionLayout(head, files, flattened_input))


def _enhancer(name: str, display_name: str, factory: str) -> ModelSpec:
    return ModelSpec(name, ENHANCER, display_name, f"urnet_jax.models.{factory}")


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    _classifier("resnet18", "ResNet18", "resnet", "fc", {"IMAGENET1K_V1": "resnet18-f37072fd.pth"}),
    _classifier("resnet34", "ResNet34", "resnet", "fc", {"IMAGENET1K_V1": "resnet34-b627a593.pth"}),
    _classifier("resnet50", "ResNet50", "resnet", "fc", {"IMAGENET1K_V1": "resnet50-0676ba61.pth",
                                                         "IMAGENET1K_V2": "resnet50-11ad3fa6.pth"}),
    _classifier("resnet101", "ResNet101", "resnet", "fc", {"IMAGENET1K_V1": "resnet101-63fe2227.pth",
                                                           "IMAGENET1K_V2": "resnet101-cd907fc2.pth"}),
    _classifier("resnet152", "ResNet152", "resnet", "fc", {"IMAGENET1K_V1": "resnet152-394f9c45.pth",
                                                           "IMAGENET1K_V2": "resnet152-f82ba261.pth"}),
    _classifier("vgg16", "VGG16", "vgg", "classifier_6", {"IMAGENET1K_V1": "vgg16-397923af.pth"},
                flattened_input="classifier_0"),
    _classifier("vgg16_bn", "VGG16-BN", "vgg", "classifier_6", {"IMAGENET1K_V1": "vgg16_bn-6c64b313.pth"},
                flattened_input="classifier_0"),
    _classifier("mobilenet_v2", "MobileNetV2", "mobilenet", "classifier_1",
                {"IMAGENET1K_V1": "mobilenet_v2-b0353104.pth", "IMAGENET1K_V2": "mobilenet_v2-7ebf99e0.pth"}),
    _classifier("densenet121", "DenseNet121", "densenet", "classifier",
                {"IMAGENET1K_V1": "densenet121-a639ec97.pth"}),
    _enhancer("unet", "UNet", "unet:UNet"),
    _enhancer("unetpp", "UNet++", "unetpp:UNetPlusPlus"),
    _enhancer("resunet", "ResUNet", "resunet:ResUNet"),
    _enhancer("urnet", "UR-Net", "urnet:URNetEnhancer"),
)}

CLASSIFIER_NAMES: tuple[str, ...] = tuple(name for name, spec in MODELS.items() if spec.kind == CLASSIFIER)
ENHANCER_NAMES: tuple[str, ...] = tuple(name for name, spec in MODELS.items() if spec.kind == ENHANCER)


def names() -> tuple[str, ...]:
    """Every name `create` accepts."""
    return tuple(MODELS)


def spec(name: str) -> ModelSpec:
    """The registry entry of `name`; ValueError (one line) naming the known models when unknown."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def factory(name: str) -> Callable[..., Any]:
    """The constructor of model `name` (its module is imported here, not before)."""
    module_name, attribute = spec(name).factory.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def create(name: str, **kwargs: Any) -> Any:
    """Builds the model registered as `name` (a flax.linen.Module) with constructor keyword arguments `kwargs`.

    Raises ValueError naming the known models when `name` is unknown.
    """
    return factory(name)(**kwargs)


def display_name(name: str) -> str:
    """The table spelling of a model name ("UR-Net" for "urnet"); other values (e.g. "none") unchanged."""
    return MODELS[name].display_name if name in MODELS else name
