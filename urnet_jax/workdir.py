"""A training run's directory: its layout, its configuration check, and reading a run back.

    config.json            the resolved configuration (paths made absolute)
    metrics.jsonl          one JSON object per finished epoch: phase, epoch (1-based, within the phase),
                           step (global), train_loss, train_accuracy (null in phase 1), for each evaluated
                           split S in (val, test; with train.test_every_epoch=False test only after kept
                           and last epochs): S_loss, and in phase 2 S_accuracy, S_balanced_accuracy, in
                           phase 1 S_mse, S_psnr (dB, the mean of per-image PSNR), S_input_psnr (the
                           same for the unchanged input: the no-enhancement reference), S_saturated_fraction;
                           saturated_fraction (phase 1, of the selection split); selected_on (the split
                           whose metrics chose: train.select_on), best (whether this epoch's weights were
                           kept as the best), eval_seconds (the evaluation's wall time), seconds (the
                           epoch's training steps and evaluation); the last phase-1 row also has phase1_psnr (the
                           kept enhancer's PSNR on selected_on) and phase1_below_min_psnr. Rewritten from
                           the checkpoint on resume, so it never repeats an epoch
    tensorboard/           tensorboardX event files (per-epoch metrics, the step loss and learning rate
                           every log_every_steps)
    checkpoints/periodic/  rotating resume points (every checkpoint.every_steps steps and each epoch end;
                           the newest checkpoint.keep are kept): the train state and the run's position
    checkpoints/best/      phase 2's weights {'params', 'batch_stats'} (of one step) of the highest accuracy on
                           the selection split (train.select_on: 'val', or 'test' for the paper's protocol)
    checkpoints/pretrain_best/  phase 1's enhancer weights of the lowest reconstruction MSE on that split
    checkpoints/corrupt/   unreadable checkpoints moved aside on resume (never deleted)
    data/                  the prepared data set (unless config.data.prepared_dir is set)
    pretrained.json        with model.pretrained: what phase 2's classifier started from: source (the weight
                           file or run, relative to the current directory), body_sha256 (`port.body_digest`
                           of the loaded weights) and, for an evaluated run, source_test_accuracy (its
                           eval/metrics.json)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging

import urnet_jax.data as data_lib
from urnet_jax import compiler_options, config as config_lib, sharding
from urnet_jax.checkpointing import CheckpointStore
from urnet_jax.errors import ConfigError, NoReadableCheckpoint
from urnet_jax.models import layers
from urnet_jax.models.onednn import OnednnUnavailable
from urnet_jax.port import body_digest, replace_head
from urnet_jax.train_state import JOINT, PHASE_PARTS, PRETRAIN, TrainState, Variables, abstract_variables, build

CHECKPOINT_NAMES = ("best", "latest")
# The metrics rows' wall times: the only keys in which two runs of the same computation differ.
TIMING_KEYS = frozenset({"seconds", "eval_seconds"})
PRETRAINED_RECORD = "pretrained.json"
# Keys that may change between a run and its resumption (they do not alter the computation so far).
RESUMABLE_KEYS = frozenset({"train.epochs", "checkpoint.every_steps", "checkpoint.keep", "log_every_steps",
                            "data.prepared_dir", "pretrain.min_psnr", "train.test_every_epoch"})


def _checkpoints_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    """<workdir>/checkpoints: the periodic, best and pretrain_best stores."""
    return pathlib.Path(workdir) / "checkpoints"


def prepared_dir_of(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """Where the prepared data set lives: config.data.prepared_dir, else <workdir>/data."""
    return pathlib.Path(config.data.prepared_dir) if config.data.prepared_dir else pathlib.Path(workdir) / "data"


def read_metrics_rows(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The rows of <workdir>/metrics.jsonl (one per finished epoch, see the module docstring); [] before
    the first epoch ends. A line that does not parse (a write cut short) is skipped."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_config_differences(saved: dict[str, Any], current: ml_collections.ConfigDict) -> list[str]:
    """'key: saved != current' for every key in which a run's saved config differs from `current`, apart
    from those that may change on resumption: RESUMABLE_KEYS, less train.epochs under a decaying schedule
    (the epochs set the learning rate of every step)."""
    resumable = RESUMABLE_KEYS if current.optimizer.schedule == "constant" else RESUMABLE_KEYS - {"train.epochs"}
    return config_lib.config_differences(saved, current.to_dict(), ignored=resumable)


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
    """ConfigError when `workdir`'s checkpoints were written with a configuration that differs from
    `config` in a key outside RESUMABLE_KEYS; checked before anything in the workdir is written."""
    periodic = _checkpoints_dir(workdir) / "periodic"
    if not periodic.is_dir():
        return
    store = CheckpointStore(periodic, for_writing=False)
    try:
        for step in reversed(store.steps()):
            try:
                saved = store.restore_meta(step)["config"]
            except Exception:  # an unreadable step: the restore reports it, compare with an older one
                continue
            differences = run_config_differences(saved, config)
            if differences:
                raise ConfigError(
                    f"{workdir} holds a run of another configuration ({'; '.join(differences[:3])}"
                    f"{'; ...' if len(differences) > 3 else ''}); use another --workdir or the run's own config")
            return
    finally:
        store.close()


def empty_partial() -> dict[str, float]:
    return {"loss_sum": 0.0, "correct_sum": 0.0, "steps": 0, "seconds": 0.0}


@dataclasses.dataclass
class Position:
    """Where a run stands: the next step to take is `step_in_epoch` of `epoch` (0-based) of `phase`.

    `partial` holds the running sums of that epoch (loss_sum, correct_sum, steps, seconds), `best` the
    best metrics so far on the selection split (phase 1's loss, phase 2's accuracy), `history` the
    finished epochs' metrics rows.
    """

    phase: int
    epoch: int = 0
    step_in_epoch: int = 0
    partial: dict[str, float] = dataclasses.field(default_factory=empty_partial)
    best: dict[str, float | None] = dataclasses.field(
        default_factory=lambda: {"pretrain_loss": None, "accuracy": None})
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def is_complete(self, phase_epochs: dict[int, int]) -> bool:
        last_phase = JOINT if phase_epochs[JOINT] else PRETRAIN
        return self.phase == last_phase and self.epoch >= phase_epochs[last_phase]


@dataclasses.dataclass
class Checkpoints:
    """The run's three checkpoint stores, and the step last saved to (or restored from) `periodic`."""

    periodic: CheckpointStore
    best: CheckpointStore
    pretrain_best: CheckpointStore
    last_saved_step: int | None = None

    @classmethod
    def open(cls, workdir: pathlib.Path, keep: int) -> Checkpoints:
        directory = _checkpoints_dir(workdir)
        return cls(CheckpointStore(directory / "periodic", max_to_keep=keep),
                   CheckpointStore(directory / "best", max_to_keep=1),
                   CheckpointStore(directory / "pretrain_best", max_to_keep=1))

    def save(self, config: ml_collections.ConfigDict, state: TrainState, position: Position) -> None:
        """A periodic checkpoint: the state's arrays, with the position and the config as its record."""
        step = int(state.step)
        meta = {"position": dataclasses.asdict(position), "config": config.to_dict(),
                "device_count": jax.device_count()}
        self.periodic.save(step, state.arrays(), meta)
        self.last_saved_step = step

    def left_behind(self) -> str:
        """What a failed run leaves behind, for its error message."""
        if self.last_saved_step is None:
            return "no checkpoint was written"
        return f"the last checkpoint (step {self.last_saved_step}) is intact"

    def close(self) -> None:
        for store in (self.periodic, self.best, self.pretrain_best):
            store.close()


@dataclasses.dataclass
class Run:
    """A trained run: its config, float32 model, variables {'params', 'batch_stats'}, classes, data folder."""

    config: ml_collections.ConfigDict
    model: nn.Module
    variables: Variables
    class_names: list[str]
    prepared_dir: pathlib.Path


def _saved_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{workdir} holds no training run (no config.json)")
    try:
        return config_lib.saved_config(json.loads(config_file.read_text()))
    except ValueError as error:  # a damaged config.json, or one of another version
        raise ConfigError(f"{config_file}: {' '.join(str(error).split())}") from None


def saved_conv_backend(workdir: str | pathlib.Path) -> str | None:
    """The convolution backend a run computes with ('xla' or 'onednn', its `config.conv_backend`); None where
    `workdir` holds no readable run config (loading the run then says why)."""
    try:
        return _saved_config(pathlib.Path(workdir)).conv_backend
    except ConfigError:
        return None


def load_run(workdir: str | pathlib.Path, checkpoint: str = "best") -> Run:
    """Loads the phase-2 weights of the run in `workdir`: 'best' (the highest accuracy on the split of
    train.select_on) or 'latest'
    (the newest periodic checkpoint, of which only the variables are read, not the optimiser state).

    Raises ConfigError (one line) when the workdir holds no run or no phase-2 weights yet. The variables
    are replicated over every device of `sharding.data_mesh()`; the model computes in float32.
    """
    workdir = pathlib.Path(workdir)
    if checkpoint not in CHECKPOINT_NAMES:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, got {checkpoint!r}")
    config = _saved_config(workdir)
    compiler_options.use_cpu_options(config.xla_cpu_options)  # evaluated with the numerics it was trained with
    try:
        layers.use_conv_backend(config.conv_backend)
    except OnednnUnavailable as error:  # XLA's convolutions give the same results up to float rounding
        logging.warning("%s; loading the run with XLA's convolutions instead", error)
        layers.use_conv_backend("xla")
    prepared_dir = prepared_dir_of(config, workdir)
    class_names = list(data_lib.load_info(prepared_dir).class_names)
    model = build(config, len(class_names))
    store_dir = _checkpoints_dir(workdir) / ("best" if checkpoint == "best" else "periodic")
    if not store_dir.is_dir():
        raise ConfigError(f"{workdir} has no '{checkpoint}' checkpoint yet")
    target = sharding.with_sharding(abstract_variables(model, PHASE_PARTS[JOINT], int(config.data.image_size)),
                                    sharding.replicated(sharding.data_mesh()))

    def target_for(meta: dict[str, Any]) -> Variables:
        if checkpoint == "latest" and meta["position"]["phase"] != JOINT:
            raise ConfigError(f"the latest checkpoint of {workdir} is from phase 1 (no classifier yet)")
        return target

    store = CheckpointStore(store_dir, for_writing=False)
    try:
        restored = store.restore_latest(target_for, partial=checkpoint == "latest")
    except NoReadableCheckpoint as error:
        raise ConfigError(str(error)) from None
    finally:
        store.close()
    if restored is None:
        raise ConfigError(f"{workdir} has no '{checkpoint}' checkpoint yet")
    variables = {"params": restored.state["params"], "batch_stats": restored.state["batch_stats"]}
    return Run(config=config, model=model, variables=variables, class_names=class_names, prepared_dir=prepared_dir)


def write_pretrained_record(workdir: str | pathlib.Path, source: str | pathlib.Path, name: str,
                            variables: Variables) -> dict[str, Any]:
    """Writes <workdir>/pretrained.json (module docstring) for classifier `name`'s `variables` loaded from
    `source`, so that runs can be told apart by the weights they started from; returns the record."""
    record: dict[str, Any] = {"source": os.path.relpath(pathlib.Path(source).resolve()),
                              "body_sha256": body_digest(variables, name)}
    source_metrics = pathlib.Path(source) / "eval" / "metrics.json"
    try:  # an unevaluated run or a weight file has none; an unreadable one only leaves it out
        record["source_test_accuracy"] = json.loads(source_metrics.read_text())["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    (pathlib.Path(workdir) / PRETRAINED_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def pretrained_classifier(run_dir: str | pathlib.Path, name: str, num_classes: int, head_key: jax.Array) -> Variables:
    """The classifier of the `best` weights of the training run in `run_dir` ({'params'[, 'batch_stats']}),
    its head replaced by a fresh one of `num_classes` outputs initialised from `head_key`, as for
    torchvision weights (`port.replace_head`). ConfigError (one line) when the run's classifier is not
    `name` or the run has no `best` weights."""
    run = load_run(run_dir, "best")
    if run.config.model.classifier != name:
        raise ConfigError(f"model.pretrained run {run_dir} trained {run.config.model.classifier}, not {name}")
    classifier = {collection: trees["classifier"] for collection, trees in run.variables.items()
                  if "classifier" in trees}
    return replace_head(classifier, name, num_classes, head_key, width=run.config.model.classifier_width or None)
