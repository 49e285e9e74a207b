"""The one place that lists every configuration key, its default and what it means.

Config files in `configs/` start from `base_config()` and override what differs; the training
entry point validates the result with `validate` before doing any work.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Any

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The paper's UR-Net (Net4) protocol: ResNet101 + UR-Net enhancer, 200 px, SGD lr 1e-4, batch 32."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.precision = "float32"  # or "bfloat16": bf16 compute, float32 master weights.
    config.batch_size = 32  # global batch, split over every device.
    config.eval_batch_size = 64

    config.model = ml_collections.ConfigDict()
    config.model.enhancer = "urnet"  # none | unet | unetpp | resunet | urnet
    config.model.classifier = "resnet101"  # any classifier name of urnet_jax.models.create
    config.model.enhancer_width = 64  # channels of the first level; UNet's 64-128-256-512-1024.
    config.model.classifier_width = 0  # 0: torchvision's width; smaller values give tiny test models.
    config.model.pretrained = ""  # path to a torchvision .pth (or a converted checkpoint); "" = random init.

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # class-per-folder image root; "" = the built-in synthetic data set.
    # "wbc3" | "folders" | {"class": ["folder", ...]}; typed `object` so that a config file may assign a dict.
    config.data.class_map = ml_collections.FieldReference("wbc3", field_type=object)
    config.data.image_size = 200  # pixels (square)
    config.data.test_fraction = 0.2
    config.data.seed = 0  # split and augmentation seed
    config.data.train_size = 10000  # training images after offline augmentation
    config.data.variant = "raw"  # raw | stainfree_proxy
    config.data.synthetic_per_class = 200  # images per class of the synthetic data set
    config.data.prepared_dir = ""  # where `prepare` writes the data set; "" = <workdir>/data

    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.epochs = 100  # phase 1: enhancer identity reconstruction (0 skips the phase)

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 200  # phase 2: joint enhancer + classifier training

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # sgd | adamw
    config.optimizer.lr = 1e-4
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule = "constant"  # constant | cosine: lr decays to 0 over each phase (half cosine)
    config.optimizer.warmup_steps = 0  # linear rise of the lr from 0 at the start of each phase

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500  # periodic saves within an epoch (0: only at epoch ends)
    config.checkpoint.keep = 2  # periodic checkpoints kept (the best one is kept apart)

    config.log_every_steps = 50
    return config


@functools.cache
def _sections() -> frozenset[str]:
    """The section names of `base_config` (model, data, ...), found once."""
    return frozenset(key for key, value in base_config().items() if isinstance(value, ml_collections.ConfigDict))


@functools.cache
def _flat_defaults() -> Mapping[str, Any]:
    """`flatten(base_config())`, built once (read-only)."""
    return types.MappingProxyType(flatten(base_config().to_dict()))


def flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """{'section.key': value} of a config (a ConfigDict's `to_dict()` or a config.json); the sections are
    those of `base_config`, so a dict-valued key (data.class_map) stays one value."""
    sections = _sections()
    flat = {}
    for key, value in config.items():
        if key in sections and isinstance(value, Mapping):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       ignored: frozenset[str] = frozenset()) -> list[str]:
    """'key: saved != current' for every key outside `ignored` in which two nested configs differ.

    A key that `saved` (a run's config.json or checkpoint metadata) lacks was added to `base_config`
    after it was written; the run was made with that key's default, so it is compared as the default.
    """
    old, new = {**_flat_defaults(), **flatten(saved)}, flatten(current)
    return [f"{key}: {old.get(key)!r} != {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if key not in ignored and old.get(key) != new.get(key)]


def saved_config(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A run's saved config (config.json) with the keys added to `base_config` since then at their defaults.

    Raises ValueError (one line) for a key this version does not have or a value of the wrong type.
    """
    config = base_config()
    config.lock()  # no new keys
    for key, value in flatten(saved).items():
        section, _, name = key.rpartition(".")
        try:
            (config[section] if section else config)[name] = value
        except (AttributeError, KeyError, TypeError, ValueError) as error:  # an unknown key or a wrong type
            raise ValueError(f"saved config key {key}={value!r} does not fit this version's config: "
                             f"{' '.join(str(error).split())}") from None
    config.unlock()
    return config
