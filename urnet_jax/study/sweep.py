"""The runs of a study config: every model variant x data variant x seed, each a complete, validated run config.

A study config (`get_config()` of configs/study_*.py, plain data) holds
  base:             a complete run config (`urnet_jax.config.base_config()` plus the protocol's overrides);
  models:           {variant name: partial config applied over base}, e.g. the paper's ablation Net1-Net4;
  data_variants:    the data.variant values to run;
  seeds:            the config.seed values (model initialisation, per-step keys and the training data
                    order). data.seed stays base's, so every run sees the same split and the same
                    augmented training images: the model variants are compared on identical data (paired);
  subset_per_class: images drawn per class from data.dir before anything else (0: every image); the
                    draw is seeded by data.seed, made once and shared by every run;
  baseline:         optional: the name of another study's results folder beside this one (e.g.
                    'study_cpu'); the report then compares each run with the baseline's run of the same name.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from urnet_jax import config as config_lib
from urnet_jax.data.plan import VARIANTS
from urnet_jax.errors import ConfigError

ABLATION_MODELS = ("net1", "net2", "net3", "net4")  # the paper's ablation, in its order
NAME_PART = re.compile(r"^[A-Za-z0-9_]+$")
RUN_NAME = re.compile(r"^(?P<model>[A-Za-z0-9_]+)-(?P<data>[A-Za-z0-9_]+)-seed(?P<seed>\d+)$")
STUDY_KEYS = ("base", "models", "data_variants", "seeds", "subset_per_class")
# Keys in which two runs of one protocol may differ: locations (the subset's links and the prepared data may
# live elsewhere after a move) and bookkeeping that does not change what is computed. Any other difference
# (train.epochs included) means another protocol: a finished run of it is not skipped, and the report names
# it when comparing with a baseline study.
IGNORED_KEYS = frozenset({"data.dir", "data.prepared_dir", "checkpoint.every_steps", "checkpoint.keep",
                          "log_every_steps"})


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One run of a study: its name, the cell it belongs to, and its complete config."""

    name: str
    model: str
    data_variant: str
    seed: int
    config: ml_collections.ConfigDict


def run_name(model: str, data_variant: str, seed: int) -> str:
    """e.g. 'net4-stainfree_proxy-seed1' (matches RUN_NAME)."""
    return f"{model}-{data_variant}-seed{seed}"


def plain(value: Any) -> Any:
    """A ConfigDict as a plain nested dict; any other value as it is."""
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                   what: str = "override") -> ml_collections.ConfigDict:
    """A copy of `config` with the nested partial config `overrides` set; a one-line ConfigError (naming
    `what` and the dotted key) for an unknown key, a value for a section, or a value of the wrong type."""
    result = copy.deepcopy(config)

    def assign(node: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
        for key, value in values.items():
            if key not in node:
                raise ConfigError(f"{what}: unknown config key {prefix}{key} (see urnet_jax/config.py)")
            if isinstance(node[key], ml_collections.ConfigDict):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{what}: {prefix}{key} is a section, got {value!r}")
                assign(node[key], value, f"{prefix}{key}.")
                continue
            try:
                node[key] = value
            except TypeError as error:
                raise ConfigError(f"{what}: {prefix}{key}: {error}") from None

    assign(result, plain(overrides), "")
    return result


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_count(value: Any) -> bool:
    """An integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_study_config(study: ml_collections.ConfigDict) -> None:
    """ConfigError (one line) naming the first bad study-level key."""
    for key in STUDY_KEYS:
        _check(key in study, f"the study config has no '{key}' (see urnet_jax/study/sweep.py)")
    _check(isinstance(study.base, ml_collections.ConfigDict), "study 'base' must be a config (base_config())")
    _check(isinstance(study.models, ml_collections.ConfigDict) and len(study.models) > 0,
           "study 'models' must map at least one variant name to its overrides")
    for name in study.models:
        _check(bool(NAME_PART.match(name)), f"model variant name {name!r} may hold only letters, digits and _")
    variants = tuple(study.data_variants)
    _check(len(variants) > 0 and len(set(variants)) == len(variants),
           "study 'data_variants' must be distinct and non-empty")
    for variant in variants:
        _check(variant in VARIANTS, f"unknown data variant {variant!r} (expected one of {', '.join(VARIANTS)})")
    seeds = tuple(study.seeds)
    _check(len(seeds) > 0 and all(map(_is_count, seeds)), f"study 'seeds' must be non-negative integers, got {seeds!r}")
    _check(len(set(seeds)) == len(seeds), f"study 'seeds' must be distinct, got {seeds!r}")
    subset = study.subset_per_class
    _check(_is_count(subset), f"study 'subset_per_class' must be an integer >= 0, got {subset!r}")
    _check(subset == 0 or bool(study.base.data.dir), "study 'subset_per_class' needs base data.dir (an image folder)")
    baseline = study.get("baseline", "")
    _check(isinstance(baseline, str) and (baseline == "" or bool(NAME_PART.match(baseline))),
           f"study 'baseline' must be the name of a sibling results folder (letters, digits, _), got {baseline!r}")


def plan_runs(study: ml_collections.ConfigDict, prepared_root: str | os.PathLike,
              data_dir: str | os.PathLike | None = None) -> list[StudyRun]:
    """Every run of the study, seed by seed, then data variant, then model variant; configs validated.

    Each run's config: base + the model variant's overrides, data.variant, seed, data.prepared_dir =
    prepared_root/<variant> (absolute), and data.dir = `data_dir` when given (the subset's folder). Going
    seed by seed means a partly finished study already fills every table cell.
    """
    check_study_config(study)
    runs = []
    for seed in study.seeds:
        for variant in study.data_variants:
            for model, overrides in study.models.items():
                name = run_name(model, variant, seed)
                config = with_overrides(study.base, overrides, f"model variant {model}")
                config.seed = seed
                config.data.variant = variant
                config.data.prepared_dir = str(pathlib.Path(prepared_root).resolve() / variant)
                if data_dir is not None:
                    config.data.dir = str(data_dir)
                try:
                    config_lib.validate(config)
                except ConfigError as error:
                    raise ConfigError(f"run {name}: {error}") from None
                runs.append(StudyRun(name=name, model=model, data_variant=variant, seed=seed, config=config))
    return runs
