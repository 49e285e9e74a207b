"""The one place that lists every configuration key, its default and what it means.

Config files in `configs/` start from `base_config()` and override what differs; every entry point
that trains validates the result with `validate` before doing any work.
"""

from __future__ import annotations

import functools
import math
import pathlib
import types
from collections.abc import Mapping
from typing import Any

import ml_collections

from urnet_jax.errors import ConfigError
from urnet_jax.models import CLASSIFIERS, ENHANCERS

PRECISIONS = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
MIN_IMAGE_SIZE = 32


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
    config.data.dir = ""  # class-per-folder image root; "" = the built-in synthetic cells (see allow_synthetic)
    config.data.allow_synthetic = False  # an empty data.dir is an error unless True (configs/demo.py, tests)
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


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with file paths made absolute (data.dir, data.prepared_dir, model.pretrained)."""
    resolved = ml_collections.ConfigDict(config.to_dict())
    for section, key in (("data", "dir"), ("data", "prepared_dir"), ("model", "pretrained")):
        if resolved[section][key]:
            resolved[section][key] = str(pathlib.Path(resolved[section][key]).expanduser().resolve())
    return resolved


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> ml_collections.ConfigDict:
    """Checks every key that training reads; raises ConfigError naming the first bad one. Returns config.

    `device_count` (default: `jax.device_count()`) must divide both batch sizes. Data-set keys that only
    the data package interprets (class_map, variant, ...) are checked by `urnet_jax.data.prepare`.
    """
    if device_count is None:
        import jax  # deferred: a multi-host launch initialises JAX's distributed runtime first

        device_count = jax.device_count()
    model = config.model
    _check(config.precision in PRECISIONS,
           f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    _check(model.enhancer in ("none", *ENHANCERS),
           f"model.enhancer must be one of none, {', '.join(ENHANCERS)}, got {model.enhancer!r}")
    _check(model.classifier in CLASSIFIERS,
           f"model.classifier must be one of {', '.join(CLASSIFIERS)}, got {model.classifier!r}")
    for key in ("enhancer_width", "classifier_width"):
        value = model[key]
        _check(isinstance(value, int) and value >= 0, f"model.{key} must be an integer >= 0 (0: default), got {value!r}")
    if model.pretrained:
        _check(pathlib.Path(model.pretrained).is_file(), f"model.pretrained file {model.pretrained!r} not found")
        _check(model.classifier_width == 0,
               "model.pretrained needs the classifier's standard width (model.classifier_width=0)")
    if config.data.dir:
        _check(pathlib.Path(config.data.dir).is_dir(), f"data.dir {config.data.dir!r} is not a directory")
    else:
        _check(config.data.allow_synthetic,
               "data.dir is not set: pass --config.data.dir=FOLDER (one sub-folder of images per class), "
               "or try configs/demo.py (a tiny model on synthetic cells, minutes on a CPU)")
    _check(isinstance(config.data.image_size, int) and config.data.image_size >= MIN_IMAGE_SIZE,
           f"data.image_size must be an integer >= {MIN_IMAGE_SIZE}, got {config.data.image_size!r}")
    _check(_is_number(config.data.test_fraction) and 0 < config.data.test_fraction < 1,
           f"data.test_fraction must be in (0, 1), got {config.data.test_fraction!r}")
    for key in ("pretrain", "train"):
        epochs = config[key].epochs
        _check(isinstance(epochs, int) and epochs >= 0, f"{key}.epochs must be an integer >= 0, got {epochs!r}")
    pretrains = model.enhancer != "none" and config.pretrain.epochs > 0
    _check(pretrains or config.train.epochs > 0, "nothing to train: train.epochs is 0 and there is no phase 1")
    for key in ("batch_size", "eval_batch_size"):
        size = config[key]
        _check(isinstance(size, int) and size >= 1, f"{key} must be an integer >= 1, got {size!r}")
        _check(size % device_count == 0,
               f"{key} {size} is not divisible by the number of devices ({device_count})")
    optimizer = config.optimizer
    _check(optimizer.name in OPTIMIZERS,
           f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {optimizer.name!r}")
    _check(_is_number(optimizer.lr) and optimizer.lr > 0, f"optimizer.lr must be > 0, got {optimizer.lr!r}")
    _check(_is_number(optimizer.momentum) and 0 <= optimizer.momentum < 1,
           f"optimizer.momentum must be in [0, 1), got {optimizer.momentum!r}")
    _check(_is_number(optimizer.weight_decay) and optimizer.weight_decay >= 0,
           f"optimizer.weight_decay must be >= 0, got {optimizer.weight_decay!r}")
    _check(optimizer.schedule in SCHEDULES,
           f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {optimizer.schedule!r}")
    _check(isinstance(optimizer.warmup_steps, int) and optimizer.warmup_steps >= 0,
           f"optimizer.warmup_steps must be an integer >= 0, got {optimizer.warmup_steps!r}")
    _check(isinstance(config.checkpoint.every_steps, int) and config.checkpoint.every_steps >= 0,
           f"checkpoint.every_steps must be an integer >= 0, got {config.checkpoint.every_steps!r}")
    _check(isinstance(config.checkpoint.keep, int) and config.checkpoint.keep >= 1,
           f"checkpoint.keep must be an integer >= 1, got {config.checkpoint.keep!r}")
    _check(isinstance(config.log_every_steps, int) and config.log_every_steps >= 1,
           f"log_every_steps must be an integer >= 1, got {config.log_every_steps!r}")
    _check(isinstance(config.seed, int) and 0 <= config.seed < 2**32,
           f"seed must be an integer in [0, 2**32), got {config.seed!r}")
    return config
