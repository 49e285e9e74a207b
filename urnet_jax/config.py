"""The one place that lists every configuration key, its default and what it means.

Config files in `configs/` start from `base_config()` and override what differs; every entry point
that trains validates the result with `validate` before doing any work.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import types
from collections.abc import Mapping
from typing import Any

import ml_collections

from urnet_jax.errors import ConfigError
from urnet_jax.models import CLASSIFIERS, ENHANCERS
from urnet_jax.models.registry import GROUP_NORM_CLASSIFIERS, RESIDUAL_OUTPUT_ENHANCERS

PRECISIONS = ("float32", "bfloat16")
# The names of urnet_jax.compiler_options.CPU_OPTION_SETS, its default first.
XLA_CPU_OPTIONS = ("ynnpack_reductions", "no_ynnpack", "xla_defaults")
CONV_BACKENDS = ("xla", "onednn")  # urnet_jax.models.layers.use_conv_backend's names, the default first
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
SELECTION_SPLITS = ("val", "test")  # train.select_on: the split whose metrics choose `best` / `pretrain_best`
ENHANCER_OUTPUTS = ("sigmoid", "residual")  # model.enhancer_output (see docs/TRAINING.md)
NORMS = ("batch", "group")  # model.norm of the classifier
PRETRAIN_LOSSES = ("mse", "rsgunet")  # pretrain.loss
MIN_IMAGE_SIZE = 32


def base_config() -> ml_collections.ConfigDict:
    """The paper's UR-Net (Net4) protocol: ResNet101 + UR-Net enhancer, 200 px, SGD lr 1e-4, batch 32."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.precision = "float32"  # or "bfloat16": bf16 compute, float32 master weights.
    # XLA's option set for CPU programs (urnet_jax.compiler_options.CPU_OPTION_SETS): the same results up to
    # float rounding; "no_ynnpack" keeps the numerics of runs made before "ynnpack_reductions" existed.
    config.xla_cpu_options = XLA_CPU_OPTIONS[0]
    # The models' convolutions (urnet_jax.models.layers.use_conv_backend): "xla", or "onednn", the CPU's fast
    # path: oneDNN's kernels for the float32 convs and transposed convs, max-pool's gradient phase by phase (the
    # `onednn` extra and a C++ compiler; one device): the same results up to float rounding, a train step taking
    # 16-26% less time on the CPUs measured; evaluate.py and predict.py load the block cache for its runs, as
    # train.py does for every run on the CPU (docs/TRAINING.md, docs/BENCHMARKS.md).
    config.conv_backend = CONV_BACKENDS[0]
    config.batch_size = 32  # global batch, split over every device.
    config.eval_batch_size = 64

    config.model = ml_collections.ConfigDict()
    config.model.enhancer = "urnet"  # none or an enhancer of urnet_jax.models.registry (rsgunet, conv_frontend, ...)
    config.model.classifier = "resnet101"  # any classifier name of urnet_jax.models.create
    config.model.enhancer_width = 64  # channels of the first level (UNet's 64-128-256-512-1024); 0: the model's default
    config.model.classifier_width = 0  # 0: torchvision's width; smaller values give tiny test models.
    # "" = random init; a torchvision .pth (or a converted checkpoint); or a training run's workdir, whose
    # `best` classifier is loaded. Either way the classification head is replaced.
    config.model.pretrained = ""
    # The U-shaped enhancers' output: "sigmoid" (sigmoid of the 1x1 head) or "residual" (clip(x + head, 0, 1)
    # with a zero-initialised head: the enhancer starts as the identity).
    config.model.enhancer_output = "sigmoid"
    config.model.norm = "batch"  # the classifier's normalisation: "batch" | "group" (ResNets only)
    config.model.num_groups = 32  # GroupNorm's groups (at most; fewer when a layer's channels need it)

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # class-per-folder image root; "" = the built-in synthetic cells (see allow_synthetic)
    config.data.allow_synthetic = False  # an empty data.dir is an error unless True (configs/demo.py, tests)
    # "wbc3" | "folders" | {"class": ["folder", ...]}; typed `object` so that a config file may assign a dict.
    config.data.class_map = ml_collections.FieldReference("wbc3", field_type=object)
    config.data.image_size = 200  # pixels (square)
    config.data.test_fraction = 0.2
    config.data.seed = 0  # split and augmentation seed
    config.data.train_size = 10000  # training images after offline augmentation
    config.data.val_fraction = 0.1  # of each class, to the validation split (0: no validation split)
    config.data.split_dir = ""  # "" or a folder of *train.csv, *val.csv, *test.csv (WBCAtt format): the split
    config.data.partition = "all"  # all | a | b: a seeded, stratified half of the training split
    config.data.variant = "raw"  # raw | stainfree_proxy | severe_proxy
    config.data.severe_contrast = (0.05, 0.12)  # severe_proxy: range of the contrast factor (lower: harder)
    config.data.severe_blur_sigma = (2.5, 4.0)  # severe_proxy: range of the defocus sigma, pixels at 200 px
    config.data.severe_noise_std = (0.03, 0.06)  # severe_proxy: range of the noise std, [0, 1] units
    config.data.target = "image"  # phase-1 target: image | stained | unsharp_mask | guided_filter | bilateral
    config.data.crop = "none"  # none | cell: a square centred on the cell (urnet_jax.data.cell_crop)
    config.data.crop_scale = 2.5  # crop side / nucleus diameter, with crop="cell"
    config.data.preprocessing = "none"  # none | clahe
    config.data.clahe_clip_limit = 0.01  # CLAHE clip limit in (0, 1] (higher: more contrast)
    config.data.clahe_kernel_size = 0  # CLAHE tile side in pixels; 0 = 1/8 of the image side
    config.data.color_norm = "none"  # none | reinhard | standardise: per-image colour normalisation
    config.data.grayscale = False  # luma in all three channels
    config.data.online_augment = False  # training only: random flips and 90-degree rotations each epoch
    config.data.random_scale = ()  # training only: () or (low, high), a random zoom about the centre
    config.data.stain_augment = 0.0  # training only: HED stain jitter scale (0.05: "HED-light"); 0 = off
    config.data.color_jitter = False  # training only: random brightness, contrast, hue and gamma
    config.data.synthetic_per_class = 200  # images per class of the synthetic data set
    config.data.prepared_dir = ""  # where `prepare` writes the data set; "" = <workdir>/data

    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.epochs = 100  # phase 1: enhancer identity reconstruction (0 skips the phase)
    config.pretrain.optimizer = _optimizer_section()  # phase 1's own optimiser (the paper's SGD, lr 1e-4)
    config.pretrain.min_psnr = 30.0  # dB: a selected phase-1 enhancer below it is reported (log, metrics.jsonl)
    config.pretrain.loss = "mse"  # mse | rsgunet: L1 + SSIM + TV [+ VGG16 perceptual] (urnet_jax.models.rsgunet_losses)
    # The rsgunet loss's weights: `rsgunet_losses.LossWeights`, the authors' ratios with L1 at 1.
    config.pretrain.rsgunet_weights = ml_collections.ConfigDict(
        {"l1": 1.0, "ssim": 500 / 750, "total_variation": 100 / 750, "perceptual": 0.001 / 750 * 57.6**2})
    config.pretrain.perceptual_vgg = ""  # VGG16 ImageNet weights (.pth or converted) for the perceptual term; "" = none

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 200  # phase 2: joint enhancer + classifier training
    config.train.select_on = "val"  # the split that chooses `best` / `pretrain_best`; "test": the paper's protocol
    # False: the test split is evaluated only after kept (best) epochs and each phase's last epoch, not after
    # every epoch (saves the test split's forward passes; needs select_on='val')
    config.train.test_every_epoch = True
    config.train.freeze_enhancer = False  # phase 2 trains the classifier alone on the phase-1 enhancer's outputs

    config.optimizer = _optimizer_section()  # phase 2's optimiser

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500  # periodic saves within an epoch (0: only at epoch ends)
    config.checkpoint.keep = 2  # periodic checkpoints kept (the best one is kept apart)

    config.log_every_steps = 50
    return config


def _optimizer_section() -> ml_collections.ConfigDict:
    """The keys of an optimiser section (`optimizer`, `pretrain.optimizer`) at the paper's values."""
    optimizer = ml_collections.ConfigDict()
    optimizer.name = "sgd"  # sgd | adamw
    optimizer.lr = 1e-4
    optimizer.momentum = 0.9
    optimizer.weight_decay = 0.0
    optimizer.schedule = "constant"  # constant | cosine: lr decays to 0 over the phase (half cosine)
    optimizer.warmup_steps = 0  # linear rise of the lr from 0 at the start of the phase
    optimizer.clip_norm = 0.0  # clip the gradients' global L2 norm to this before the update (0: off)
    optimizer.enhancer_lr_scale = 1.0  # the enhancer's lr = lr * this (phase 2; must stay 1 in phase 1)
    return optimizer


@functools.cache
def _sections() -> frozenset[str]:
    """The section paths of `base_config` (model, data, pretrain.optimizer, ...), found once."""

    def paths(section: ml_collections.ConfigDict, prefix: str) -> list[str]:
        return [path for key, value in section.items() if isinstance(value, ml_collections.ConfigDict)
                for path in (f"{prefix}{key}", *paths(value, f"{prefix}{key}."))]

    return frozenset(paths(base_config(), ""))


@functools.cache
def _flat_defaults() -> Mapping[str, Any]:
    """`flatten(base_config())`, built once (read-only)."""
    return types.MappingProxyType(flatten(base_config().to_dict()))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'section.key': value} of a config (a ConfigDict's `to_dict()` or a config.json), nested sections
    included ('pretrain.optimizer.lr'); the sections are those of `base_config`, so a dict-valued key
    (data.class_map) stays one value."""
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in _sections() and isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _as_run_then(saved: Mapping[str, Any]) -> dict[str, Any]:
    """`flatten(saved)` with the keys added since it was written set to what its run did: phase 1 used the
    `optimizer` section before `pretrain.optimizer` existed, `best` was chosen on the test split before
    `train.select_on` existed, and CPU programs were compiled without YNNPACK fusions before
    `xla_cpu_options` existed (the earliest runs with XLA's defaults, which no record tells apart). Every
    other missing key is its default."""
    flat = flatten(saved)
    if "train.select_on" not in flat:
        flat["train.select_on"] = "test"
    flat.setdefault("xla_cpu_options", "no_ynnpack")
    if not any(key.startswith("pretrain.optimizer.") for key in flat):
        flat.update({f"pretrain.{key}": value for key, value in flat.items() if key.startswith("optimizer.")})
    return flat


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       ignored: frozenset[str] = frozenset()) -> list[str]:
    """'key: saved != current' for every key outside `ignored` in which two nested configs differ.

    A key that `saved` (a run's config.json or checkpoint metadata) lacks was added to `base_config`
    after it was written; it is compared as what that run did (`_as_run_then`): mostly the default.
    """
    # Compared as JSON stores them (config.json, checkpoint metadata): a tuple reads back as a list.
    old, new = (json.loads(json.dumps(flat)) for flat in ({**_flat_defaults(), **_as_run_then(saved)},
                                                         flatten(current)))
    return [f"{key}: {old.get(key)!r} != {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if key not in ignored and old.get(key) != new.get(key)]


def saved_config(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A run's saved config (config.json) with the keys added to `base_config` since then at what that run
    did (`_as_run_then`: mostly their defaults).

    Raises ValueError (one line) for a key this version does not have or a value of the wrong type.
    """
    config = base_config()
    config.lock()  # no new keys
    for key, value in _as_run_then(saved).items():
        section, _, name = key.rpartition(".")
        try:
            (config[section] if section else config)[name] = value
        except (AttributeError, KeyError, TypeError, ValueError) as error:  # an unknown key or a wrong type
            raise ValueError(f"saved config key {key}={value!r} does not fit this version's config: "
                             f"{' '.join(str(error).split())}") from None
    config.unlock()
    return config


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with file paths made absolute (data.dir, data.prepared_dir, model.pretrained, pretrain.perceptual_vgg)."""
    resolved = ml_collections.ConfigDict(config.to_dict())
    for section, key in (("data", "dir"), ("data", "prepared_dir"), ("model", "pretrained"),
                         ("pretrain", "perceptual_vgg")):
        if resolved[section][key]:
            resolved[section][key] = str(pathlib.Path(resolved[section][key]).expanduser().resolve())
    return resolved


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_optimizer(optimizer: ml_collections.ConfigDict, name: str) -> None:
    """Checks an optimiser section (`_optimizer_section`'s keys) called `name` in the messages."""
    _check(optimizer.name in OPTIMIZERS, f"{name}.name must be one of {', '.join(OPTIMIZERS)}, got {optimizer.name!r}")
    _check(_is_number(optimizer.lr) and optimizer.lr > 0, f"{name}.lr must be > 0, got {optimizer.lr!r}")
    _check(_is_number(optimizer.momentum) and 0 <= optimizer.momentum < 1,
           f"{name}.momentum must be in [0, 1), got {optimizer.momentum!r}")
    _check(_is_number(optimizer.weight_decay) and optimizer.weight_decay >= 0,
           f"{name}.weight_decay must be >= 0, got {optimizer.weight_decay!r}")
    _check(optimizer.schedule in SCHEDULES,
           f"{name}.schedule must be one of {', '.join(SCHEDULES)}, got {optimizer.schedule!r}")
    _check(isinstance(optimizer.warmup_steps, int) and optimizer.warmup_steps >= 0,
           f"{name}.warmup_steps must be an integer >= 0, got {optimizer.warmup_steps!r}")
    _check(_is_number(optimizer.clip_norm) and optimizer.clip_norm >= 0,
           f"{name}.clip_norm must be >= 0 (0: off), got {optimizer.clip_norm!r}")
    _check(_is_number(optimizer.enhancer_lr_scale) and optimizer.enhancer_lr_scale >= 0,
           f"{name}.enhancer_lr_scale must be >= 0, got {optimizer.enhancer_lr_scale!r}")


def is_run_directory(path: str | pathlib.Path) -> bool:
    """Whether `path` is a training run's workdir (a config.json and a checkpoints folder)."""
    path = pathlib.Path(path)
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def _check_pretrained(model: ml_collections.ConfigDict) -> None:
    """model.pretrained: a torchvision weight file for the standard-width, BatchNorm classifier, or a
    training run whose classifier has this config's architecture (name, width, norm)."""
    path = pathlib.Path(model.pretrained)
    if path.is_dir():
        _check(is_run_directory(path), f"model.pretrained {model.pretrained!r} is a directory but no training run "
                                       "(it needs config.json and checkpoints/)")
        try:
            run = _as_run_then(json.loads((path / "config.json").read_text()))
        except (json.JSONDecodeError, AttributeError) as error:
            raise ConfigError(f"model.pretrained {path / 'config.json'} does not parse: {error}") from None
        architecture = ("classifier", "classifier_width", "norm", "num_groups")
        differences = [f"{key} {run.get(f'model.{key}', _flat_defaults()[f'model.{key}'])!r} != {model[key]!r}"
                       for key in architecture
                       if run.get(f"model.{key}", _flat_defaults()[f"model.{key}"]) != model[key]]
        _check(not differences, f"model.pretrained run {model.pretrained} has another classifier architecture "
                                f"than model.* ({'; '.join(differences)})")
        return
    _check(path.is_file(), f"model.pretrained file {model.pretrained!r} not found")
    _check(model.classifier_width == 0,
           "model.pretrained needs the classifier's standard width (model.classifier_width=0)")
    _check(model.norm == "batch", "torchvision weights (model.pretrained) need model.norm='batch'")


def _check_phase1_loss_and_freezing(config: ml_collections.ConfigDict, pretrains: bool) -> None:
    """pretrain.loss and its keys; train.freeze_enhancer needs an enhancer trained in phase 1."""
    pretrain = config.pretrain
    _check(pretrain.loss in PRETRAIN_LOSSES,
           f"pretrain.loss must be one of {', '.join(PRETRAIN_LOSSES)}, got {pretrain.loss!r}")
    for key, weight in pretrain.rsgunet_weights.items():
        _check(_is_number(weight) and weight >= 0, f"pretrain.rsgunet_weights.{key} must be >= 0, got {weight!r}")
    if pretrain.perceptual_vgg:
        _check(pretrain.loss == "rsgunet", "pretrain.perceptual_vgg is used only by pretrain.loss='rsgunet'")
        _check(pathlib.Path(pretrain.perceptual_vgg).exists(),
               f"pretrain.perceptual_vgg {pretrain.perceptual_vgg!r} not found")
    _check(isinstance(config.train.freeze_enhancer, bool),
           f"train.freeze_enhancer must be True or False, got {config.train.freeze_enhancer!r}")
    if config.train.freeze_enhancer:
        _check(pretrains, "train.freeze_enhancer needs an enhancer trained in phase 1 "
                          "(model.enhancer != 'none' and pretrain.epochs > 0)")


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
    _check(config.xla_cpu_options in XLA_CPU_OPTIONS,
           f"xla_cpu_options must be one of {', '.join(XLA_CPU_OPTIONS)}, got {config.xla_cpu_options!r}")
    _check(config.conv_backend in CONV_BACKENDS,
           f"conv_backend must be one of {', '.join(CONV_BACKENDS)}, got {config.conv_backend!r}")
    _check(config.conv_backend != "onednn" or device_count == 1,
           f"conv_backend='onednn' runs on one device (XLA would gather the batch around every oneDNN call), "
           f"got {device_count}")
    _check(model.enhancer in ("none", *ENHANCERS),
           f"model.enhancer must be one of none, {', '.join(ENHANCERS)}, got {model.enhancer!r}")
    _check(model.classifier in CLASSIFIERS,
           f"model.classifier must be one of {', '.join(CLASSIFIERS)}, got {model.classifier!r}")
    for key in ("enhancer_width", "classifier_width"):
        value = model[key]
        _check(isinstance(value, int) and value >= 0, f"model.{key} must be an integer >= 0 (0: default), got {value!r}")
    _check(model.norm in NORMS, f"model.norm must be one of {', '.join(NORMS)}, got {model.norm!r}")
    _check(model.norm == "batch" or model.classifier in GROUP_NORM_CLASSIFIERS,
           f"model.norm='group' needs one of {', '.join(GROUP_NORM_CLASSIFIERS)}, got {model.classifier!r}")
    _check(isinstance(model.num_groups, int) and model.num_groups >= 1,
           f"model.num_groups must be an integer >= 1, got {model.num_groups!r}")
    _check(model.enhancer_output in ENHANCER_OUTPUTS,
           f"model.enhancer_output must be one of {', '.join(ENHANCER_OUTPUTS)}, got {model.enhancer_output!r}")
    _check(model.enhancer_output == "sigmoid" or model.enhancer in ("none", *RESIDUAL_OUTPUT_ENHANCERS),
           f"model.enhancer_output={model.enhancer_output!r} needs one of "
           f"{', '.join(RESIDUAL_OUTPUT_ENHANCERS)}, got {model.enhancer!r}")
    if model.pretrained:
        _check_pretrained(model)
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
    _check_phase1_loss_and_freezing(config, pretrains)
    for key in ("batch_size", "eval_batch_size"):
        size = config[key]
        _check(isinstance(size, int) and size >= 1, f"{key} must be an integer >= 1, got {size!r}")
        _check(size % device_count == 0,
               f"{key} {size} is not divisible by the number of devices ({device_count})")
    _check_optimizer(config.optimizer, "optimizer")
    _check_optimizer(config.pretrain.optimizer, "pretrain.optimizer")
    _check(config.pretrain.optimizer.enhancer_lr_scale == 1,
           "pretrain.optimizer.enhancer_lr_scale must be 1 (phase 1 trains the enhancer alone: set "
           "pretrain.optimizer.lr)")
    _check(_is_number(config.pretrain.min_psnr), f"pretrain.min_psnr must be a number (dB), got {config.pretrain.min_psnr!r}")
    _check(config.train.select_on in SELECTION_SPLITS,
           f"train.select_on must be one of {', '.join(SELECTION_SPLITS)}, got {config.train.select_on!r}")
    _check(config.train.select_on == "test" or config.data.val_fraction > 0 or config.data.split_dir,
           "train.select_on='val' needs a validation split: data.val_fraction > 0 or data.split_dir "
           "(or train.select_on='test', the paper's protocol)")
    _check(config.train.test_every_epoch or config.train.select_on == "val",
           "train.test_every_epoch=False needs train.select_on='val' (selecting on test reads it every epoch)")
    _check(isinstance(config.checkpoint.every_steps, int) and config.checkpoint.every_steps >= 0,
           f"checkpoint.every_steps must be an integer >= 0, got {config.checkpoint.every_steps!r}")
    _check(isinstance(config.checkpoint.keep, int) and config.checkpoint.keep >= 1,
           f"checkpoint.keep must be an integer >= 1, got {config.checkpoint.keep!r}")
    _check(isinstance(config.log_every_steps, int) and config.log_every_steps >= 1,
           f"log_every_steps must be an integer >= 1, got {config.log_every_steps!r}")
    _check(isinstance(config.seed, int) and 0 <= config.seed < 2**32,
           f"seed must be an integer in [0, 2**32), got {config.seed!r}")
    return config
