"""The train state, the optimiser and the model's initial variables.

`TrainState` is flax's, with the BatchNorm statistics and the key that every step's key is folded from.
The optimiser is wrapped in `optax.inject_hyperparams`, so the learning rate a step applied is read from
its state (`current_learning_rate`) rather than recomputed.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from urnet_jax import compiler_options, freezing, sharding
from urnet_jax.errors import ConfigError
from urnet_jax.models.composite import build_model

PRETRAIN, JOINT = 1, 2  # the two phases: enhancer identity reconstruction, then joint classification
PARTS = ("enhancer", "classifier")  # EnhanceClassify's submodules; index = the part's init-key fold
PHASE_PARTS = {PRETRAIN: ("enhancer",), JOINT: PARTS}  # what each phase trains
HEAD_KEY_FOLD = len(PARTS)  # init-key fold for a pretrained classifier's new head

Variables = dict[str, Any]


class TrainState(train_state.TrainState):
    """Everything a training step updates; replicated on every device.

    step: int32 scalar, optimizer steps taken so far over both phases (the global step).
    params, batch_stats: the model's variable collections (phase 1: the enhancer's only).
    opt_state: the optax state of `params` (an `inject_hyperparams` state: it holds the learning rate).
    rng: uint32 (2,), the key that every step's key is folded from.
    apply_fn, tx: the model's `apply` and the optimiser (static: not arrays, not checkpointed).
    """

    batch_stats: Any
    rng: jax.Array

    @property
    def variables(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def arrays(self) -> dict[str, Any]:
        """The checkpointed part: {'step', 'params', 'batch_stats', 'opt_state', 'rng'}."""
        return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
                "opt_state": self.opt_state, "rng": self.rng}


def build(config: ml_collections.ConfigDict, num_classes: int, dtype: Any = None) -> nn.Module:
    """The EnhanceClassify model of config.model, computing in `dtype` (None: float32); its enhancer frozen
    in phase 2 (inference mode, no gradient) with train.freeze_enhancer."""
    return build_model(config.model, num_classes, dtype, freeze_enhancer=config.train.freeze_enhancer)


def learning_rate(optimizer_config: ml_collections.ConfigDict, phase_steps: int) -> float | optax.Schedule:
    """The learning rate over one phase of `phase_steps` optimizer steps (counted from 0 in each phase):
    optimizer.lr, after a linear rise from 0 over optimizer.warmup_steps; with schedule 'cosine' it then
    decays to 0 at the phase's last step along a half cosine. A plain float when it is constant."""
    lr, warmup = float(optimizer_config.lr), int(optimizer_config.warmup_steps)
    if optimizer_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(phase_steps, warmup + 1), end_value=0.0)
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return lr


def _parameter_part(params: Any) -> Any:
    """params with every leaf replaced by its top-level part's name ('enhancer' or 'classifier')."""
    return {part: jax.tree.map(lambda _, part=part: part, tree) for part, tree in params.items()}


def make_optimizer(optimizer_config: ml_collections.ConfigDict, phase_steps: int,
                   freeze_enhancer: bool = False) -> optax.GradientTransformation:
    """SGD with momentum (torch.optim.SGD semantics, weight decay added to the gradient) or AdamW, at
    `learning_rate(optimizer_config, phase_steps)`, injected as a hyperparameter (the logged lr is this
    one: the classifier's). The optimizer state's structure does not depend on `phase_steps`.
    freeze_enhancer: params['enhancer'] is not updated (`freezing.freeze_enhancer`).

    optimizer.clip_norm > 0 first scales the whole gradient down to that global L2 norm when it is larger
    (torch's clip_grad_norm_ before the step). optimizer.enhancer_lr_scale != 1 multiplies the enhancer's
    updates (params['enhancer']) by it: the same as giving the enhancer lr * scale, for SGD with momentum
    and for AdamW (both updates are linear in the lr).
    """

    def optimizer_at(learning_rate: jax.Array) -> optax.GradientTransformation:
        if optimizer_config.name == "adamw":
            update = optax.adamw(learning_rate, weight_decay=optimizer_config.weight_decay)
        else:
            update = optax.sgd(learning_rate, momentum=optimizer_config.momentum or None)
            if optimizer_config.weight_decay:
                update = optax.chain(optax.add_decayed_weights(optimizer_config.weight_decay), update)
        if optimizer_config.clip_norm:
            update = optax.chain(optax.clip_by_global_norm(optimizer_config.clip_norm), update)
        if optimizer_config.enhancer_lr_scale != 1:
            update = optax.chain(update, optax.multi_transform(
                {"enhancer": optax.scale(optimizer_config.enhancer_lr_scale), "classifier": optax.identity()},
                _parameter_part))
        return update

    def optimizer_or_frozen_enhancer(learning_rate: jax.Array) -> optax.GradientTransformation:
        optimizer = optimizer_at(learning_rate)
        return freezing.freeze_enhancer(optimizer) if freeze_enhancer else optimizer

    return optax.inject_hyperparams(optimizer_or_frozen_enhancer)(
        learning_rate=learning_rate(optimizer_config, phase_steps))


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate that the last step applied (the first step's before any), float32 scalar."""
    return opt_state.hyperparams["learning_rate"]


def init_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(initialisation key, the key that step keys are folded from) for `seed`, as host arrays.

    Host copies: a device key placed in a TrainState would be donated (deleted) by the first step.
    """
    init_key, step_key = jax.device_get(jax.random.split(jax.random.PRNGKey(seed)))
    return init_key, step_key


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

    Compiled without optimisation (`compiler_options.run_unoptimised`): it runs once.
    """
    return compiler_options.run_unoptimised(functools.partial(_init_parts, model, parts, image_size), key,
                                            jit_kwargs={"out_shardings": out_sharding})


def abstract_variables(model: nn.Module, parts: tuple[str, ...], image_size: int) -> Variables:
    """The shapes and dtypes of `init_variables` (nothing computed)."""
    return jax.eval_shape(functools.partial(_init_parts, model, parts, image_size), jax.random.PRNGKey(0))


def with_pretrained_classifier(variables: Variables, loaded: Variables, source: str, name: str,
                               mesh: jax.sharding.Mesh) -> Variables:
    """`variables` with the classifier's replaced by `loaded` ({'params'[, 'batch_stats']} of classifier
    `name` with its new head: `port.load_pretrained` or `workdir.pretrained_classifier`), replicated over
    `mesh` as float32. ConfigError naming `source` when they do not fit the classifier."""
    expected = {collection: variables[collection].get("classifier", {}) for collection in ("params", "batch_stats")}
    got = {collection: loaded.get(collection, {}) for collection in ("params", "batch_stats")}
    mismatch = _describe_mismatch(expected, got)
    if mismatch:
        raise ConfigError(f"model.pretrained {source} does not fit {name}: {mismatch}")
    for collection in ("params", "batch_stats"):
        if got[collection]:
            variables[collection]["classifier"] = sharding.replicate(
                jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), got[collection]), mesh)
    return variables


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


def phase_apply_fn(model: nn.Module, phase: int) -> Any:
    """`model.apply` computing what `phase` trains: the enhanced image (phase 1) or the logits (phase 2)."""
    return functools.partial(model.apply, method="enhance") if phase == PRETRAIN else model.apply


def create_state(model: nn.Module, phase: int, optimizer: optax.GradientTransformation, variables: Variables,
                 step: int | jax.Array, step_key: jax.Array) -> TrainState:
    """A phase's TrainState at global step `step` (traceable: `new_state` jits it)."""
    return TrainState(step=jnp.asarray(step, jnp.int32), apply_fn=phase_apply_fn(model, phase),
                      params=variables["params"],
                      tx=optimizer, opt_state=optimizer.init(variables["params"]),
                      batch_stats=variables["batch_stats"], rng=step_key)


def new_state(model: nn.Module, phase: int, optimizer: optax.GradientTransformation, variables: Variables,
              step: int, step_key: jax.Array, out_sharding: jax.sharding.Sharding) -> TrainState:
    """`create_state` as one compiled program placed with `out_sharding` (eagerly, optimizer.init would
    compile a program per parameter shape)."""
    return jax.jit(functools.partial(create_state, model, phase, optimizer),
                   out_shardings=out_sharding)(variables, step, step_key)


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, phase: int, image_size: int,
                   out_sharding: jax.sharding.Sharding) -> TrainState:
    """ShapeDtypeStructs (carrying `out_sharding`) of a phase's TrainState: a restore target."""
    variables = abstract_variables(model, PHASE_PARTS[phase], image_size)
    abstract = jax.eval_shape(functools.partial(create_state, model, phase, optimizer), variables, 0,
                              jax.random.PRNGKey(0))
    return sharding.with_sharding(abstract, out_sharding)
