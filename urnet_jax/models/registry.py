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
# `conv_frontend.width_matching_urnet(64)`, kept as a number so that importing the registry stays cheap.
URNET_MATCHED_CONV_FRONTEND_WIDTH = 1155


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
    default_width: int | None = None  # enhancers only: the width that model.enhancer_width=0 selects
    residual_output: bool = False  # enhancers only: accepts output_activation="residual" (model.enhancer_output)
    paper_method: str = ""  # enhancers only: the row of the paper's Table 4 that this enhancer reimplements
    group_norm: bool = False  # classifiers only: accepts norm="group" (model.norm)


def _classifier(name: str, display_name: str, module: str, head: str, weights: Mapping[str, str],
                flattened_input: str = "") -> ModelSpec:
    files = {version: f"{_DOWNLOADS}/{file}" for version, file in weights.items()}
    return ModelSpec(name, CLASSIFIER, display_name, f"urnet_jax.models.{module}:{name}",
                     TorchvisionLayout(head, files, flattened_input), group_norm=module == "resnet")


def _enhancer(name: str, display_name: str, factory: str, default_width: int, residual_output: bool = False,
              paper_method: str = "") -> ModelSpec:
    return ModelSpec(name, ENHANCER, display_name, f"urnet_jax.models.{factory}", default_width=default_width,
                     residual_output=residual_output, paper_method=paper_method)


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
    _enhancer("unet", "UNet", "unet:UNet", 64, residual_output=True),
    _enhancer("unetpp", "UNet++", "unetpp:UNetPlusPlus", 64, residual_output=True),
    _enhancer("resunet", "ResUNet", "resunet:ResUNet", 64, residual_output=True),
    _enhancer("urnet", "UR-Net", "urnet:URNetEnhancer", 64, residual_output=True, paper_method="UR-Net"),
    # RSGUNet: the authors' 16-32-64-128.
    _enhancer("rsgunet", "RSGUNet (Huang et al. 2018)", "rsgunet:RSGUNet", 16, paper_method="Huang et al. 2018"),
    _enhancer("dynamic_enhancement", "Dynamic enhancement (Sharma et al. 2018)",
              "dynamic_enhancement:DynamicEnhancer", 16, paper_method="Sharma et al. 2018"),
    # The capacity control: its default width gives about the parameter count of UR-Net's default (width 64);
    # `conv_frontend.width_matching_urnet(w)` gives the width matching UR-Net of width w.
    _enhancer("conv_frontend", "Conv front end", "conv_frontend:ConvFrontend", URNET_MATCHED_CONV_FRONTEND_WIDTH,
              residual_output=True),
)}

CLASSIFIER_NAMES: tuple[str, ...] = tuple(name for name, spec in MODELS.items() if spec.kind == CLASSIFIER)
ENHANCER_NAMES: tuple[str, ...] = tuple(name for name, spec in MODELS.items() if spec.kind == ENHANCER)
RESIDUAL_OUTPUT_ENHANCERS: tuple[str, ...] = tuple(name for name in ENHANCER_NAMES if MODELS[name].residual_output)
GROUP_NORM_CLASSIFIERS: tuple[str, ...] = tuple(name for name in CLASSIFIER_NAMES if MODELS[name].group_norm)


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


def default_width(name: str) -> int:
    """The width of enhancer `name` when model.enhancer_width is 0 (ValueError for a non-enhancer)."""
    width = spec(name).default_width
    if width is None:
        raise ValueError(f"{name!r} is not an enhancer; enhancers: {', '.join(ENHANCER_NAMES)}")
    return width


def display_name(name: str) -> str:
    """The table spelling of a model name ("UR-Net" for "urnet"); other values (e.g. "none") unchanged."""
    return MODELS[name].display_name if name in MODELS else name
