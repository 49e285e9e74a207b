"""The model zoo: classifiers in torchvision's layouts, image enhancers, and their composition.

`create(name, **kwargs)` builds any model by name (the names, kinds and factories are listed once, in
`urnet_jax.models.registry`); every module is also importable on its own, e.g.
`from urnet_jax.models.resnet import ResNet`. All models take NHWC float inputs and `train: bool`.
Importing this package is cheap: a model's module (and Flax) is imported when the model is created.
"""

from urnet_jax.models.registry import CLASSIFIER_NAMES as CLASSIFIERS
from urnet_jax.models.registry import ENHANCER_NAMES as ENHANCERS
from urnet_jax.models.registry import create, names

__all__ = ["CLASSIFIERS", "ENHANCERS", "create", "names"]
