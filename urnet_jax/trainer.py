"""UR-Net's two-phase training loop: `train_and_evaluate(config, workdir)`.

Phase 1 (`config.pretrain.epochs`, skipped without an enhancer, its own optimiser `pretrain.optimizer`):
the enhancer alone learns to reproduce its target (the input, or `batch["target"]`); after each epoch the
validation and test splits' reconstruction MSE, PSNR and saturated-output fraction are measured, and the
weights of the lowest MSE on the selection split (`train.select_on`: 'val', or 'test' for the paper's
protocol) are kept in `checkpoints/pretrain_best`; a kept enhancer below `pretrain.min_psnr` is reported.
Phase 2 (`config.train.epochs`, `optimizer`): enhancer (from the phase-1 best, else freshly initialised) +
classifier (from `config.model.pretrained` with a new head: torchvision weights or another run's `best`,
else freshly initialised) trained jointly; both splits are evaluated after each epoch and the weights of
the highest accuracy on the selection split are kept in `checkpoints/best`. Test metrics are logged but
choose nothing under select_on='val'; `train.test_every_epoch=False` evaluates the test split only after
the epochs whose weights are kept and the last epoch of each phase (the other rows have no test metrics).
The workdir's layout: `urnet_jax.workdir`.

The run is a deterministic function of (config, position): batch k of epoch e comes from
`data.train_batches(seed, epoch, start_step=k)` and step g's random key is `fold_in(step key, g)`. A
periodic checkpoint stores the state with its position (phase, epoch, step in epoch), the running sums of
the current epoch, the best metrics so far and the metrics history, so a resumed run finishes with the
same weights and metrics as an uninterrupted one (on the same devices). SIGINT or SIGTERM saves a
checkpoint after the current step and stops the run (`urnet_jax.preemption`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

import urnet_jax.data as data_lib
from urnet_jax import config as config_lib, reconstruction_loss, sharding
from urnet_jax.errors import NoReadableCheckpoint, RunError
from urnet_jax.port import load_pretrained
from urnet_jax.preemption import StopRequest, stop_on_signals
from urnet_jax.steps import JOINT, PRETRAIN, evaluate_split, make_eval_step, make_train_step
from urnet_jax.run_context import RunContext, make_context
from urnet_jax.run_log import announce_estimate, open_outputs, print_start, record_epoch
from urnet_jax.train_state import (HEAD_KEY_FOLD, PHASE_PARTS, TrainState, Variables, abstract_state, init_variables,
                                   new_state, with_pretrained_classifier)
from urnet_jax.workdir import (Checkpoints, Position, check_workdir_config, empty_partial, prepared_dir_of,
                               pretrained_classifier, write_pretrained_record)

# Steps timed (after the first, which compiles) in the first epoch a process runs of a phase, before the
# phase's time estimate is printed (not at all when that epoch has fewer steps left).
ETA_STEPS = 5
TRAIN_BATCH_KEYS = ("image", "label", "target")  # what a training batch may carry ('target': phase 1's)


def _abstract_state(context: RunContext, phase: int) -> TrainState:
    return abstract_state(context.model, context.optimizer(phase), phase, context.image_size, context.replicated)


def restore(context: RunContext, checkpoints: Checkpoints) -> tuple[TrainState, Position] | None:
    """The newest readable periodic checkpoint as (state, position); None for a new run."""
    abstract: dict[int, TrainState] = {}

    def target_for(meta: dict[str, Any]) -> dict[str, Any]:
        phase = meta["position"]["phase"]
        abstract[phase] = _abstract_state(context, phase)
        return abstract[phase].arrays()

    try:
        restored = checkpoints.periodic.restore_latest(target_for)
    except NoReadableCheckpoint as error:
        raise RunError(str(error)) from None
    if restored is None:
        return None
    if restored.meta["device_count"] != jax.device_count():
        logging.warning("resuming a run made on %d device(s) on %d: results will differ slightly from an "
                        "uninterrupted run", restored.meta["device_count"], jax.device_count())
    checkpoints.last_saved_step = restored.step
    position = Position(**restored.meta["position"])
    return abstract[position.phase].replace(**restored.state), position


def pretrained_classifier_variables(context: RunContext) -> Variables:
    """The classifier variables of model.pretrained with a new head (from fold_in(init key, HEAD_KEY_FOLD)):
    a training run's `best` classifier (`workdir.pretrained_classifier`), or torchvision weights; the
    workdir's pretrained.json records which (`workdir.write_pretrained_record`)."""
    source, name = context.config.model.pretrained, context.config.model.classifier
    num_classes, head_key = len(context.info.class_names), jax.random.fold_in(context.init_key, HEAD_KEY_FOLD)
    if config_lib.is_run_directory(source):
        loaded = pretrained_classifier(source, name, num_classes, head_key)
    else:
        loaded = load_pretrained(source, name, num_classes, head_key)
    if context.is_main:
        write_pretrained_record(context.workdir, source, name, loaded)
    return loaded


def initial_state(context: RunContext, checkpoints: Checkpoints, phase: int) -> TrainState:
    """The state a phase starts from (phase 2: phase-1 best enhancer and pretrained classifier)."""
    enhancer_from_phase1 = phase == JOINT and context.phase_epochs[PRETRAIN] > 0
    parts = ("classifier",) if enhancer_from_phase1 else PHASE_PARTS[phase]
    variables = init_variables(context.model, parts, context.image_size, context.init_key, context.replicated)
    if enhancer_from_phase1:
        restored = checkpoints.pretrain_best.restore_latest(
            lambda meta: _abstract_state(context, PRETRAIN).variables)
        if restored is None:
            raise RunError(f"phase 1 finished but {checkpoints.pretrain_best.directory} holds no checkpoint")
        for collection, trees in restored.state.items():
            if "enhancer" in trees:
                variables[collection]["enhancer"] = trees["enhancer"]
    if phase == JOINT and context.config.model.pretrained:
        source, name = context.config.model.pretrained, context.config.model.classifier
        variables = with_pretrained_classifier(variables, pretrained_classifier_variables(context), source, name,
                                               context.mesh)
    return new_state(context.model, phase, context.optimizer(phase), variables, context.global_step(phase, 0),
                     context.step_key, context.replicated)


def train_epoch(context: RunContext, state: TrainState, position: Position, train_step: Callable,
                checkpoints: Checkpoints, writer: Any, stop: StopRequest, estimate: bool) -> TrainState:
    """Runs the remaining steps of position's epoch, saving every checkpoint.every_steps steps and when a
    stop is requested (then raising TrainingStopped). `estimate`: print the phase's time estimate."""
    config, phase, epoch = context.config, position.phase, position.epoch
    batch_size, every = config.batch_size, config.checkpoint.every_steps
    segment_start = time.perf_counter()
    step_times: list[float] = []
    bar = tqdm(total=context.steps_per_epoch * batch_size, initial=position.step_in_epoch * batch_size,
               unit="img", leave=False, dynamic_ncols=True,
               desc=f"phase {phase} epoch {epoch + 1}/{context.phase_epochs[phase]}",
               disable=not (context.show_progress and context.is_main))

    def absorb(step_in_epoch: int, metrics: dict[str, jax.Array]) -> None:
        """Reads a finished step's metrics (waiting for it), checks them and adds them to the epoch's sums."""
        values = {key: float(value) for key, value in metrics.items()}
        global_step = context.global_step(phase, epoch, step_in_epoch) + 1
        if not (math.isfinite(values["loss"]) and values["finite"]):
            what = "loss" if not math.isfinite(values["loss"]) else "weights after a finite loss"
            raise RunError(f"non-finite {what} ({values['loss']}) in phase {phase} epoch {epoch + 1} step "
                           f"{step_in_epoch + 1} (global step {global_step}); {checkpoints.left_behind()}")
        position.partial["loss_sum"] += values["loss"]
        position.partial["correct_sum"] += values.get("accuracy", 0.0)
        position.partial["steps"] += 1
        position.step_in_epoch = step_in_epoch + 1
        bar.update(batch_size)
        if estimate and len(step_times) <= ETA_STEPS:
            step_times.append(time.perf_counter())
            if len(step_times) == ETA_STEPS + 1 and context.is_main:
                announce_estimate(context, phase, (step_times[-1] - step_times[0]) / ETA_STEPS)
        if global_step % config.log_every_steps == 0:
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if writer is not None:
                writer.add_scalar(f"phase{phase}/step_loss", values["loss"], global_step)
                writer.add_scalar(f"phase{phase}/learning_rate", values["learning_rate"], global_step)

    batches = data_lib.train_batches(
        context.prepared_dir, batch_size, config.seed, context.data_epoch(phase, epoch),
        start_step=position.step_in_epoch, process_index=jax.process_index(), process_count=jax.process_count(),
        data_config=config.data)
    first = position.step_in_epoch
    pending: tuple[int, dict[str, jax.Array]] | None = None
    for step_in_epoch, host_batch in enumerate(batches, start=first):
        global_step = context.global_step(phase, epoch, step_in_epoch)
        rng = context.fold_in(state.rng, global_step)
        batch = sharding.global_batch({key: host_batch[key] for key in TRAIN_BATCH_KEYS if key in host_batch},
                                      context.mesh)
        state, metrics = train_step(state, batch, rng)
        if pending is not None:  # read the previous step's metrics while this one runs
            absorb(*pending)
        pending = (step_in_epoch, metrics)
        stop_requested = stop.requested(global_step + 1)
        periodic = every and (global_step + 1) % every == 0
        if (stop_requested or periodic) and step_in_epoch + 1 < context.steps_per_epoch:
            absorb(*pending)
            pending = None
            now = time.perf_counter()
            position.partial["seconds"] += now - segment_start
            segment_start = now
            checkpoints.save(context.config, state, position)
            if stop_requested:
                raise stop.stopped(checkpoints.last_saved_step)
    if pending is not None:
        absorb(*pending)
    bar.close()
    if position.step_in_epoch != context.steps_per_epoch:
        raise RunError(f"data.train_batches yielded {position.step_in_epoch - first} batches for phase {phase} "
                       f"epoch {epoch + 1}, expected {context.steps_per_epoch - first}")
    position.partial["seconds"] += time.perf_counter() - segment_start
    return state


def evaluate(context: RunContext, eval_step: Callable, variables: Variables, split: str, position: Position,
             checkpoints: Checkpoints) -> dict[str, float]:
    """`evaluate_split`'s metrics of `split` ('val' or 'test'); RunError when its loss is not finite."""
    metrics = evaluate_split(eval_step, variables, context.prepared_dir, split, context.config.eval_batch_size,
                             context.mesh)
    if not math.isfinite(metrics["loss"]):
        raise RunError(f"non-finite {split} loss ({metrics['loss']}) after phase {position.phase} epoch "
                       f"{position.epoch + 1}; {checkpoints.left_behind()}")
    return metrics


def _selection_metric(context: RunContext, row: dict[str, Any]) -> tuple[str, float]:
    """(its key in `position.best`, the row's value) of the metric that chooses: phase 1 the selection split's
    reconstruction loss, phase 2 its accuracy."""
    split = context.selection_split
    if row["phase"] == PRETRAIN:
        return "pretrain_loss", row[f"{split}_loss"]
    return "accuracy", row[f"{split}_accuracy"]


def improves(context: RunContext, position: Position, row: dict[str, Any]) -> bool:
    """Whether the epoch's row beats every earlier epoch of its phase on the selection split (phase 1: lower
    reconstruction loss; phase 2: higher accuracy). Reads only that split's metrics."""
    key, value = _selection_metric(context, row)
    best = position.best[key]
    return best is None or (value < best if row["phase"] == PRETRAIN else value > best)


def keep_if_best(context: RunContext, state: TrainState, position: Position, checkpoints: Checkpoints,
                 row: dict[str, Any]) -> bool:
    """Saves the epoch's variables (params and batch_stats of the same step) as `pretrain_best` (phase 1:
    lowest MSE) or `best` (phase 2: highest accuracy) when the selection split's metric beats every
    earlier epoch's (`improves`). Returns whether it did."""
    if not improves(context, position, row):
        return False
    split = context.selection_split
    key, value = _selection_metric(context, row)
    if row["phase"] == PRETRAIN:
        store, record = checkpoints.pretrain_best, {f"{split}_loss": value, f"{split}_psnr": row[f"{split}_psnr"]}
    else:
        store, record = checkpoints.best, {f"{split}_accuracy": value, f"{split}_loss": row[f"{split}_loss"]}
    position.best[key] = value
    store.save(row["step"], state.variables, {"epoch": row["epoch"], "selected_on": split, **record})
    return True


def phase1_verdict(context: RunContext, phase1_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{'phase1_psnr': the kept enhancer's PSNR (dB) on the selection split, 'phase1_below_min_psnr'},
    warning in the log when it is below pretrain.min_psnr."""
    split, minimum = context.selection_split, context.config.pretrain.min_psnr
    kept = [row for row in phase1_rows if row["best"]][-1]
    psnr = kept[f"{split}_psnr"]
    if psnr < minimum and context.is_main:
        input_psnr = kept.get(f"{split}_input_psnr")  # absent from rows restored from an older run's checkpoint
        reference = "" if input_psnr is None else f" (the unchanged input: {input_psnr:.2f} dB)"
        tqdm.write(f"warning: phase 1 ends below pretrain.min_psnr: the kept enhancer (epoch {kept['epoch']}) "
                   f"reconstructs the {split} split at {psnr:.2f} dB < {minimum:.1f} dB{reference}, so phase 2 starts "
                   "from an enhancer that does not reproduce its target")
    return {"phase1_psnr": psnr, "phase1_below_min_psnr": psnr < minimum}


def finish_epoch(context: RunContext, state: TrainState, position: Position, eval_step: Callable,
                 checkpoints: Checkpoints) -> dict[str, Any]:
    """Evaluates the epoch's weights on every split of `context.eval_splits` (with
    train.test_every_epoch=False the test split only when the epoch is kept or the last of its phase), keeps
    them if best on the selection split, moves `position` to the next epoch and saves a periodic checkpoint
    there. Returns the epoch's metrics row (its keys: `urnet_jax.workdir`)."""
    phase, epoch, partial = position.phase, position.epoch, position.partial
    eval_start = time.perf_counter()
    row: dict[str, Any] = {
        "phase": phase, "epoch": epoch + 1, "step": int(state.step),
        "train_loss": partial["loss_sum"] / partial["steps"],
        "train_accuracy": partial["correct_sum"] / partial["steps"] if phase == JOINT else None,
    }
    last_epoch = epoch + 1 == context.phase_epochs[phase]
    for split in context.eval_splits:  # the selection split comes first where the test split may be skipped
        if (split == "test" and not context.config.train.test_every_epoch and not last_epoch
                and not improves(context, position, row)):
            continue
        metrics = evaluate(context, eval_step, state.variables, split, position, checkpoints)
        row.update({f"{split}_{key}": value for key, value in metrics.items()})
    row["eval_seconds"] = time.perf_counter() - eval_start
    if phase == PRETRAIN:
        row["saturated_fraction"] = row[f"{context.selection_split}_saturated_fraction"]
    row["selected_on"] = context.selection_split
    row["best"] = keep_if_best(context, state, position, checkpoints, row)
    if phase == PRETRAIN and last_epoch:
        row.update(phase1_verdict(context, [*position.history, row]))
    row["seconds"] = partial["seconds"] + time.perf_counter() - eval_start
    position.history.append(row)
    position.epoch, position.step_in_epoch, position.partial = epoch + 1, 0, empty_partial()
    checkpoints.save(context.config, state, position)
    return row


def prepare_data(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 show_summary: bool = True) -> pathlib.Path:
    """Runs `data.prepare` (idempotent) for the run in `workdir` and returns the prepared folder."""
    out_dir = prepared_dir_of(config, workdir)
    if sharding.is_main_process():
        summary = data_lib.prepare(config.data, out_dir)
        if show_summary:
            print(summary.format())
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("urnet_jax.prepare")
        if not sharding.is_main_process():
            data_lib.prepare(config.data, out_dir)  # reuses a shared folder, or builds this host's copy
    return out_dir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       show_progress: bool = True) -> list[dict[str, Any]]:
    """Trains (or resumes) the run of `config` in `workdir`; returns the metrics rows of every epoch.

    `config` must have passed `config.validate`. Raises ConfigError/DataError for bad inputs (including a
    workdir holding a run of another configuration), RunError when the run fails (non-finite loss) and
    TrainingStopped after a checkpoint when SIGINT/SIGTERM arrives.
    """
    workdir = pathlib.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = config_lib.resolve_config(config)
    check_workdir_config(config, workdir)
    prepare_data(config, workdir)
    context = make_context(config, workdir, show_progress)
    checkpoints = Checkpoints.open(workdir, config.checkpoint.keep)
    writer = None
    try:
        state, position = restore(context, checkpoints) or (None, None)
        writer = open_outputs(context, position, checkpoints.last_saved_step)
        if context.is_main:
            print_start(context, position, checkpoints.last_saved_step)
        with stop_on_signals(announce=context.is_main) as stop:
            for phase in (PRETRAIN, JOINT):
                if context.phase_epochs[phase] == 0 or (position is not None and position.phase > phase):
                    continue
                if position is None or position.phase < phase:
                    position = Position(phase) if position is None else dataclasses.replace(
                        position, phase=phase, epoch=0, step_in_epoch=0, partial=empty_partial())
                    state = initial_state(context, checkpoints, phase)
                phase1_loss = (reconstruction_loss.from_config(context.config.pretrain, context.mesh)
                               if phase == PRETRAIN else ())
                train_step = make_train_step(phase, context.mesh, *phase1_loss)
                eval_step = make_eval_step(context.model, phase, context.mesh)
                first_epoch = position.epoch
                while position.epoch < context.phase_epochs[phase]:
                    state = train_epoch(context, state, position, train_step, checkpoints, writer, stop,
                                        estimate=position.epoch == first_epoch)
                    record_epoch(context, writer, finish_epoch(context, state, position, eval_step, checkpoints))
                    if stop.signal_number is not None and not position.is_complete(context.phase_epochs):
                        raise stop.stopped(checkpoints.last_saved_step)
        return position.history if position else []
    finally:
        checkpoints.close()
        if writer is not None:
            writer.close()
