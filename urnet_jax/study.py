"""The reproduction study: the paper's ablation (Net1-Net4) x data variants x seeds, trained and evaluated one
run after another, and its results in the paper's Table 3 layout (mean +- std over seeds).

    python -m urnet_jax.study run --config configs/study_cpu.py --out results/study_cpu \\
        [--only 'net4-*'] [--limit N] [--delete-checkpoints] [--prepared DIR] [--no-progress] \\
        [--config.KEY=VALUE ...]   # e.g. --config.base.train.epochs=5 --config.seeds='(1,)'
    python -m urnet_jax.study report results/study_cpu [--out docs/RESULTS.md] [--check]

A study config (`get_config()` of configs/study_*.py) holds
  base:             a complete run config (`urnet_jax.config.base_config()` plus the protocol's overrides);
  models:           {variant name: partial config applied over base}; `ablation_models` derives net1..net4
                    from configs/net1.py..net4.py (what each of them changes in base_config());
  data_variants:    the data.variant values to run;
  seeds:            the config.seed values (model initialisation, per-step keys and the training data
                    order). data.seed stays base's, so every run sees the same split and the same
                    augmented training images: the model variants are compared on identical data (paired);
  subset_per_class: images drawn per class from data.dir before anything else (0: every image); the
                    draw is seeded by data.seed, made once and shared by every run.
  baseline:         optional: the name of another study's results folder beside this one (e.g.
                    'study_cpu'); the report then compares each run with the baseline's run of the same name.

Run `<model>-<data variant>-seed<seed>` (e.g. net4-stainfree_proxy-seed1) trains in OUT/<run>/
(`training.train`) and is then evaluated on the test split with its best checkpoint
(`evaluation.runner.evaluate_run`, which writes OUT/<run>/eval/). A run is finished when
OUT/<run>/eval/metrics.json exists and parses: finished runs are skipped, unfinished ones resume from their
checkpoints, so the study can be stopped and restarted at any point. Runs go seed by seed (every model and
data variant of seed 1, then seed 2, ...), so a partly finished study already fills every table cell.
The runs of one data variant share the prepared data set OUT/_prepared/<variant>/; the subset is a folder
of links, OUT/_prepared/subset/.

`report` reads each finished run's config.json, eval/metrics.json and metrics.jsonl (and the baseline's
name from OUT/study.json) and writes the tables of each data variant between the markers
`<!-- results:begin NAME -->` and `<!-- results:end NAME -->` (NAME: the results folder's name) of a
Markdown file, leaving the text around them alone; `--check` exits non-zero when the file's tables differ
from what the results give.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import fnmatch
import json
import os
import pathlib
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from urnet_jax import cli, config as config_lib
from urnet_jax.cli import ConfigError, RunError

ABLATION_MODELS = ("net1", "net2", "net3", "net4")
# Keys in which a finished run's config.json may differ from the study's config of that run: locations (the
# subset's links and the prepared data may live elsewhere after a move) and bookkeeping that does not change
# what is computed. Any other difference (train.epochs included) means the run belongs to another protocol.
IGNORED_KEYS = frozenset({"data.dir", "data.prepared_dir", "checkpoint.every_steps", "checkpoint.keep",
                          "log_every_steps"})
NAME_PART = re.compile(r"^[A-Za-z0-9_]+$")
RUN_NAME = re.compile(r"^(?P<model>[A-Za-z0-9_]+)-(?P<data>[A-Za-z0-9_]+)-seed(?P<seed>\d+)$")
MARKER_BEGIN = "<!-- results:begin {name} -->"
MARKER_END = "<!-- results:end {name} -->"
DATA_DESCRIPTIONS = {"raw": "the stained PBC images as they are",
                     "stainfree_proxy": "the same images through the stain-free proxy, a degradation, "
                                        "not stain-free data"}
# The paper's ablation questions as paired comparisons: (first model, second model, what first - second measures).
PAIRED_COMPARISONS = (("net2", "net1", "a plain ResUNet enhancer"),
                      ("net3", "net1", "the UR-Net enhancer, not pre-trained"),
                      ("net4", "net1", "the full UR-Net"),
                      ("net3", "net2", "the UR-Net modifications"),
                      ("net4", "net3", "phase-1 enhancer pre-training"))
# config.json keys summarised under each table (their values are shared by every run of a study).
PROTOCOL_KEYS = ("model.classifier", "model.classifier_width", "model.enhancer_width", "model.pretrained",
                 "data.image_size", "data.train_size", "data.test_fraction", "data.seed", "train.epochs",
                 "optimizer.name", "optimizer.lr", "optimizer.schedule", "optimizer.warmup_steps",
                 "optimizer.momentum", "optimizer.weight_decay", "batch_size", "precision")


# ----------------------------------------------------------------------------------------------------
# Study configs.


def config_overrides(config: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """The nested partial config of every leaf of `config` that differs from (or is absent in) `reference`."""
    overrides: dict[str, Any] = {}
    for key, value in config.items():
        known = key in reference
        if isinstance(value, Mapping) and known and isinstance(reference[key], Mapping):
            nested = config_overrides(value, reference[key])
            if nested:
                overrides[key] = nested
        elif not known or value != reference[key]:
            overrides[key] = value
    return overrides


def ablation_models(config_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{net1..net4: what configs/netK.py changes in base_config()} (net4, the paper's protocol, changes nothing).

    `config_dir` is the folder of net1.py..net4.py (the study config files pass their own folder).
    """
    from urnet_jax.config import base_config

    reference = base_config().to_dict()
    return {name: config_overrides(cli.load_config_file(str(pathlib.Path(config_dir) / f"{name}.py")).to_dict(),
                                   reference)
            for name in ABLATION_MODELS}


def study_config(base: ml_collections.ConfigDict, models: Mapping[str, Mapping[str, Any]],
                 data_variants: Sequence[str] = ("raw", "stainfree_proxy"), seeds: Sequence[int] = (1, 2, 3),
                 subset_per_class: int = 0, baseline: str = "") -> ml_collections.ConfigDict:
    """A study config (see the module docstring) from its parts."""
    study = ml_collections.ConfigDict()
    study.base = base
    study.models = {name: _plain(overrides) for name, overrides in models.items()}
    study.data_variants = tuple(data_variants)
    study.seeds = tuple(seeds)
    study.subset_per_class = subset_per_class
    study.baseline = baseline
    return study


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    what: str = "override") -> ml_collections.ConfigDict:
    """A copy of `config` with the nested partial config `overrides` set; ConfigError for an unknown key."""
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
                raise ConfigError(f"{what}: {prefix}{key}: {' '.join(str(error).split())}") from None

    assign(result, _plain(overrides), "")
    return result


def parse_command_line_overrides(arguments: Sequence[str]) -> dict[str, Any]:
    """`--config.KEY=VALUE` arguments -> a nested partial config for `apply_overrides`.

    KEY is dotted (`base.train.epochs`); VALUE is read as a Python literal (`1`, `0.5`, `True`, `(1, 2)`)
    and otherwise kept as a string (`resnet18`). ConfigError for any other argument.
    """
    overrides: dict[str, Any] = {}
    for argument in arguments:
        key, equals, text = argument.removeprefix("--config.").partition("=")
        if not argument.startswith("--config.") or not equals or not key:
            raise ConfigError(f"unrecognized argument {argument!r} (overrides are --config.KEY=VALUE)")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *sections, leaf = key.split(".")
        node = overrides
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--config.{key}: {section} is overridden as a value and as a section")
        node[leaf] = value
    return overrides


def _plain(value: Any) -> Any:
    """ConfigDicts (and FieldReferences) as plain dicts/values."""
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One run of a study: its name, the cell it belongs to, and its complete config."""

    name: str
    model: str
    data_variant: str
    seed: int
    config: ml_collections.ConfigDict


def run_name(model: str, data_variant: str, seed: int) -> str:
    """e.g. 'net4-stainfree_proxy-seed1'."""
    return f"{model}-{data_variant}-seed{seed}"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_study_config(study: ml_collections.ConfigDict) -> None:
    """ConfigError (one line) naming the first bad study-level key."""
    from urnet_jax.data.plan import VARIANTS

    for key in ("base", "models", "data_variants", "seeds", "subset_per_class"):
        _check(key in study, f"the study config has no '{key}' (see urnet_jax/study.py)")
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
    _check(len(seeds) > 0 and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
           f"study 'seeds' must be non-negative integers, got {seeds!r}")
    _check(len(set(seeds)) == len(seeds), f"study 'seeds' must be distinct, got {seeds!r}")
    subset = study.subset_per_class
    _check(isinstance(subset, int) and not isinstance(subset, bool) and subset >= 0,
           f"study 'subset_per_class' must be an integer >= 0, got {subset!r}")
    _check(subset == 0 or bool(study.base.data.dir), "study 'subset_per_class' needs base data.dir (an image folder)")
    baseline = study.get("baseline", "")
    _check(isinstance(baseline, str) and (baseline == "" or bool(NAME_PART.match(baseline))),
           f"study 'baseline' must be the name of a sibling results folder (letters, digits, _), got {baseline!r}")


def plan_runs(study: ml_collections.ConfigDict, prepared_root: str | os.PathLike,
              data_dir: str | None = None) -> list[StudyRun]:
    """Every run of the study, seed by seed, then data variant, then model variant; configs validated.

    Each run's config: base + the model variant's overrides, data.variant, seed, data.prepared_dir =
    prepared_root/<variant>, and data.dir = `data_dir` when given (the subset's folder).
    """
    check_study_config(study)
    runs = []
    for seed in study.seeds:
        for variant in study.data_variants:
            for model, overrides in study.models.items():
                name = run_name(model, variant, seed)
                config = apply_overrides(study.base, overrides, f"model variant {model}")
                config.seed = seed
                config.data.variant = variant
                config.data.prepared_dir = str(pathlib.Path(prepared_root).resolve() / variant)
                if data_dir is not None:
                    config.data.dir = str(data_dir)
                try:
                    cli.validate(config)
                except ConfigError as error:
                    raise ConfigError(f"run {name}: {error}") from None
                runs.append(StudyRun(name=name, model=model, data_variant=variant, seed=seed, config=config))
    return runs


def link_subset(source: str | os.PathLike, class_map: Any, per_class: int, seed: int,
                out_dir: str | os.PathLike) -> pathlib.Path:
    """Links `per_class` images of every class of `source` (all of a class that has fewer) into
    out_dir/<source folder>/<file>, keeping the class folders, and returns out_dir.

    The choice: a permutation seeded by (seed, class index) over each class's files in path order. A
    matching out_dir (same source, size, seed and files, recorded in out_dir/.subset.json) is reused;
    concurrent callers take turns (a lock file beside out_dir).
    """
    from urnet_jax.data.folders import resolve_class_folders, scan_class_files
    from urnet_jax.data.prepare import exclusive_lock

    source = pathlib.Path(source).expanduser().resolve()
    out_dir = pathlib.Path(out_dir)
    class_folders = resolve_class_folders(source, _plain(class_map))
    files = scan_class_files(source, class_folders)
    chosen: list[str] = []
    for index, class_name in enumerate(class_folders):
        members = [f for f in files if f.class_name == class_name]
        picked = np.random.default_rng([seed, index]).permutation(len(members))[:per_class]
        chosen.extend(str(members[i].path.relative_to(source)) for i in sorted(picked))
    record = {"source": str(source), "per_class": per_class, "seed": seed, "files": chosen}
    stamp = out_dir / ".subset.json"
    with exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        try:
            if json.loads(stamp.read_text()) == record:
                return out_dir
        except (OSError, ValueError):
            pass
        shutil.rmtree(out_dir, ignore_errors=True)
        for relative in chosen:
            link = out_dir / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source / relative)
        stamp.write_text(json.dumps(record) + "\n")
    return out_dir


# ----------------------------------------------------------------------------------------------------
# The runner.


def read_finished_metrics(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's eval/metrics.json when it exists and parses (the run is finished), else None."""
    try:
        metrics = json.loads((pathlib.Path(workdir) / "eval" / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and "accuracy" in metrics else None


def _finished_config_differences(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> list[str]:
    """How a finished run's config.json differs from the study's config of that run."""
    from urnet_jax.training import resolve_config

    try:
        saved = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        return ["no readable config.json"]
    return config_lib.config_differences(saved, resolve_config(config).to_dict(), ignored=IGNORED_KEYS)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def format_duration(seconds: float) -> str:
    """e.g. '1h02m03s', '4m05s', '12s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclasses.dataclass
class StudyOutcome:
    """What one invocation of the runner did, by run name."""

    trained: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)  # 'name: one-line reason'
    not_started: list[str] = dataclasses.field(default_factory=list)  # left for later by `limit`


def run_study(study: ml_collections.ConfigDict, out_dir: str | os.PathLike, only: Sequence[str] = (),
              limit: int | None = None, delete_checkpoints: bool = False,
              prepared_root: str | os.PathLike | None = None, show_progress: bool = True) -> StudyOutcome:
    """Trains and evaluates every unfinished run of `study` (see the module docstring); never raises for a
    failed run (it is listed in the outcome), but ConfigError/DataError for a bad study config or data folder.

    only: glob patterns of run names (fnmatch; a run is selected when any matches; empty: every run).
    limit: the most runs to train in this call (finished runs do not count).
    delete_checkpoints: remove OUT/<run>/checkpoints/ once the run is evaluated.
    prepared_root: where the prepared data sets and the subset's links go (default OUT/_prepared).
    """
    from urnet_jax import training
    from urnet_jax.data import DataError
    from urnet_jax.evaluation.runner import evaluate_run

    out_dir = pathlib.Path(out_dir).expanduser().resolve()
    prepared_root = pathlib.Path(prepared_root or out_dir / "_prepared").expanduser().resolve()
    check_study_config(study)
    data_dir = None
    if study.subset_per_class:
        data_dir = link_subset(study.base.data.dir, study.base.data.class_map, study.subset_per_class,
                               study.base.data.seed, prepared_root / "subset")
    runs = plan_runs(study, prepared_root, data_dir)
    selected = [run for run in runs if not only or any(fnmatch.fnmatchcase(run.name, p) for p in only)]
    if not selected:
        raise ConfigError(f"--only {' '.join(only)} matches none of the {len(runs)} runs (e.g. {runs[0].name})")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.json").write_text(json.dumps(study.to_dict(), indent=2, sort_keys=True, default=str) + "\n")

    outcome = StudyOutcome()
    attempts = 0
    study_start = time.monotonic()
    for position, run in enumerate(selected, start=1):
        prefix = f"[{position}/{len(selected)}] {run.name}"
        workdir = out_dir / run.name
        if read_finished_metrics(workdir) is not None:
            differences = _finished_config_differences(workdir, run.config)
            if differences:
                reason = f"finished with another configuration ({'; '.join(differences[:3])})"
                outcome.failed.append(f"{run.name}: {reason}")
                print(f"{prefix}: {reason}", flush=True)
            else:
                outcome.skipped.append(run.name)
                print(f"{prefix}: finished already, skipped", flush=True)
            continue
        if limit is not None and attempts >= limit:
            outcome.not_started.append(run.name)
            continue
        attempts += 1
        run_start = time.monotonic()
        print(f"{prefix}: training in {workdir} (study time so far {format_duration(run_start - study_start)})",
              flush=True)
        try:
            training.train(run.config, workdir, show_progress=show_progress)
            metrics = evaluate_run(workdir, "best", "test", progress=show_progress)
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the study
            reason = _one_line(error)
            if not isinstance(error, (ConfigError, DataError, RunError)):
                workdir.mkdir(parents=True, exist_ok=True)
                (workdir / "error.log").write_text(traceback.format_exc())
                reason = f"{type(error).__name__}: {reason} (traceback in {workdir / 'error.log'})"
            outcome.failed.append(f"{run.name}: {reason}")
            print(f"{prefix}: FAILED after {format_duration(time.monotonic() - run_start)}: {reason}", flush=True)
            continue
        finally:
            jax.clear_caches()  # this run's compiled programs (24 runs in one process must not pile them up)
        if delete_checkpoints:
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        outcome.trained.append(run.name)
        print(f"{prefix}: finished in {format_duration(time.monotonic() - run_start)}: test accuracy "
              f"{100 * metrics['accuracy']:.2f}%, macro F1 {100 * metrics['macro']['f1']:.2f}% "
              f"(study time {format_duration(time.monotonic() - study_start)})", flush=True)
    return outcome


# ----------------------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A finished run read back from its committed files."""

    name: str
    model: str
    data_variant: str
    seed: int
    config: Mapping[str, Any]
    metrics: Mapping[str, Any]
    # (epoch, test accuracy in [0, 1]) after every phase-2 epoch, from metrics.jsonl.
    test_accuracy_curve: tuple[tuple[int, float], ...] = ()


def collect_finished_runs(results_dir: str | os.PathLike) -> list[FinishedRun]:
    """Every finished run (a <model>-<variant>-seed<N> folder with eval/metrics.json) of a results folder,
    read from config.json, eval/metrics.json and metrics.jsonl (the phase-2 test accuracy curve). A missing
    folder has none.

    Raises ConfigError when a file does not parse or config.json disagrees with the folder's name.
    """
    from urnet_jax.evaluation.report import read_evaluated_run
    from urnet_jax.evaluation.runner import read_metrics_rows

    results_dir = pathlib.Path(results_dir)
    if not results_dir.is_dir():
        return []
    runs = []
    for child in sorted(results_dir.iterdir()):
        match = RUN_NAME.match(child.name)
        if not (match and child.is_dir() and (child / "eval" / "metrics.json").is_file()):
            continue
        try:
            saved, metrics = read_evaluated_run(child)
            config = config_lib.saved_config(saved).to_dict()  # keys added since the run at their defaults
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if not _has_table3_numbers(metrics):
            raise ConfigError(f"{child / 'eval' / 'metrics.json'} lacks some of classes, per_class "
                              f"recall/precision/f1, macro, accuracy, confusion_matrix")
        seed, variant = int(match["seed"]), match["data"]
        saved_seed, saved_variant = saved.get("seed"), saved.get("data", {}).get("variant")
        if (saved_seed, saved_variant) != (seed, variant):
            raise ConfigError(f"{child / 'config.json'} has seed {saved_seed!r} and data.variant {saved_variant!r}, "
                              f"but the folder's name says seed {seed} and {variant!r}")
        curve = tuple((row["epoch"], row["test_accuracy"]) for row in read_metrics_rows(child)
                      if isinstance(row, dict) and row.get("phase") == 2 and isinstance(row.get("epoch"), int)
                      and isinstance(row.get("test_accuracy"), (int, float)))
        runs.append(FinishedRun(name=child.name, model=match["model"], data_variant=variant, seed=seed,
                                config=config, metrics=metrics, test_accuracy_curve=curve))
    return runs


def learning_curves(results_dir: str | os.PathLike) -> dict[str, dict[str, list[list[tuple[int, float]]]]]:
    """{data variant: {model: [[(epoch, test accuracy in [0, 1]), ...] for each finished seed]}}: the
    phase-2 curves of the finished runs that have one, variants and models in the report's order."""
    from urnet_jax.data.plan import VARIANTS

    runs = [run for run in collect_finished_runs(results_dir) if run.test_accuracy_curve]
    curves: dict[str, dict[str, list[list[tuple[int, float]]]]] = {}
    for variant in _ordered([run.data_variant for run in runs], VARIANTS):
        for model in _ordered([run.model for run in runs], ABLATION_MODELS):
            for run in sorted((r for r in runs if (r.data_variant, r.model) == (variant, model)), key=lambda r: r.seed):
                curves.setdefault(variant, {}).setdefault(_column_header(model), []).append(
                    list(run.test_accuracy_curve))
    return curves


def unselected_accuracy(run: FinishedRun, last_epochs: int) -> float | None:
    """The mean test accuracy (in [0, 1]) over the run's last `last_epochs` phase-2 epochs: a number not
    selected on the test set, unlike the kept (best) checkpoint's. None without a curve."""
    values = [accuracy for _, accuracy in run.test_accuracy_curve[-last_epochs:]]
    return float(np.mean(values)) if values else None


def epoch_to_epoch_change(run: FinishedRun, last_epochs: int = 5) -> float | None:
    """How much the phase-2 test accuracy jumps between consecutive epochs late in training, where it
    should have settled: the mean absolute difference (in [0, 1]) over the last `last_epochs` epochs.
    None with fewer than two epochs."""
    values = np.asarray([accuracy for _, accuracy in run.test_accuracy_curve[-last_epochs:]], np.float64)
    return float(np.abs(np.diff(values)).mean()) if len(values) > 1 else None


def _has_table3_numbers(metrics: Any) -> bool:
    """Whether a parsed metrics.json holds every number of the Table-3 layout."""
    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    keys = ("recall", "precision", "f1")
    try:
        classes, confusion = metrics["classes"], metrics["confusion_matrix"]
        return (is_number(metrics["accuracy"]) and all(is_number(metrics["macro"][k]) for k in keys)
                and all(is_number(metrics["per_class"][name][k]) for name in classes for k in keys)
                and len(confusion) == len(classes)
                and all(len(row) == len(classes) and all(map(is_number, row)) for row in confusion))
    except (KeyError, TypeError):
        return False


def _common_classes(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """The classes of the first metrics.json that every one of them has, in its order."""
    return [name for name in metrics[0]["classes"] if all(name in m["per_class"] for m in metrics)]


def aggregate_metrics(metrics: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mean, sample standard deviation (ddof 1)) over runs of every number the Table-3 layout shows,
    each in metrics.json's shape; a std is None for fewer than two runs, a class some run lacks is left out."""
    classes = _common_classes(metrics)

    def stats(values: list[float]) -> tuple[float, float | None]:
        array = np.asarray(values, np.float64)
        return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)

    mean: dict[str, Any] = {"classes": classes, "per_class": {}, "macro": {}}
    std: dict[str, Any] = {"classes": classes, "per_class": {}, "macro": {}}
    for name in classes:
        mean["per_class"][name], std["per_class"][name] = {}, {}
        for key in ("recall", "precision", "f1"):
            values = [m["per_class"][name][key] for m in metrics]
            mean["per_class"][name][key], std["per_class"][name][key] = stats(values)
    for key in ("recall", "precision", "f1"):
        mean["macro"][key], std["macro"][key] = stats([m["macro"][key] for m in metrics])
    mean["accuracy"], std["accuracy"] = stats([m["accuracy"] for m in metrics])
    return mean, std


def _cell_values(line: str) -> list[str]:
    """The cells of one row of a Markdown table."""
    return [cell.strip() for cell in line.strip()[1:-1].split("|")]


def _shared_value(runs: Sequence[FinishedRun], key: str) -> Any:
    """The config.json value of a dotted key in `runs`; a list of the distinct values when they differ."""
    values = []
    for run in runs:
        node: Any = run.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node not in values:
            values.append(node)
    return values[0] if len(values) == 1 else values


def _display(value: Any) -> str:
    """A config value for a table or a sentence ('none' for '' and None; 'mixed: ...' for a list)."""
    from urnet_jax.evaluation.report import DISPLAY_NAMES

    if isinstance(value, list):
        return "mixed: " + ", ".join(_display(v) for v in value)
    if value in ("", None):
        return "none"
    return DISPLAY_NAMES.get(value, str(value)) if isinstance(value, str) else str(value)


def mean_std_table(cells: Mapping[str, Sequence[FinishedRun]]) -> str:
    """The Table-3 layout with 'mean ± std' (%) over each column's runs, for {column header: runs}.

    Two rows on top name the column's enhancer and its phase-1 epochs; the last row counts the runs
    (seeds) of each cell. A std needs two runs (a cell of one run shows its value alone); an empty
    column shows n/a.
    """
    from urnet_jax.evaluation.report import MISSING, markdown_table, table3

    empty: dict[str, Any] = {"classes": [], "per_class": {}, "accuracy": None,
                             "macro": {"recall": None, "precision": None, "f1": None}}
    stats = {header: aggregate_metrics([run.metrics for run in runs]) if runs else (empty, empty)
             for header, runs in cells.items()}
    mean_lines = table3({header: mean for header, (mean, _) in stats.items()}).splitlines()
    std_lines = table3({header: std for header, (_, std) in stats.items()}).splitlines()
    rows = []
    for mean_line, std_line in zip(mean_lines[2:], std_lines[2:], strict=True):
        label, *means = _cell_values(mean_line)
        stds = _cell_values(std_line)[1:]
        rows.append([label, *(mean if std == MISSING else f"{mean} ± {std}" for mean, std in zip(means, stds))])

    def describe(key: str) -> list[str]:
        return [_display(_shared_value(runs, key)) if runs else MISSING for runs in cells.values()]

    def unselected(last_epochs: int) -> list[str]:
        return [_mean_std_points([v for v in (unselected_accuracy(run, last_epochs) for run in runs) if v is not None])
                for runs in cells.values()]

    rows = [["enhancer", *describe("model.enhancer")],
            ["enhancer pre-training epochs (phase 1)", *describe("pretrain.epochs")],
            *rows,
            ["test accuracy, last epoch (not selected)", *unselected(1)],
            ["test accuracy, mean of the last 3 epochs", *unselected(3)],
            ["finished seeds", *(str(len(runs)) for runs in cells.values())]]
    return markdown_table(_cell_values(mean_lines[0]), rows)


def paired_differences(first: Sequence[FinishedRun], second: Sequence[FinishedRun],
                       pick: Callable[[FinishedRun], float | None]) -> list[float]:
    """pick(first) - pick(second) for every seed both lists have a value for, in seed order (units of `pick`)."""
    by_seed = {run.seed: pick(run) for run in second}
    differences = []
    for run in sorted(first, key=lambda r: r.seed):
        value, other = pick(run), by_seed.get(run.seed)
        if value is not None and other is not None:
            differences.append(value - other)
    return differences


def _signed(value: float) -> str:
    """'+1.25' or '−0.50' (a minus sign); values that round to zero print as '+0.00', never '−0.00'."""
    return f"{round(value, 2) + 0.0:+.2f}".replace("-", "−")


def _mean_std_points(values: Sequence[float], signed: bool = False) -> str:
    """'96.00 ± 1.07' (or '+0.98 ± 0.67' when signed): mean ± sample std of fractions, in percentage
    points; the mean alone for one value, 'n/a' for none."""
    from urnet_jax.evaluation.report import MISSING

    if not values:
        return MISSING
    points = 100.0 * np.asarray(values, np.float64)
    mean = _signed(float(points.mean())) if signed else f"{points.mean():.2f}"
    return mean + (f" ± {points.std(ddof=1):.2f}" if len(points) > 1 else "")


def _difference_cell(differences: Sequence[float]) -> str:
    """'+1.20 ± 0.80 (2/0/1)': mean ± sample std in percentage points, then seeds better/equal/worse
    ('n/a' for no differences)."""
    if not differences:
        return _mean_std_points(differences)
    points = 100.0 * np.asarray(differences, np.float64)
    counts = (int((points > 1e-9).sum()), int((abs(points) <= 1e-9).sum()), int((points < -1e-9).sum()))
    return f"{_mean_std_points(differences, signed=True)} ({'/'.join(map(str, counts))})"


def _t_interval(differences: Sequence[float], level: float = 0.95) -> str:
    """The two-sided t-interval of the mean difference, in percentage points ('n/a' for fewer than 2)."""
    from scipy import stats

    from urnet_jax.evaluation.report import MISSING

    points = 100.0 * np.asarray(differences, np.float64)
    if len(points) < 2:
        return MISSING
    half = float(stats.t.ppf(0.5 + level / 2, len(points) - 1) * points.std(ddof=1) / np.sqrt(len(points)))
    return f"[{_signed(float(points.mean()) - half)}, {_signed(float(points.mean()) + half)}]"


def paired_table(runs: Sequence[FinishedRun], classes: Sequence[str]) -> str | None:
    """The PAIRED_COMPARISONS of one data variant's runs as a Markdown table (None when no pair has a
    shared seed): test accuracy and each class's recall, first model minus second, paired by seed."""
    from urnet_jax.evaluation.report import markdown_table

    by_model = {model: [run for run in runs if run.model == model] for model in {run.model for run in runs}}
    columns: list[tuple[str, Callable[[FinishedRun], float | None]]] = [
        ("test accuracy", lambda run: run.metrics["accuracy"]),
        ("last-epoch test accuracy", lambda run: unselected_accuracy(run, 1))]
    columns += [(f"recall {name}", lambda run, name=name: run.metrics["per_class"][name]["recall"])
                for name in classes]
    rows = []
    for first, second, measures in PAIRED_COMPARISONS:
        accuracy, *others = [paired_differences(by_model.get(first, []), by_model.get(second, []), pick)
                             for _, pick in columns]
        if not accuracy:
            continue
        rows.append([f"{_column_header(first)} − {_column_header(second)}", measures, str(len(accuracy)),
                     _difference_cell(accuracy), _t_interval(accuracy), *map(_difference_cell, others)])
    if not rows:
        return None
    return markdown_table(["comparison", "what it measures", "seeds", "test accuracy", "95% t-interval (accuracy)",
                           *(label for label, _ in columns[1:])], rows)


def baseline_table(runs: Sequence[FinishedRun], baseline_runs: Sequence[FinishedRun]) -> str | None:
    """Each model of one data variant against the same model of a baseline study, paired by seed (None
    when no run has a baseline run of the same name): this study's number minus the baseline's for the
    selected and unselected test accuracies, and each study's epoch-to-epoch change of test accuracy."""
    from urnet_jax.evaluation.report import markdown_table

    differences = [("test accuracy", lambda run: run.metrics["accuracy"]),
                   ("last-epoch test accuracy", lambda run: unselected_accuracy(run, 1)),
                   ("mean of the last 3 epochs", lambda run: unselected_accuracy(run, 3))]
    rows = []
    for model in _ordered([run.model for run in runs], ABLATION_MODELS):
        here = [run for run in runs if run.model == model]
        there = {run.seed: run for run in baseline_runs if run.model == model}
        paired = [run for run in here if run.seed in there]
        if not paired:
            continue
        swings = [(epoch_to_epoch_change(run), epoch_to_epoch_change(there[run.seed])) for run in paired]
        swings = [pair for pair in swings if None not in pair]
        rows.append([_column_header(model), str(len(paired)),
                     *(_difference_cell(paired_differences(here, list(there.values()), pick)) for _, pick in differences),
                     _mean_std_points([here_swing for here_swing, _ in swings]),
                     _mean_std_points([there_swing for _, there_swing in swings])])
    if not rows:
        return None
    return markdown_table(["model", "seeds", *(f"{label}, difference" for label, _ in differences),
                           "epoch-to-epoch change, this study", "epoch-to-epoch change, baseline"], rows)


def _baseline_settings(runs: Sequence[FinishedRun], baseline_runs: Sequence[FinishedRun]) -> list[str]:
    """The config differences ('key: baseline != this') between paired runs, each once (locations and
    bookkeeping aside, as for skipping finished runs)."""
    by_name = {run.name: run for run in baseline_runs}
    found: list[str] = []
    for run in runs:
        if run.name in by_name:
            for line in config_lib.config_differences(by_name[run.name].config, run.config, ignored=IGNORED_KEYS):
                if line not in found:
                    found.append(line)
    return found


def read_baseline(results_dir: pathlib.Path) -> str:
    """The baseline named in a results folder's study.json ('' when there is none)."""
    try:
        baseline = json.loads((results_dir / "study.json").read_text()).get("baseline", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return baseline if isinstance(baseline, str) and NAME_PART.match(baseline) else ""


def error_table(cells: Mapping[str, Sequence[FinishedRun]], classes: Sequence[str]) -> str:
    """Test errors as 'true -> predicted' rows (every ordered pair of distinct classes), one column per
    {header: runs}: the mean number of images over the column's runs (from the confusion matrices)."""
    from urnet_jax.evaluation.report import MISSING, markdown_table

    rows = []
    for true in classes:
        for predicted in classes:
            if true == predicted:
                continue
            row = [f"{true} → {predicted}"]
            for runs in cells.values():
                counts = [run.metrics["confusion_matrix"][run.metrics["classes"].index(true)]
                          [run.metrics["classes"].index(predicted)] for run in runs
                          if true in run.metrics["classes"] and predicted in run.metrics["classes"]]
                row.append(f"{np.mean(counts):.1f}" if counts else MISSING)
            rows.append(row)
    return markdown_table(["true → predicted", *cells], rows)


def _ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """Distinct `values`, those in `preferred` first in its order, the others sorted."""
    distinct = set(values)
    return [v for v in preferred if v in distinct] + sorted(distinct - set(preferred))


def _test_images(runs: Sequence[FinishedRun]) -> str:
    """'granulocyte 125, monocyte 125, ...': the test split's images per class, or 'mixed' when runs differ."""
    splits = {tuple((name, run.metrics["per_class"][name].get("support")) for name in run.metrics["classes"])
              for run in runs}
    return ", ".join(f"{name} {count}" for name, count in splits.pop()) if len(splits) == 1 else "mixed"


def _column_header(model: str) -> str:
    return model[:1].upper() + model[1:]


def results_block(results_dir: str | os.PathLike) -> str:
    """The generated Markdown of a results folder (between and including its markers)."""
    from urnet_jax.data.plan import VARIANTS

    results_dir = pathlib.Path(results_dir)
    name = results_dir.resolve().name
    runs = collect_finished_runs(results_dir)
    parts = [MARKER_BEGIN.format(name=name),
             f"<!-- generated by `python -m urnet_jax.study report results/{name}`: edit the text outside the "
             f"markers only -->", ""]
    if not runs:
        parts += [f"No finished runs in `results/{name}` yet.", ""]
    models = _ordered([run.model for run in runs], ABLATION_MODELS)
    baseline = read_baseline(results_dir)
    baseline_runs = collect_finished_runs(results_dir.parent / baseline) if baseline else []
    for variant in _ordered([run.data_variant for run in runs], VARIANTS):
        of_variant = [run for run in runs if run.data_variant == variant]
        cells = {_column_header(model): sorted((r for r in of_variant if r.model == model), key=lambda r: r.seed)
                 for model in models}
        seeds = sorted({run.seed for run in of_variant})
        description = DATA_DESCRIPTIONS.get(variant, variant)
        parts += [f"#### `results/{name}`, data variant `{variant}`: {description}", "",
                  mean_std_table(cells), "",
                  f"Mean ± sample standard deviation over seeds ({', '.join(map(str, seeds))}), in %; a cell "
                  f"without ± has one finished seed. Averages are unweighted means over the classes (macro).", "",
                  "Settings of these runs (config.json): " + ", ".join(
                      f"`{key}` {_display(_shared_value(of_variant, key))}" for key in PROTOCOL_KEYS)
                  + f"; test images per class (eval/metrics.json): {_test_images(of_variant)}.", ""]
        classes = _common_classes([run.metrics for run in of_variant])
        paired = paired_table(of_variant, classes)
        if paired is not None:
            parts += [paired, "",
                      "Paired differences in percentage points, first model minus second, over the seeds both "
                      "have finished (same seed, same data): mean ± sample standard deviation, then how many "
                      "of those seeds the first model was better/equal/worse. The t-interval (n − 1 degrees of "
                      "freedom) covers only the spread over seeds, not over other test sets.", ""]
        parts += [error_table(cells, classes), "",
                  "Test errors by true and predicted class: images, mean over each column's finished seeds "
                  "(from each run's confusion matrix).", ""]
        of_baseline = [run for run in baseline_runs if run.data_variant == variant]
        compared = baseline_table(of_variant, of_baseline)
        if compared is not None:
            settings = _baseline_settings(of_variant, of_baseline)
            parts += [f"Against the baseline study `results/{baseline}`, run by run (same model, data variant and "
                      f"seed), whose runs differ from these in: "
                      + ("; ".join(f"`{line}`" for line in settings) or "nothing (same settings)")
                      + " (baseline != this study).", "", compared, "",
                      "Differences in percentage points, this study minus the baseline, over the seeds both have "
                      "finished: mean ± sample standard deviation, then how many seeds were better/equal/worse "
                      "here. Epoch-to-epoch change: the mean absolute change of test accuracy between "
                      "consecutive epochs among the last 5 phase-2 epochs, in points, mean ± std over the same "
                      "seeds.", ""]
    parts.append(MARKER_END.format(name=name))
    return "\n".join(parts)


def _block_span(text: str, name: str) -> tuple[int, int] | None:
    """(start, end) of the block of `name` in text (end just past the end marker), or None."""
    begin, end = MARKER_BEGIN.format(name=name), MARKER_END.format(name=name)
    start = text.find(begin)
    if start < 0:
        return None
    stop = text.find(end, start)
    if stop < 0:
        raise ConfigError(f"'{begin}' has no matching '{end}'")
    return start, stop + len(end)


def replace_block(text: str, block: str, name: str) -> str:
    """`text` with the block of `name` replaced by `block` (appended when the markers are absent)."""
    span = _block_span(text, name)
    if span is None:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    return text[:span[0]] + block + text[span[1]:]


def block_names(text: str) -> list[str]:
    """The NAMEs of every `<!-- results:begin NAME -->` marker in text."""
    return re.findall(r"<!-- results:begin (\S+) -->", text)


def check_document(text: str, results_dir: str | os.PathLike) -> bool:
    """True when the document's block of results_dir equals what the results give."""
    name = pathlib.Path(results_dir).resolve().name
    span = _block_span(text, name)
    return span is not None and text[span[0]:span[1]] == results_block(results_dir)


# ----------------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    from urnet_jax.evaluation.commands import ArgumentParser

    parser = ArgumentParser(prog="python -m urnet_jax.study",
                            description="Run the reproduction study, or write its results tables.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train and evaluate every unfinished run of a study config")
    run.add_argument("--config", required=True,
                     help="study config file (e.g. configs/study_cpu.py); override keys with --config.KEY=VALUE "
                          "(e.g. --config.seeds='(1,)' --config.base.train.epochs=5)")
    run.add_argument("--out", required=True, help="results folder (e.g. results/study_cpu)")
    run.add_argument("--only", action="append", default=[], metavar="PATTERN",
                     help="run only the runs whose name matches this glob (e.g. 'net4-*', '*-raw-seed1'); repeatable")
    run.add_argument("--limit", type=int, default=None, metavar="N",
                     help="train at most N unfinished runs, then stop (finished runs are skipped and not counted)")
    run.add_argument("--delete-checkpoints", action="store_true",
                     help="delete each run's checkpoints/ once it is evaluated (default: keep them)")
    run.add_argument("--prepared", default=None, metavar="DIR",
                     help="folder for the prepared data sets and the subset's links (default OUT/_prepared)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    report = commands.add_parser("report", help="print the results tables (mean ± std over seeds)")
    report.add_argument("results", help="results folder written by `run` (e.g. results/study_cpu)")
    report.add_argument("--out", default=None, metavar="FILE",
                        help="also write the tables into FILE between its markers (e.g. docs/RESULTS.md)")
    report.add_argument("--check", action="store_true",
                        help="exit with status 1 when --out FILE's tables differ from the results (writes nothing)")
    report.add_argument("--curves", default=None, metavar="PNG",
                        help="also plot every run's phase-2 test accuracy per epoch (from metrics.jsonl) into PNG")
    return parser


def _run_command(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    try:
        study = cli.load_config_file(args.config)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - any problem of the file itself, in one line
        raise ConfigError(f"cannot load --config {args.config}: {_one_line(error)}") from None
    if not isinstance(study, ml_collections.ConfigDict):
        raise ConfigError(f"--config {args.config}: get_config() must return an ml_collections.ConfigDict")
    study = apply_overrides(study, parse_command_line_overrides(args.overrides), "--config")
    out_dir = pathlib.Path(args.out)
    if not jax.config.jax_compilation_cache_dir:  # the runs of one model variant compile the same programs
        jax.config.update("jax_compilation_cache_dir", str((out_dir / "_jax_cache").resolve()))
    try:
        outcome = run_study(study, out_dir, args.only, args.limit, args.delete_checkpoints, args.prepared,
                            show_progress=not args.no_progress)
    except KeyboardInterrupt as stop:  # Ctrl-C outside training, or TrainingStopped (a checkpoint was saved)
        print(f"interrupted: {str(stop) or 'run the same command again to resume'}", file=sys.stderr)
        return 128 + getattr(stop, "signal_number", signal.SIGINT)
    print(f"trained {len(outcome.trained)}, skipped {len(outcome.skipped)} finished, failed {len(outcome.failed)}"
          + (f", left for later (--limit) {len(outcome.not_started)}" if outcome.not_started else ""))
    if outcome.failed:
        print(f"{len(outcome.failed)} run(s) failed:", file=sys.stderr)
        for line in outcome.failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _report_command(args: argparse.Namespace) -> int:
    results_dir = pathlib.Path(args.results)
    if not results_dir.is_dir():
        print(f"note: {results_dir} does not exist (yet): no finished runs", file=sys.stderr)
    block = results_block(results_dir)
    if args.check:
        if args.out is None:
            raise ConfigError("--check needs --out FILE (the document to check)")
        document = pathlib.Path(args.out)
        text = document.read_text() if document.is_file() else ""
        if not check_document(text, results_dir):
            print(f"{document}: the tables of {results_dir} are missing or out of date; regenerate them with "
                  f"python -m urnet_jax.study report {args.results} --out {args.out}", file=sys.stderr)
            return 1
        print(f"{document}: the tables of {results_dir} are up to date")
        return 0
    print(block)
    if args.curves is not None:
        from urnet_jax.evaluation.figures import plot_study_curves

        curves = learning_curves(results_dir)
        if not curves:
            raise ConfigError(f"--curves: no finished run in {results_dir} has phase-2 rows in its metrics.jsonl")
        try:
            plot_study_curves(curves, args.curves)
        except OSError as error:
            raise ConfigError(f"cannot write --curves {args.curves}: {error.strerror or error}") from None
        print(f"learning curves written to {args.curves}")
    if args.out is not None:
        document = pathlib.Path(args.out)
        try:
            text = document.read_text() if document.is_file() else ""
            document.write_text(replace_block(text, block, results_dir.resolve().name))
        except OSError as error:
            raise ConfigError(f"cannot write --out {document}: {error.strerror or error}") from None
        print(f"written to {document}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: bad command line or config, 1: failed runs or --check)."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.command == "run":
        args.overrides = overrides
    elif overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    with cli.one_line_errors():
        status = _run_command(args) if args.command == "run" else _report_command(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
