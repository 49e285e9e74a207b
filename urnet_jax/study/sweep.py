"""The runs of a study config: every model variant x data variant x seed, each a complete, validated run config.

A study config (`get_config()` of configs/study_*.py, plain data) holds
  base:             a complete run config (`urnet_jax.config.base_config()` plus the protocol's overrides);
  models:           {variant name: partial config applied over base}, e.g. the paper's ablation Net1-Net4;
  data_variants:    the data.variant values to run;
  model_data_variants: optional: {model variant: the data variants it runs on} for a model that means
                    something on some of them only (e.g. a paired-target control: on `raw` the stained
                    target is the input); a model not named runs on every data variant;
  seeds:            the config.seed values (model initialisation, per-step keys and the training data
                    order). data.seed stays base's, so every run sees the same split and the same
                    augmented training images: the model variants are compared on identical data (paired);
  subset_per_class: images drawn per class from data.dir before anything else (0: every image); the
                    draw is seeded by data.seed, made once and shared by every run;
  baseline:         optional: the name of another study's results folder beside this one (e.g.
                    'study_cpu'); the report then compares each run with the baseline's run of the same name;
  data_seeds:       optional: one data.seed per entry of `seeds` (the seed groups): the runs of a seed take
                    that data seed (with data.partition, which half of the training split they see), and
                    keep a prepared data set per data seed; absent: base's data.seed for every run;
  pretrained_classifier: optional: a complete run config that trains a classifier alone (e.g.
                    configs/pretrain_standin.py, on the other data.partition than base's). The runner trains
                    it once per data seed, as OUT/standin_dataseed<k>/, before the study's runs, and every run
                    of that data seed starts from its classifier (model.pretrained = that folder);
  standins_dir:     optional, with pretrained_classifier: another study's results folder (e.g.
                    'results/study_wbcatt', relative to where the study runs) whose finished
                    standin_dataseed<k>/ runs of the same pretrained_classifier this study loads instead of
                    training its own (e.g. a tuning study that reuses the main study's stand-ins);
  report:           optional: 'test' (default: the test-split tables) or 'validation' (a tuning study: each
                    model variant is a candidate setting, reported on the validation split only; see `tuning`);
  target_range:     optional, with report 'validation': (low, high) of the tuning metric that the chosen
                    candidate must reach (e.g. the severe proxy's 65-75% balanced accuracy for Net1);
  tuning_metric:    optional, with report 'validation': 'val_balanced_accuracy' (default: percent, at the
                    selected epoch) or 'phase1_psnr' (dB of the kept phase-1 enhancer on the validation split,
                    for candidates that train phase 1 only: train.epochs 0, allowed in tuning studies alone);
  target_rule:      optional, with target_range: 'nearest_middle' (default: the candidate inside the range
                    nearest its middle) or 'highest' (the highest inside it, e.g. phase 1's PSNR above 30 dB);
  comparisons:      optional: the (first, second) model pairs the report compares image by image (first
                    minus second); absent: every pair;
  decision_rule:    optional: the rule the report applies to each data variant's paired comparisons,
                    written before the runs (effect, controls, metric, epoch, margin, min_seeds,
                    claim_variants; see `rules` and `decision`); its pairs must be among `comparisons`;
  recommendation_rule: optional, with external: the rule the report applies to choose the model variant to
                    recommend for another lab's images (external, adapted, baseline, own_margin, target_gap,
                    min_seeds; see `rules` and `recommendation`);
  external:         optional: {name: {data_dir, class_map, adapt_bn, models}}: class-per-folder image sets
                    (e.g. another lab's cells) every finished run is also evaluated on, into OUT/<run>/eval/<name>/
                    (`evaluation.runner.evaluate_external`); adapt_bn re-estimates the BatchNorm statistics on
                    them first; models (empty: all) names the model variants it applies to.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from urnet_jax import config as config_lib
from urnet_jax.data.plan import VARIANTS
from urnet_jax.errors import ConfigError
from urnet_jax.study import rules

ABLATION_MODELS = ("net1", "net2", "net3", "net4")  # the paper's ablation, in its order
NAME_PART = re.compile(r"^[A-Za-z0-9_]+$")
RUN_NAME = re.compile(r"^(?P<model>[A-Za-z0-9_]+)-(?P<data>[A-Za-z0-9_]+)-seed(?P<seed>\d+)$")
STUDY_KEYS = ("base", "models", "data_variants", "seeds", "subset_per_class")  # required (the others are optional)
# Keys in which two runs of one protocol may differ: locations (the subset's links and the prepared data may
# live elsewhere after a move), bookkeeping that does not change what is computed, and XLA's CPU option set
# and the convolutions' backend, which change float rounding only (as the kind of CPU does; runs before them
# were not recorded). Any other difference (train.epochs included) means another protocol: a finished run of
# it is not skipped, and the report names it when comparing with a baseline study.
IGNORED_KEYS = frozenset({"data.dir", "data.prepared_dir", "checkpoint.every_steps", "checkpoint.keep",
                          "log_every_steps", "xla_cpu_options", "conv_backend"})


STANDIN_NAME = "standin_dataseed{data_seed}"
TUNING_METRICS = ("val_balanced_accuracy", "phase1_psnr")  # what a tuning study's candidates are chosen by
TARGET_RULES = ("nearest_middle", "highest")


def unused_keys(config: Mapping[str, Any]) -> frozenset[str]:
    """The dotted keys of a nested run config that do not change what the run computes: the phase-1 settings
    (pretrain.*, pretrain.epochs aside) of a run without phase 1 (no enhancer, or pretrain.epochs 0), and
    the severe proxy's strength (data.severe_*) of a run on another data variant."""
    keys = config_lib.flatten(config)
    unused = set()
    if config["model"]["enhancer"] == "none" or config["pretrain"]["epochs"] == 0:
        unused |= {key for key in keys if key.startswith("pretrain.") and key != "pretrain.epochs"}
    if config["data"]["variant"] != "severe_proxy":
        unused |= {key for key in keys if key.startswith("data.severe_")}
    return frozenset(unused)


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
    data_seeds = tuple(study.get("data_seeds", ()))
    _check(not data_seeds or (len(data_seeds) == len(seeds) and all(map(_is_count, data_seeds))),
           f"study 'data_seeds' must give one integer >= 0 per seed, got {data_seeds!r}")
    restricted = study.get("model_data_variants", {})
    for model, model_variants in restricted.items():
        _check(model in study.models and len(model_variants) > 0 and set(model_variants) <= set(variants),
               f"study 'model_data_variants' must map model variants of 'models' to some of 'data_variants', got "
               f"{model!r}: {tuple(model_variants)!r}")
    for pair in study.get("comparisons", ()):
        _check(len(pair) == 2 and all(name in study.models for name in pair) and pair[0] != pair[1],
               f"study 'comparisons' must pair two distinct model variants of 'models', got {tuple(pair)!r}")
    rule = rules.decision_rule(study.get("decision_rule"), models=list(study.models))
    if rule is not None:
        comparisons = {tuple(pair) for pair in study.get("comparisons", ())}
        _check(set(rule.comparisons) <= comparisons,
               "study 'decision_rule' reads comparisons missing from 'comparisons': "
               + ", ".join(f"{a} - {b}" for a, b in rule.comparisons if (a, b) not in comparisons))
        _check(set(rule.claim_variants) <= set(variants),
               f"study 'decision_rule' claim_variants must be data variants of the study, got {rule.claim_variants!r}")
    rules.recommendation_rule(study.get("recommendation_rule"), models=list(study.models),
                              external_sets=list(study.get("external", {})))
    for name, external in study.get("external", {}).items():
        _check(bool(NAME_PART.match(name)), f"external set name {name!r} may hold only letters, digits and _")
        _check(set(external) <= {"data_dir", "class_map", "adapt_bn", "models"} and bool(external.get("data_dir")),
               f"external set {name}: expected data_dir and optionally class_map, adapt_bn, models")
        _check(all(model in study.models for model in external.get("models", ())),
               f"external set {name}: 'models' must name model variants of 'models'")
    standin = study.get("pretrained_classifier")
    if standin is not None:
        _check(isinstance(standin, ml_collections.ConfigDict),
               "study 'pretrained_classifier' must be a run config (e.g. configs/pretrain_standin.py)")
        _check(standin.model.enhancer == "none", "study 'pretrained_classifier' must train a classifier alone")
        partitions = (standin.data.partition, study.base.data.partition)
        _check("all" not in partitions and partitions[0] != partitions[1],
               f"the pretrained classifier and the study must train on the two halves of the training split "
               f"(data.partition 'a' and 'b'), got {partitions[0]!r} and {partitions[1]!r}")
    _check(study.get("report", "test") in ("test", "validation"),
           f"study 'report' must be 'test' or 'validation', got {study.get('report')!r}")
    target = tuple(study.get("target_range", ()))
    _check(not target or (study.get("report") == "validation" and len(target) == 2 and target[0] < target[1]),
           f"study 'target_range' must be (low, high) with low < high, for a 'validation' report; got {target!r}")
    tuning = study.get("report") == "validation"
    _check(study.get("tuning_metric", TUNING_METRICS[0]) in TUNING_METRICS and (tuning or "tuning_metric" not in study),
           f"study 'tuning_metric' must be one of {', '.join(TUNING_METRICS)}, for a 'validation' report; got "
           f"{study.get('tuning_metric')!r}")
    _check(study.get("target_rule", TARGET_RULES[0]) in TARGET_RULES and (bool(target) or "target_rule" not in study),
           f"study 'target_rule' must be one of {', '.join(TARGET_RULES)}, with a 'target_range'; got "
           f"{study.get('target_rule')!r}")
    _check(not study.get("standins_dir") or standin is not None,
           "study 'standins_dir' names where the pretrained classifier's runs are: it needs 'pretrained_classifier'")


def external_sets(study: ml_collections.ConfigDict, model: str) -> dict[str, dict[str, Any]]:
    """{name: {data_dir, class_map, adapt_bn}} of the study's external sets that apply to model variant `model`."""
    return {name: {"data_dir": external.data_dir, "class_map": plain(external.get("class_map")),
                   "adapt_bn": bool(external.get("adapt_bn", False))}
            for name, external in study.get("external", {}).items()
            if not external.get("models") or model in external.models}


def runs_on(study: Mapping[str, Any], model: str, data_variant: str) -> bool:
    """Whether the study runs model variant `model` on `data_variant` ('model_data_variants'; default: yes)."""
    restricted = study.get("model_data_variants") or {}
    return model not in restricted or data_variant in tuple(restricted[model])


def data_seed_of(study: ml_collections.ConfigDict, seed: int) -> int:
    """The data.seed of the runs of `seed` (its entry of 'data_seeds', else base's data.seed)."""
    data_seeds = tuple(study.get("data_seeds", ()))
    return data_seeds[tuple(study.seeds).index(seed)] if data_seeds else study.base.data.seed


def prepared_name(study: ml_collections.ConfigDict, data_variant: str, data_seed: int, model: str) -> str:
    """The prepared data set a run reads, below the prepared root: '<variant>', plus '-dataseed<k>' when the
    study has data seed groups, plus '-<model>' when the model variant changes data.* (e.g. CLAHE)."""
    name = data_variant
    if study.get("data_seeds"):
        name += f"-dataseed{data_seed}"
    if "data" in study.models[model]:
        name += f"-{model}"
    return name


def plan_standins(study: ml_collections.ConfigDict, prepared_root: str | os.PathLike,
                  data_seeds: Sequence[int] | None = None) -> list[StudyRun]:
    """The pretrained classifier's runs ('standin_dataseed<k>', one per data seed of the study, or of
    `data_seeds`), configs validated; [] when the study has no 'pretrained_classifier'."""
    check_study_config(study)
    if study.get("pretrained_classifier") is None:
        return []
    if data_seeds is None:
        data_seeds = [data_seed_of(study, seed) for seed in study.seeds]
    runs = []
    for data_seed in dict.fromkeys(data_seeds):
        name = STANDIN_NAME.format(data_seed=data_seed)
        config = copy.deepcopy(study.pretrained_classifier)
        config.seed = data_seed
        config.data.seed = data_seed
        config.data.prepared_dir = str(pathlib.Path(prepared_root).resolve() / name)
        try:
            config_lib.validate(config)
        except ConfigError as error:
            raise ConfigError(f"run {name}: {error}") from None
        runs.append(StudyRun(name=name, model="standin", data_variant=config.data.variant, seed=data_seed,
                             config=config))
    return runs


def plan_runs(study: ml_collections.ConfigDict, prepared_root: str | os.PathLike,
              data_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike = ".") -> list[StudyRun]:
    """Every run of the study, seed by seed, then data variant, then model variant; configs validated.

    Each run's config: base + the model variant's overrides, data.variant, seed, data.seed (its seed
    group's), data.prepared_dir = prepared_root/`prepared_name` (absolute), data.dir = `data_dir` when
    given (the subset's folder), and model.pretrained = out_dir/standin_dataseed<k> when the study has a
    pretrained classifier (validated as if that run existed: its architecture must be the run's). Going
    seed by seed means a partly finished study already fills every table cell.
    """
    check_study_config(study)
    standin = study.get("pretrained_classifier")
    runs = []
    for seed in study.seeds:
        data_seed = data_seed_of(study, seed)
        for variant in study.data_variants:
            for model, overrides in study.models.items():
                if not runs_on(study, model, variant):
                    continue
                name = run_name(model, variant, seed)
                config = with_overrides(study.base, overrides, f"model variant {model}")
                config.seed = seed
                config.data.seed = data_seed
                config.data.variant = variant
                config.data.prepared_dir = str(pathlib.Path(prepared_root).resolve()
                                               / prepared_name(study, variant, data_seed, model))
                if data_dir is not None:
                    config.data.dir = str(data_dir)
                try:
                    config_lib.validate(config)  # model.pretrained is set below: the run it names comes first
                    _check(config.train.epochs > 0 or study.get("report") == "validation",
                           "train.epochs is 0 (phase 1 only): such a run has no test numbers, so only a tuning "
                           "study (report 'validation') may hold it")
                    if standin is not None:
                        _check_standin_architecture(standin, config)
                except ConfigError as error:
                    raise ConfigError(f"run {name}: {error}") from None
                if standin is not None:
                    config.model.pretrained = str(pathlib.Path(out_dir).resolve()
                                                  / STANDIN_NAME.format(data_seed=data_seed))
                runs.append(StudyRun(name=name, model=model, data_variant=variant, seed=seed, config=config))
    return runs


def _check_standin_architecture(standin: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """ConfigError unless the pretrained classifier's architecture is the run's (what model.pretrained needs)."""
    for key in ("classifier", "classifier_width", "norm", "num_groups"):
        _check(standin.model[key] == config.model[key],
               f"the pretrained classifier's model.{key} {standin.model[key]!r} != the run's {config.model[key]!r}")
