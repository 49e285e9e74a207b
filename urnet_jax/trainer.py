"""UR-Net's two-phase training loop: `train_and_evaluate(config, workdir)`.

Phase 1 (`config.pretrain.epochs`, skipped without an enhancer): the enhancer alone learns identity
reconstruction; after each epoch the test split's reconstruction MSE is measured and the lowest-loss
weights are kept in `checkpoints/pretrain_best`. Phase 2 (`config.train.epochs`): enhancer (from the
phase-1 best, else freshly initialised) + classifier (from `config.model.pretrained` with a new head, else
freshly initialised) trained jointly; the test split is evaluated after each epoch and the
highest-accuracy weights are kept in `checkpoints/best`. The workdir's layout: `urnet_jax.workdir`.

The run is a deterministic function of (config, position): batch k of epoch e comes from
`data.train_batches(seed, epoch, start_step=k)` and step g's random key is `fold_in(step key, g)`. A
periodic checkpoint stores the state with its position (phase, epoch, step in epoch), the running sums of
the current epoch, the best metrics so far and the metrics history, so a resumed run finishes with the
same weights and metrics as an uninterrupted one (on the same devices). SIGINT or SIGTERM saves a
checkpoint after the current step and stops the run (`urnet_jax.preemption`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

import urnet_jax.data as data_lib
from urnet_jax import config as config_lib, sharding
from urnet_jax.errors import NoReadableCheckpoint, RunError
from urnet_jax.preemption import StopRequest, stop_on_signals
from urnet_jax.steps import JOINT, PRETRAIN, compute_dtype, evaluate_split, make_eval_step, make_train_step
from urnet_jax.train_state import (PHASE_PARTS, TrainState, Variables, abstract_state, build, init_keys,
                                   init_variables, make_optimizer, new_state, with_pretrained_classifier)
from urnet_jax.workdir import Checkpoints, Position, check_workdir_config, empty_partial, prepared_dir_of

# Steps timed (after the first, which compiles) in the first epoch a process runs of a phase, before the
# phase's time estimate is printed (not at all when that epoch has fewer steps left).
ETA_STEPS = 5


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a run fixes before its first step."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    prepared_dir: pathlib.Path
    info: data_lib.PreparedInfo
    mesh: jax.sharding.Mesh
    model: Any
    steps_per_epoch: int
    phase_epochs: dict[int, int]  # phase -> epochs (0: the phase is skipped)
    init_key: np.ndarray
    step_key: np.ndarray  # what every step's key is folded from (TrainState.rng)
    fold_in: Callable[[jax.Array, int], jax.Array]  # jitted jax.random.fold_in, replicated output
    show_progress: bool
    is_main: bool  # whether this process writes outputs

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return sharding.replicated(self.mesh)

    @property
    def image_size(self) -> int:
        return int(self.info.image_size)

    def optimizer(self, phase: int) -> Any:
        return make_optimizer(self.config.optimizer, self.phase_epochs[phase] * self.steps_per_epoch)

    def data_epoch(self, phase: int, epoch: int) -> int:
        """The data pipeline's epoch index: epochs are counted over both phases."""
        return (self.phase_epochs[PRETRAIN] if phase == JOINT else 0) + epoch

    def global_step(self, phase: int, epoch: int, step_in_epoch: int = 0) -> int:
        return self.data_epoch(phase, epoch) * self.steps_per_epoch + step_in_epoch


def make_context(config: ml_collections.ConfigDict, workdir: pathlib.Path, show_progress: bool) -> RunContext:
    prepared_dir = prepared_dir_of(config, workdir)
    info = data_lib.load_info(prepared_dir)
    has_phase1 = config.model.enhancer != "none" and config.pretrain.epochs > 0
    init_key, step_key = init_keys(config.seed)
    mesh = sharding.data_mesh()
    return RunContext(
        config=config, workdir=workdir, prepared_dir=prepared_dir, info=info, mesh=mesh,
        model=build(config, len(info.class_names), compute_dtype(config.precision)),
        steps_per_epoch=data_lib.steps_per_epoch(prepared_dir, config.batch_size),
        phase_epochs={PRETRAIN: config.pretrain.epochs if has_phase1 else 0, JOINT: config.train.epochs},
        init_key=init_key, step_key=step_key, fold_in=jax.jit(jax.random.fold_in, out_shardings=sharding.replicated(mesh)),
        show_progress=show_progress, is_main=sharding.is_main_process())


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
        variables = with_pretrained_classifier(variables, context.config.model.pretrained,
                                               context.config.model.classifier, len(context.info.class_names),
                                               context.init_key, context.mesh)
    return new_state(context.model, phase, context.optimizer(phase), variables, context.global_step(phase, 0),
                     context.step_key, context.replicated)


def format_duration(seconds: float) -> str:
    """'42 s', '12 min', '3.5 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def announce_estimate(context: RunContext, phase: int, seconds_per_step: float) -> None:
    """Prints the estimated time of one epoch and of the whole phase (training steps only)."""
    epochs, per_epoch = context.phase_epochs[phase], seconds_per_step * context.steps_per_epoch
    tqdm.write(f"phase {phase}: {seconds_per_step:.3g} s/step, about {format_duration(per_epoch)} per epoch, "
               f"{format_duration(per_epoch * epochs)} for its {epochs} epoch(s) (without evaluation)")


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
        start_step=position.step_in_epoch, process_index=jax.process_index(), process_count=jax.process_count())
    first = position.step_in_epoch
    pending: tuple[int, dict[str, jax.Array]] | None = None
    for step_in_epoch, host_batch in enumerate(batches, start=first):
        global_step = context.global_step(phase, epoch, step_in_epoch)
        rng = context.fold_in(state.rng, global_step)
        batch = sharding.global_batch({"image": host_batch["image"], "label": host_batch["label"]}, context.mesh)
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


def evaluate(context: RunContext, eval_step: Callable, variables: Variables, position: Position,
             checkpoints: Checkpoints) -> dict[str, float | None]:
    """Mean test loss (phase 1: reconstruction MSE) and, in phase 2, test accuracy."""
    loss, accuracy = evaluate_split(eval_step, variables, context.prepared_dir, "test",
                                    context.config.eval_batch_size, context.mesh)
    if not math.isfinite(loss):
        raise RunError(f"non-finite test loss ({loss}) after phase {position.phase} epoch {position.epoch + 1}; "
                       f"{checkpoints.left_behind()}")
    return {"test_loss": loss, "test_accuracy": accuracy if position.phase == JOINT else None}


def finish_epoch(context: RunContext, state: TrainState, position: Position, eval_step: Callable,
                 checkpoints: Checkpoints) -> dict[str, Any]:
    """Evaluates the epoch's weights, keeps them if best, moves `position` to the next epoch and saves a
    periodic checkpoint there. Returns the epoch's metrics row."""
    phase, epoch, partial = position.phase, position.epoch, position.partial
    eval_start = time.perf_counter()
    test = evaluate(context, eval_step, state.variables, position, checkpoints)
    row = {
        "phase": phase, "epoch": epoch + 1, "step": int(state.step),
        "train_loss": partial["loss_sum"] / partial["steps"],
        "train_accuracy": partial["correct_sum"] / partial["steps"] if phase == JOINT else None,
        "test_loss": test["test_loss"], "test_accuracy": test["test_accuracy"],
        "seconds": partial["seconds"] + time.perf_counter() - eval_start,
    }
    if phase == PRETRAIN:
        best = position.best["pretrain_test_loss"]
        row["best"] = best is None or row["test_loss"] < best
        if row["best"]:
            position.best["pretrain_test_loss"] = row["test_loss"]
            checkpoints.pretrain_best.save(row["step"], state.variables,
                                           {"epoch": epoch + 1, "test_loss": row["test_loss"]})
    else:
        best = position.best["test_accuracy"]
        row["best"] = best is None or row["test_accuracy"] > best
        if row["best"]:
            position.best["test_accuracy"] = row["test_accuracy"]
            checkpoints.best.save(row["step"], state.variables, {
                "epoch": epoch + 1, "test_accuracy": row["test_accuracy"], "test_loss": row["test_loss"]})
    position.history.append(row)
    position.epoch, position.step_in_epoch, position.partial = epoch + 1, 0, empty_partial()
    checkpoints.save(context.config, state, position)
    return row


def open_outputs(context: RunContext, position: Position | None, resume_step: int | None) -> Any:
    """Writes config.json and metrics.jsonl (the restored history) and opens the TensorBoard writer
    (dropping events after `resume_step`). Returns the writer; None on processes other than the first."""
    if not context.is_main:
        return None
    workdir = context.workdir
    (workdir / "config.json").write_text(json.dumps(context.config.to_dict(), indent=2, sort_keys=True) + "\n")
    rows = position.history if position else []
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    from tensorboardX import SummaryWriter  # deferred: only process 0 writes events

    return SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step)


def record_epoch(context: RunContext, writer: Any, row: dict[str, Any]) -> None:
    """Appends an epoch's row to metrics.jsonl and TensorBoard, and prints it."""
    if not context.is_main:
        return
    with open(context.workdir / "metrics.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")
    for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
        if row[key] is not None:
            writer.add_scalar(f"phase{row['phase']}/{key}", row[key], row["step"])
    writer.flush()
    accuracy = (f" train_accuracy {row['train_accuracy']:.4f} test_accuracy {row['test_accuracy']:.4f}"
                if row["phase"] == JOINT else "")
    tqdm.write(f"phase {row['phase']} epoch {row['epoch']}/{context.phase_epochs[row['phase']]}: "
               f"train_loss {row['train_loss']:.4f} test_loss {row['test_loss']:.4f}{accuracy} "
               f"({row['seconds']:.1f} s{', best' if row['best'] else ''})")


def print_start(context: RunContext, position: Position | None, saved_step: int | None) -> None:
    """The run's first lines: model, data and devices, and whether it resumes or is already complete."""
    split, config = context.info.num_examples, context.config
    print(f"training {config.model.enhancer} + {config.model.classifier} on {split['train']} train / "
          f"{split['test']} test images ({len(context.info.class_names)} classes, {context.image_size} px), "
          f"{jax.device_count()} device(s), batch {config.batch_size}, {context.steps_per_epoch} steps/epoch")
    if position is not None and position.is_complete(context.phase_epochs):
        print(f"the run in {context.workdir} is complete (checkpoint step {saved_step})")
    elif position is not None:
        print(f"resuming from checkpoint step {saved_step} (phase {position.phase}, epoch "
              f"{position.epoch + 1}, step {position.step_in_epoch})")


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
                train_step = make_train_step(phase, context.mesh)
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
