"""UR-Net's two-phase training: a sharded jit step, orbax checkpoints, and exact resume.

Phase 1 (`config.pretrain.epochs`, skipped without an enhancer): the enhancer alone learns identity
reconstruction (pixel MSE between `enhance(x)` and `x`); after each epoch the test split's reconstruction
MSE is measured and the lowest-loss weights are kept in `checkpoints/pretrain_best`. Phase 2
(`config.train.epochs`): enhancer (from the phase-1 best, else freshly initialised) + classifier (from
`config.model.pretrained` with a new head, else freshly initialised) trained jointly with softmax
cross-entropy; the test split is evaluated after each epoch and the highest-accuracy weights are kept in
`checkpoints/best`.

The run is a deterministic function of (config, position): batch k of epoch e comes from
`data.train_batches(seed, epoch, start_step=k)` and step g's random key is `fold_in(key(seed), g)`. A
periodic checkpoint stores the state with its position (phase, epoch, step in epoch), the running sums of
the current epoch, the best metrics so far and the metrics history, so a resumed run finishes with the
same weights and metrics as an uninterrupted one (on the same devices). SIGINT or SIGTERM saves a checkpoint
after the current step and stops the run (`stop_on_signals`).

Workdir layout:
    config.json            the resolved configuration (paths made absolute)
    metrics.jsonl          one JSON object per finished epoch: phase, epoch (1-based, within the phase),
                           step (global), train_loss, train_accuracy, test_loss, test_accuracy (null in
                           phase 1), seconds, best (whether this epoch's weights were kept as the best);
                           rewritten from the checkpoint on resume, so it never repeats an epoch
    tensorboard/           tensorboardX event files (per-epoch metrics, the step loss every log_every_steps)
    checkpoints/periodic/  rotating resume points (every checkpoint.every_steps steps and each epoch end;
                           the newest checkpoint.keep are kept)
    checkpoints/best/      phase 2's highest-test-accuracy weights {'params', 'batch_stats'}
    checkpoints/pretrain_best/  phase 1's lowest-test-loss enhancer weights
    checkpoints/corrupt/   unreadable checkpoints moved aside on resume (never deleted)
    data/                  the prepared data set (unless config.data.prepared_dir is set)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

import urnet_jax.data as data_lib
from urnet_jax import config as config_lib, sharding
from urnet_jax.checkpointing import CheckpointStore, NoReadableCheckpoint
from urnet_jax.cli import ConfigError, RunError, TrainingStopped

PRETRAIN, JOINT = 1, 2  # the two phases
# Keys that may change between a run and its resumption (they do not alter the computation so far).
RESUMABLE_KEYS = frozenset({"train.epochs", "checkpoint.every_steps", "checkpoint.keep", "log_every_steps",
                            "data.prepared_dir"})
CHECKPOINT_NAMES = ("best", "latest")

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Variables = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    """Everything a training step updates; replicated on every device.

    step: int32 scalar, optimizer steps taken so far over both phases (the global step).
    params, batch_stats: the model's variable collections (phase 1: the enhancer's only).
    opt_state: the optax state of `params`.
    rng: uint32 (2,), the key that every step's key is folded from.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
                "opt_state": self.opt_state, "rng": self.rng}


# ----------------------------------------------------------------------------------------------------
# Pure pieces: optimizer, losses, steps.


def learning_rate(optimizer_config: ml_collections.ConfigDict, phase_steps: int) -> float | optax.Schedule:
    """The learning rate over one phase of `phase_steps` optimizer steps (counted from 0 in each phase):
    optimizer.lr, after a linear rise from 0 over optimizer.warmup_steps; with schedule 'cosine' it then
    decays to 0 at the phase's last step along a half cosine. A plain float when it is constant, so that the
    optimizer state holds no step count."""
    lr, warmup = float(optimizer_config.lr), int(optimizer_config.warmup_steps)
    if optimizer_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(phase_steps, warmup + 1), end_value=0.0)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return lr


def make_optimizer(optimizer_config: ml_collections.ConfigDict, phase_steps: int) -> optax.GradientTransformation:
    """SGD with momentum (torch.optim.SGD semantics, weight decay added to the gradient) or AdamW, at
    `learning_rate(optimizer_config, phase_steps)`. The optimizer state's structure does not depend on
    `phase_steps`."""
    lr = learning_rate(optimizer_config, phase_steps)
    if optimizer_config.name == "adamw":
        return optax.adamw(lr, weight_decay=optimizer_config.weight_decay)
    sgd = optax.sgd(lr, momentum=optimizer_config.momentum or None)
    if optimizer_config.weight_decay:
        return optax.chain(optax.add_decayed_weights(optimizer_config.weight_decay), sgd)
    return sgd


def compute_dtype(precision: str) -> jnp.dtype | None:
    """The model's computation dtype for config.precision (parameters always stay float32)."""
    return jnp.bfloat16 if precision == "bfloat16" else None


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 (N, H, W, 3) -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _forward(model: nn.Module, phase: int, variables: Variables, images: jax.Array, train: bool,
             rng: jax.Array | None = None) -> tuple[jax.Array, Variables]:
    """Phase 1: the enhanced image (N, H, W, 3); phase 2: the logits (N, classes). Both float32."""
    kwargs: dict[str, Any] = {"method": "enhance"} if phase == PRETRAIN else {}
    if train:
        output, updates = model.apply(variables, to_unit_range(images), train=True, mutable=["batch_stats"],
                                      rngs={"dropout": rng}, **kwargs)
    else:
        output, updates = model.apply(variables, to_unit_range(images), train=False, **kwargs), {}
    return output.astype(jnp.float32), updates


def _per_example_loss(phase: int, output: jax.Array, batch: Batch) -> jax.Array:
    """Phase 1: pixel MSE against the input image; phase 2: softmax cross-entropy. Shape (N,), float32."""
    if phase == PRETRAIN:
        return jnp.mean(jnp.square(output - to_unit_range(batch["image"])), axis=(1, 2, 3))
    return optax.softmax_cross_entropy_with_integer_labels(output, batch["label"])


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, phase: int,
                    mesh: jax.sharding.Mesh) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The jit-compiled step (state, batch, rng) -> (new state, metrics); `state` is donated.

    batch: {'image': uint8 (B, H, W, 3), 'label': int32 (B,)} sharded along 'data'; the state is
    replicated, so losses and BatchNorm statistics are over the global batch. metrics (replicated
    scalars): 'loss' (mean over the batch), 'accuracy' (phase 2 only; fraction), 'finite' (the loss and
    every new parameter are finite).
    """

    def step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Variables]]:
            variables = {"params": params, "batch_stats": state.batch_stats}
            output, updates = _forward(model, phase, variables, batch["image"], True, rng)
            return jnp.mean(_per_example_loss(phase, output, batch)), (output, updates)

        (loss, (output, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, param_updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  batch_stats=updates.get("batch_stats", state.batch_stats))
        metrics = {"loss": loss, "finite": jnp.isfinite(loss) & _all_finite(params)}
        if phase == JOINT:
            metrics["accuracy"] = jnp.mean((jnp.argmax(output, axis=-1) == batch["label"]).astype(jnp.float32))
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    return jax.jit(step, in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(model: nn.Module, phase: int,
                   mesh: jax.sharding.Mesh) -> Callable[[Variables, Batch], Metrics]:
    """The jit-compiled evaluation (variables, batch) -> sums over the batch's real (mask=True) rows.

    batch: {'image', 'label', 'mask' (bool (B,))} sharded along 'data'. Returns replicated float32
    scalars 'loss_sum' (phase 1: per-image MSE; phase 2: cross-entropy), 'correct' (phase 2), 'count'.
    """

    def evaluate(variables: Variables, batch: Batch) -> Metrics:
        output, _ = _forward(model, phase, variables, batch["image"], False)
        mask = batch["mask"].astype(jnp.float32)
        sums = {"loss_sum": jnp.sum(_per_example_loss(phase, output, batch) * mask), "count": jnp.sum(mask)}
        if phase == JOINT:
            sums["correct"] = jnp.sum((jnp.argmax(output, axis=-1) == batch["label"]) * mask)
        return sums

    replicated = sharding.replicated(mesh)
    return jax.jit(evaluate, in_shardings=(replicated, sharding.batch_sharded(mesh)), out_shardings=replicated)


def evaluate_split(eval_step: Callable[[Variables, Batch], Metrics], variables: Variables,
                   prepared_dir: str | pathlib.Path, split: str, batch_size: int,
                   mesh: jax.sharding.Mesh) -> tuple[float, float]:
    """(mean loss, accuracy) of `make_eval_step`'s function over every example of a prepared split.

    In phase 1 the loss is the per-image reconstruction MSE and the accuracy is meaningless (0).
    """
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for host_batch in data_lib.eval_batches(prepared_dir, split, batch_size, process_index=jax.process_index(),
                                            process_count=jax.process_count()):
        batch = sharding.global_batch({key: host_batch[key] for key in ("image", "label", "mask")}, mesh)
        for key, value in eval_step(variables, batch).items():
            totals[key] += float(value)
    if totals["count"] == 0:
        raise RunError(f"the {split} split of {prepared_dir} is empty")
    return totals["loss_sum"] / totals["count"], totals["correct"] / totals["count"]


# ----------------------------------------------------------------------------------------------------
# Configuration helpers.


def config_differences(saved: dict[str, Any], current: ml_collections.ConfigDict) -> list[str]:
    """'key: saved != current' for every key in which a run's saved config differs from `current`, apart
    from those that may change on resumption: RESUMABLE_KEYS, less train.epochs under a decaying schedule
    (the epochs set the learning rate of every step)."""
    resumable = RESUMABLE_KEYS if current.optimizer.schedule == "constant" else RESUMABLE_KEYS - {"train.epochs"}
    return config_lib.config_differences(saved, current.to_dict(), ignored=resumable)


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with file paths made absolute (data.dir, data.prepared_dir, model.pretrained)."""
    resolved = ml_collections.ConfigDict(config.to_dict())
    for section, key in (("data", "dir"), ("data", "prepared_dir"), ("model", "pretrained")):
        if resolved[section][key]:
            resolved[section][key] = str(pathlib.Path(resolved[section][key]).expanduser().resolve())
    return resolved


def prepared_dir_of(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """Where the prepared data set lives: config.data.prepared_dir, else <workdir>/data."""
    return pathlib.Path(config.data.prepared_dir) if config.data.prepared_dir else pathlib.Path(workdir) / "data"


def build(config: ml_collections.ConfigDict, num_classes: int, dtype: Any = None) -> nn.Module:
    """The EnhanceClassify model of config.model."""
    from urnet_jax.models.composite import build_model  # deferred: the composite imports every model

    return build_model(config.model, num_classes, dtype)


# ----------------------------------------------------------------------------------------------------
# State construction.


def _init_keys(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(initialisation key, the key that step keys are folded from) for `seed`, as host arrays.

    Host copies: a device key placed in a TrainState would be donated (deleted) by the first step.
    """
    init_key, step_key = np.asarray(jax.random.split(jax.random.PRNGKey(seed)))
    return init_key, step_key


PARTS = ("enhancer", "classifier")  # EnhanceClassify's submodules; index = the part's init-key fold
PHASE_PARTS = {PRETRAIN: ("enhancer",), JOINT: PARTS}  # what each phase trains
_HEAD_KEY_FOLD = len(PARTS)  # init-key fold for a pretrained classifier's new head


def _init_parts(model: nn.Module, parts: tuple[str, ...], image_size: int, key: jax.Array) -> Variables:
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables: Variables = {"params": {}, "batch_stats": {}}
    for name in parts:
        module = getattr(model, name)
        if module is None:
            continue
        part_key = jax.random.fold_in(key, PARTS.index(name))
        part = module.init({"params": part_key, "dropout": part_key}, dummy, train=False)
        for collection in variables:
            if part.get(collection):
                variables[collection][name] = part[collection]
    return variables


def init_variables(model: nn.Module, parts: tuple[str, ...], image_size: int, key: jax.Array,
                   out_sharding: jax.sharding.Sharding | None = None) -> Variables:
    """Fresh {'params', 'batch_stats'} of the named parts of an EnhanceClassify, each part initialised on
    its own with fold_in(key, index in PARTS) (so the enhancer starts from the same weights whichever
    phase initialises it). A missing enhancer and empty collections are left out, as `model.init` does.

    Compiled without optimisation: XLA's CPU backend otherwise spends most of a small run's compile time
    on the initialisers' random-number code, and this runs once.
    """
    init = jax.jit(functools.partial(_init_parts, model, parts, image_size), out_shardings=out_sharding)
    return init.lower(key).compile(compiler_options={"xla_backend_optimization_level": 0})(key)


def abstract_variables(model: nn.Module, parts: tuple[str, ...], image_size: int) -> Variables:
    """The shapes and dtypes of `init_variables` (nothing computed)."""
    return jax.eval_shape(functools.partial(_init_parts, model, parts, image_size), jax.random.PRNGKey(0))


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, phase: int, image_size: int,
                   out_sharding: jax.sharding.Sharding) -> TrainState:
    """ShapeDtypeStructs (carrying `out_sharding`) of a phase's TrainState: a restore target."""
    variables = abstract_variables(model, PHASE_PARTS[phase], image_size)
    abstract = jax.eval_shape(functools.partial(_new_state, optimizer), variables, 0, jax.random.PRNGKey(0))
    return sharding.with_sharding(abstract, out_sharding)


def _new_state(optimizer: optax.GradientTransformation, variables: Variables, step: int | jax.Array,
               step_key: jax.Array) -> TrainState:
    return TrainState(step=jnp.asarray(step, jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=optimizer.init(variables["params"]),
                      rng=step_key)


def _describe_mismatch(expected: Any, got: Any) -> str | None:
    """None when two variable trees have the same keys and shapes, else the first difference."""
    expected_flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    got_flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(got)}
    for key in sorted(expected_flat.keys() | got_flat.keys()):
        if key not in got_flat:
            return f"missing {key}"
        if key not in expected_flat:
            return f"unexpected {key}"
        if tuple(expected_flat[key].shape) != tuple(np.shape(got_flat[key])):
            return f"{key} has shape {tuple(np.shape(got_flat[key]))}, expected {tuple(expected_flat[key].shape)}"
    return None


# ----------------------------------------------------------------------------------------------------
# The loop.


def _empty_partial() -> dict[str, float]:
    return {"loss_sum": 0.0, "correct_sum": 0.0, "steps": 0, "seconds": 0.0}


@dataclasses.dataclass
class Position:
    """Where a run stands: the next step to take is `step_in_epoch` of `epoch` (0-based) of `phase`.

    `partial` holds the running sums of that epoch (loss_sum, correct_sum, steps, seconds), `best` the
    best test metrics so far, `history` the finished epochs' metrics rows.
    """

    phase: int
    epoch: int = 0
    step_in_epoch: int = 0
    partial: dict[str, float] = dataclasses.field(default_factory=_empty_partial)
    best: dict[str, float | None] = dataclasses.field(
        default_factory=lambda: {"pretrain_test_loss": None, "test_accuracy": None})
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class _Trainer:
    """One training run in `workdir`; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, show_progress: bool):
        self.config = config
        self.workdir = workdir
        self.show_progress = show_progress
        self.is_main = sharding.is_main_process()
        self.prepared_dir = prepared_dir_of(config, workdir)
        self.info = data_lib.load_info(self.prepared_dir)
        self.num_classes = len(self.info.class_names)
        self.image_size = int(self.info.image_size)
        self.mesh = sharding.data_mesh()
        self.model = build(config, self.num_classes, compute_dtype(config.precision))
        self.steps_per_epoch = data_lib.steps_per_epoch(self.prepared_dir, config.batch_size)
        has_phase1 = config.model.enhancer != "none" and config.pretrain.epochs > 0
        self.phase_epochs = {PRETRAIN: config.pretrain.epochs if has_phase1 else 0, JOINT: config.train.epochs}
        self.optimizers = {phase: make_optimizer(config.optimizer, epochs * self.steps_per_epoch)
                           for phase, epochs in self.phase_epochs.items()}
        self.init_key, self.step_key = _init_keys(config.seed)
        checkpoints = workdir / "checkpoints"
        self.periodic = CheckpointStore(checkpoints / "periodic", max_to_keep=config.checkpoint.keep)
        self.best = CheckpointStore(checkpoints / "best", max_to_keep=1)
        self.pretrain_best = CheckpointStore(checkpoints / "pretrain_best", max_to_keep=1)
        self.replicated = sharding.replicated(self.mesh)
        self._steps: dict[int, Callable] = {}
        self._evals: dict[int, Callable] = {}
        self._step_rng = jax.jit(jax.random.fold_in, out_shardings=self.replicated)
        self.last_saved_step: int | None = None
        self.stop_signal: int | None = None  # set by `stop_on_signals`
        self.writer = None

    # -- global step and data epoch bookkeeping --------------------------------------------------------
    def global_step(self, phase: int, epoch: int, step_in_epoch: int) -> int:
        offset = self.phase_epochs[PRETRAIN] if phase == JOINT else 0
        return (offset + epoch) * self.steps_per_epoch + step_in_epoch

    def learning_rate_at(self, phase: int, epoch: int, step_in_epoch: int) -> float:
        """The learning rate that the step at (phase, epoch, step in epoch) applies."""
        rate = learning_rate(self.config.optimizer, self.phase_epochs[phase] * self.steps_per_epoch)
        return rate if isinstance(rate, float) else float(rate(epoch * self.steps_per_epoch + step_in_epoch))

    def data_epoch(self, phase: int, epoch: int) -> int:
        return (self.phase_epochs[PRETRAIN] if phase == JOINT else 0) + epoch

    # -- states ----------------------------------------------------------------------------------------
    def _abstract_state(self, phase: int) -> TrainState:
        return abstract_state(self.model, self.optimizers[phase], phase, self.image_size, self.replicated)

    def _initial_state(self, phase: int) -> TrainState:
        """The state a phase starts from (phase 2: phase-1 best enhancer and pretrained classifier)."""
        enhancer_from_phase1 = phase == JOINT and self.phase_epochs[PRETRAIN] > 0
        parts = ("classifier",) if enhancer_from_phase1 else PHASE_PARTS[phase]
        variables = init_variables(self.model, parts, self.image_size, self.init_key, self.replicated)
        if enhancer_from_phase1:
            restored = self.pretrain_best.restore_latest(lambda meta: self._abstract_state(PRETRAIN).variables)
            if restored is None:
                raise RunError(f"phase 1 finished but {self.pretrain_best.directory} holds no checkpoint")
            for collection, trees in restored.state.items():
                if "enhancer" in trees:
                    variables[collection]["enhancer"] = trees["enhancer"]
        if phase == JOINT and self.config.model.pretrained:
            variables = self._with_pretrained_classifier(variables)
        # One program: eagerly, optimizer.init compiles a program per parameter shape.
        new_state = jax.jit(functools.partial(_new_state, self.optimizers[phase]), out_shardings=self.replicated)
        return new_state(variables, self.global_step(phase, 0, 0), self.step_key)

    def _with_pretrained_classifier(self, variables: Variables) -> Variables:
        from urnet_jax.port import load_pretrained  # deferred: needs torch only when used

        path = self.config.model.pretrained
        loaded = load_pretrained(path, self.config.model.classifier, self.num_classes,
                                 jax.random.fold_in(self.init_key, _HEAD_KEY_FOLD))
        expected = {name: variables[name]["classifier"] for name in ("params", "batch_stats")}
        got = {name: loaded.get(name, {}) for name in ("params", "batch_stats")}
        mismatch = _describe_mismatch(expected, got)
        if mismatch:
            raise ConfigError(f"model.pretrained {path} does not fit {self.config.model.classifier}: {mismatch}")
        for name in ("params", "batch_stats"):
            variables[name]["classifier"] = sharding.replicate(
                jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), got[name]), self.mesh)
        return variables

    def _train_step(self, phase: int) -> Callable:
        if phase not in self._steps:
            self._steps[phase] = make_train_step(self.model, self.optimizers[phase], phase, self.mesh)
        return self._steps[phase]

    def _eval_step(self, phase: int) -> Callable:
        if phase not in self._evals:
            self._evals[phase] = make_eval_step(self.model, phase, self.mesh)
        return self._evals[phase]

    # -- checkpoints ----------------------------------------------------------------------------------
    def _restore(self) -> tuple[TrainState, Position] | None:
        def target_for(meta: dict[str, Any]) -> dict[str, Any]:
            return self._abstract_state(meta["position"]["phase"]).to_dict()

        try:
            restored = self.periodic.restore_latest(target_for)
        except NoReadableCheckpoint as error:
            raise RunError(str(error)) from None
        if restored is None:
            return None
        if restored.meta["device_count"] != jax.device_count():
            logging.warning("resuming a run made on %d device(s) on %d: results will differ slightly from an "
                            "uninterrupted run", restored.meta["device_count"], jax.device_count())
        self.last_saved_step = restored.step
        return TrainState(**restored.state), Position(**restored.meta["position"])

    def _save(self, state: TrainState, position: Position) -> None:
        step = int(state.step)
        meta = {"position": dataclasses.asdict(position), "config": self.config.to_dict(),
                "device_count": jax.device_count()}
        self.periodic.save(step, state.to_dict(), meta)
        self.last_saved_step = step

    # -- outputs --------------------------------------------------------------------------------------
    def _write_outputs_on_start(self, position: Position | None) -> None:
        if not self.is_main:
            return
        (self.workdir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        rows = position.history if position else []
        (self.workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        from tensorboardX import SummaryWriter  # deferred: only process 0 writes events

        resume_step = self.last_saved_step if position else None
        self.writer = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=resume_step)

    def _record_epoch(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.workdir / "metrics.jsonl", "a") as file:
            file.write(json.dumps(row) + "\n")
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            if row[key] is not None:
                self.writer.add_scalar(f"phase{row['phase']}/{key}", row[key], row["step"])
        self.writer.flush()
        accuracy = (f" train_accuracy {row['train_accuracy']:.4f} test_accuracy {row['test_accuracy']:.4f}"
                    if row["phase"] == JOINT else "")
        tqdm.write(f"phase {row['phase']} epoch {row['epoch']}/{self.phase_epochs[row['phase']]}: "
                   f"train_loss {row['train_loss']:.4f} test_loss {row['test_loss']:.4f}{accuracy} "
                   f"({row['seconds']:.1f} s{', best' if row['best'] else ''})")

    # -- epochs ---------------------------------------------------------------------------------------
    def _check_finite(self, metrics: dict[str, Any], phase: int, epoch: int, step_in_epoch: int) -> None:
        if not (math.isfinite(metrics["loss"]) and metrics["finite"]):
            what = "loss" if not math.isfinite(metrics["loss"]) else "weights after a finite loss"
            raise RunError(f"non-finite {what} ({metrics['loss']}) in phase {phase} epoch {epoch + 1} step "
                           f"{step_in_epoch + 1} (global step {self.global_step(phase, epoch, step_in_epoch) + 1}); "
                           f"{self._checkpoints_left()}")

    def _checkpoints_left(self) -> str:
        """What a stopped run leaves behind, for its error message."""
        if self.last_saved_step is None:
            return "no checkpoint was written"
        return f"the last checkpoint (step {self.last_saved_step}) is intact"

    def _train_epoch(self, state: TrainState, position: Position) -> TrainState:
        """Runs the remaining steps of position's epoch, saving every checkpoint.every_steps steps."""
        phase, epoch = position.phase, position.epoch
        train_step = self._train_step(phase)
        batch_size, every = self.config.batch_size, self.config.checkpoint.every_steps
        segment_start = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch * batch_size, initial=position.step_in_epoch * batch_size,
                   unit="img", leave=False, dynamic_ncols=True,
                   desc=f"phase {phase} epoch {epoch + 1}/{self.phase_epochs[phase]}",
                   disable=not (self.show_progress and self.is_main))
        pending: tuple[int, Metrics] | None = None

        def absorb(step_in_epoch: int, metrics: Metrics) -> None:
            values = {key: float(value) for key, value in metrics.items()}
            self._check_finite(values, phase, epoch, step_in_epoch)
            position.partial["loss_sum"] += values["loss"]
            position.partial["correct_sum"] += values.get("accuracy", 0.0)
            position.partial["steps"] += 1
            position.step_in_epoch = step_in_epoch + 1
            bar.update(batch_size)
            global_step = self.global_step(phase, epoch, step_in_epoch) + 1
            if global_step % self.config.log_every_steps == 0:
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                if self.writer is not None:
                    self.writer.add_scalar(f"phase{phase}/step_loss", values["loss"], global_step)
                    self.writer.add_scalar(f"phase{phase}/learning_rate",
                                           self.learning_rate_at(phase, epoch, step_in_epoch), global_step)

        batches = data_lib.train_batches(
            self.prepared_dir, batch_size, self.config.seed, self.data_epoch(phase, epoch),
            start_step=position.step_in_epoch, process_index=jax.process_index(),
            process_count=jax.process_count())
        first = position.step_in_epoch
        for step_in_epoch, host_batch in enumerate(batches, start=first):
            global_step = self.global_step(phase, epoch, step_in_epoch)
            rng = self._step_rng(state.rng, global_step)
            batch = sharding.global_batch({"image": host_batch["image"], "label": host_batch["label"]}, self.mesh)
            state, metrics = train_step(state, batch, rng)
            if pending is not None:  # read the previous step's metrics while this one runs
                absorb(*pending)
            pending = (step_in_epoch, metrics)
            stop_requested = self.stop_signal is not None
            periodic = every and (global_step + 1) % every == 0
            if (stop_requested or periodic) and step_in_epoch + 1 < self.steps_per_epoch:
                absorb(*pending)
                pending = None
                now = time.perf_counter()
                position.partial["seconds"] += now - segment_start
                segment_start = now
                self._save(state, position)
                if stop_requested:
                    self._stop()
        if pending is not None:
            absorb(*pending)
        bar.close()
        if position.step_in_epoch != self.steps_per_epoch:
            raise RunError(f"data.train_batches yielded {position.step_in_epoch - first} batches for phase {phase} "
                           f"epoch {epoch + 1}, expected {self.steps_per_epoch - first}")
        position.partial["seconds"] += time.perf_counter() - segment_start
        return state

    def evaluate(self, variables: Variables, phase: int, epoch: int) -> dict[str, float | None]:
        """Mean test loss (phase 1: reconstruction MSE) and, in phase 2, test accuracy."""
        loss, accuracy = evaluate_split(self._eval_step(phase), variables, self.prepared_dir, "test",
                                        self.config.eval_batch_size, self.mesh)
        if not math.isfinite(loss):
            raise RunError(f"non-finite test loss ({loss}) after phase {phase} epoch {epoch + 1}; "
                           f"{self._checkpoints_left()}")
        return {"test_loss": loss, "test_accuracy": accuracy if phase == JOINT else None}

    def _finish_epoch(self, state: TrainState, position: Position) -> None:
        phase, epoch = position.phase, position.epoch
        eval_start = time.perf_counter()
        test = self.evaluate(state.variables, phase, epoch)
        partial = position.partial
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
                self.pretrain_best.save(row["step"], state.variables, {"epoch": epoch + 1, "test_loss": row["test_loss"]})
        else:
            best = position.best["test_accuracy"]
            row["best"] = best is None or row["test_accuracy"] > best
            if row["best"]:
                position.best["test_accuracy"] = row["test_accuracy"]
                self.best.save(row["step"], state.variables,
                               {"epoch": epoch + 1, "test_accuracy": row["test_accuracy"], "test_loss": row["test_loss"]})
        position.history.append(row)
        position.epoch, position.step_in_epoch, position.partial = epoch + 1, 0, _empty_partial()
        self._save(state, position)
        self._record_epoch(row)

    def run(self) -> list[dict[str, Any]]:
        restored = self._restore()
        state, position = restored if restored else (None, None)
        self._write_outputs_on_start(position)
        if self.is_main:
            split = self.info.num_examples
            print(f"training {self.config.model.enhancer} + {self.config.model.classifier} on {split['train']} "
                  f"train / {split['test']} test images ({self.num_classes} classes, {self.image_size} px), "
                  f"{jax.device_count()} device(s), batch {self.config.batch_size}, {self.steps_per_epoch} steps/epoch")
            if position is not None and self._is_complete(position):
                print(f"the run in {self.workdir} is complete (checkpoint step {self.last_saved_step})")
            elif position is not None:
                print(f"resuming from checkpoint step {self.last_saved_step} (phase {position.phase}, epoch "
                      f"{position.epoch + 1}, step {position.step_in_epoch})")
        for phase in (PRETRAIN, JOINT):
            if position is not None and position.phase > phase:
                continue
            if self.phase_epochs[phase] == 0:
                continue
            if position is None or position.phase < phase:
                position = (Position(phase=phase) if position is None else dataclasses.replace(
                    position, phase=phase, epoch=0, step_in_epoch=0, partial=_empty_partial()))
                state = self._initial_state(phase)
            while position.epoch < self.phase_epochs[phase]:
                state = self._train_epoch(state, position)
                self._finish_epoch(state, position)
                if self.stop_signal is not None and not self._is_complete(position):
                    self._stop()
        return position.history if position else []

    def _stop(self) -> None:
        """Ends the run after a checkpoint was saved because a stop signal arrived (see `stop_on_signals`)."""
        raise TrainingStopped(self.stop_signal, (
            f"stopped by {signal.Signals(self.stop_signal).name} after a checkpoint at step {self.last_saved_step}: "
            "run the same command again to resume"))

    def _is_complete(self, position: Position) -> bool:
        last_phase = JOINT if self.phase_epochs[JOINT] else PRETRAIN
        return position.phase == last_phase and position.epoch >= self.phase_epochs[last_phase]

    def close(self) -> None:
        for store in (self.periodic, self.best, self.pretrain_best):
            store.close()
        if self.writer is not None:
            self.writer.close()


def check_workdir_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """ConfigError when `workdir`'s checkpoints were written with a configuration that differs from
    `config` in a key outside RESUMABLE_KEYS; checked before anything in the workdir is written."""
    periodic = workdir / "checkpoints" / "periodic"
    if not periodic.is_dir():
        return
    store = CheckpointStore(periodic, for_writing=False)
    try:
        for step in reversed(store.steps()):
            try:
                saved = store.restore_meta(step)["config"]
            except Exception:  # an unreadable step: the restore reports it, compare with an older one
                continue
            differences = config_differences(saved, config)
            if differences:
                raise ConfigError(
                    f"{workdir} holds a run of another configuration ({'; '.join(differences[:3])}"
                    f"{'; ...' if len(differences) > 3 else ''}); use another --workdir or the run's own config")
            return
    finally:
        store.close()


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


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          show_progress: bool = True) -> list[dict[str, Any]]:
    """Trains (or resumes) the run of `config` in `workdir`; returns the metrics rows of every epoch.

    `config` must have passed `cli.validate`. Raises ConfigError/DataError for bad inputs (including a
    workdir holding a run of another configuration) and RunError when the run fails (non-finite loss).
    """
    workdir = pathlib.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = resolve_config(config)
    check_workdir_config(config, workdir)
    prepare_data(config, workdir)
    trainer = _Trainer(config, workdir, show_progress)
    try:
        with stop_on_signals(trainer):
            return trainer.run()
    finally:
        trainer.close()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(trainer: _Trainer) -> Iterator[None]:
    """While training, SIGINT (Ctrl-C) or SIGTERM (e.g. a cluster's pre-emption notice) makes the loop save
    a checkpoint after the current step and raise TrainingStopped; a second one acts at once, as it would
    without this. Signals that the process ignores stay ignored (e.g. SIGINT in a background job).

    Only in the main thread of a single-process run: with several processes a signal reaches one of them,
    and a checkpoint needs them all; there they act as before (the run resumes from its last checkpoint).
    """
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield
        return
    # getsignal gives None for a handler installed outside Python: restored as the default.
    previous = {number: signal.getsignal(number) or signal.SIG_DFL for number in STOP_SIGNALS}

    def request_stop(number: int, frame: Any) -> None:
        if trainer.stop_signal is not None:  # the second signal: what it would have done
            signal.signal(number, previous[number])
            signal.raise_signal(number)
            return
        trainer.stop_signal = number
        if trainer.is_main:
            print(f"{signal.Signals(number).name}: stopping after the current step, once a checkpoint is saved "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(number, request_stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# ----------------------------------------------------------------------------------------------------
# Reading a finished (or running) run back.


@dataclasses.dataclass
class Run:
    """A trained run: its config, float32 model, variables {'params', 'batch_stats'}, classes, data folder."""

    config: ml_collections.ConfigDict
    model: nn.Module
    variables: Variables
    class_names: list[str]
    prepared_dir: pathlib.Path


def load_run(workdir: str | pathlib.Path, checkpoint: str = "best") -> Run:
    """Loads the phase-2 weights of the run in `workdir`: 'best' (highest test accuracy) or 'latest'.

    Raises ConfigError (one line) when the workdir holds no run or no phase-2 weights yet. The variables
    are replicated over every device of `sharding.data_mesh()`; the model computes in float32.
    """
    workdir = pathlib.Path(workdir)
    if checkpoint not in CHECKPOINT_NAMES:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, got {checkpoint!r}")
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{workdir} holds no training run (no config.json)")
    try:
        config = config_lib.saved_config(json.loads(config_file.read_text()))
    except ValueError as error:  # a damaged config.json, or one of another version
        raise ConfigError(f"{config_file}: {' '.join(str(error).split())}") from None
    prepared_dir = prepared_dir_of(config, workdir)
    class_names = list(data_lib.load_info(prepared_dir).class_names)
    model = build(config, len(class_names))
    replicated = sharding.replicated(sharding.data_mesh())
    image_size = int(config.data.image_size)
    store_dir = workdir / "checkpoints" / ("best" if checkpoint == "best" else "periodic")
    if not store_dir.is_dir():
        raise ConfigError(f"{workdir} has no '{checkpoint}' checkpoint yet")

    optimizer = make_optimizer(config.optimizer, phase_steps=0)  # only its state's structure is used

    def target_for(meta: dict[str, Any]) -> Any:
        if checkpoint == "best":
            return abstract_state(model, optimizer, JOINT, image_size, replicated).variables
        if meta["position"]["phase"] != JOINT:
            raise ConfigError(f"the latest checkpoint of {workdir} is from phase 1 (no classifier yet)")
        return abstract_state(model, optimizer, JOINT, image_size, replicated).to_dict()

    store = CheckpointStore(store_dir, for_writing=False)
    try:
        restored = store.restore_latest(target_for)
    except NoReadableCheckpoint as error:
        raise ConfigError(str(error)) from None
    finally:
        store.close()
    if restored is None:
        raise ConfigError(f"{workdir} has no '{checkpoint}' checkpoint yet")
    variables = {"params": restored.state["params"], "batch_stats": restored.state["batch_stats"]}
    return Run(config=config, model=model, variables=variables, class_names=class_names, prepared_dir=prepared_dir)


