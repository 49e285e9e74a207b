"""The pure, jit-compiled training and evaluation steps of both phases, and a split's evaluation.

Phase 1 (PRETRAIN) trains the enhancer alone on identity reconstruction (pixel MSE between `enhance(x)`
and `x`); phase 2 (JOINT) trains enhancer + classifier with softmax cross-entropy. The steps are jitted
over a data-parallel mesh (`urnet_jax.sharding`): the batch is sharded along 'data', the state is
replicated, and XLA inserts the collectives, so every mean is over the global batch. Each step function
may be traced once (`chex.assert_max_traces`): a second trace means silent recompilation.
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import urnet_jax.data as data_lib
from urnet_jax import sharding
from urnet_jax.errors import RunError
from urnet_jax.train_state import JOINT, PRETRAIN, TrainState, Variables, current_learning_rate, phase_apply_fn

__all__ = ["PRETRAIN", "JOINT", "compute_dtype", "to_unit_range", "make_train_step", "make_eval_step",
           "evaluate_split"]

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
_step_ids = itertools.count()


def compute_dtype(precision: str) -> jnp.dtype | None:
    """The model's computation dtype for config.precision (parameters always stay float32)."""
    return jnp.bfloat16 if precision == "bfloat16" else None


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 (N, H, W, 3) -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def _check_batch(batch: Batch, keys: tuple[str, ...]) -> None:
    """Trace-time shape and dtype checks: image uint8 (B, H, W, 3); label int32 (B,); mask bool (B,)."""
    images = batch["image"]
    chex.assert_rank(images, 4)
    chex.assert_type(images, jnp.uint8)
    chex.assert_axis_dimension(images, 3, 3)
    for key, dtype in (("label", jnp.int32), ("mask", jnp.bool_)):
        if key in keys:
            chex.assert_shape(batch[key], (images.shape[0],))
            chex.assert_type(batch[key], dtype)


def _traced_once(function: Callable, name: str) -> Callable:
    """`function` raising AssertionError when traced a second time. chex counts traces per definition
    site and name, so each step function gets a name of its own: the count is per step function."""
    function.__name__ = function.__qualname__ = f"{name}_{next(_step_ids)}"
    return chex.assert_max_traces(function, n=1)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _output(apply_fn: Callable, variables: Variables, images: jax.Array, train: bool,
            rng: jax.Array | None = None) -> tuple[jax.Array, Variables]:
    """Phase 1: the enhanced image (N, H, W, 3); phase 2: the logits (N, classes). Both float32."""
    if train:
        output, updates = apply_fn(variables, to_unit_range(images), train=True, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
    else:
        output, updates = apply_fn(variables, to_unit_range(images), train=False), {}
    return output.astype(jnp.float32), updates


def _per_example_loss(phase: int, output: jax.Array, batch: Batch) -> jax.Array:
    """Phase 1: pixel MSE against the input image; phase 2: softmax cross-entropy. Shape (N,), float32."""
    if phase == PRETRAIN:
        return jnp.mean(jnp.square(output - to_unit_range(batch["image"])), axis=(1, 2, 3))
    return optax.softmax_cross_entropy_with_integer_labels(output, batch["label"])


def make_train_step(phase: int, mesh: jax.sharding.Mesh
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The jit-compiled step (state, batch, rng) -> (new state, metrics); `state` is donated.

    The state brings the model (`apply_fn`) and the optimiser (`tx`). batch: {'image': uint8
    (B, H, W, 3), 'label': int32 (B,)} sharded along 'data'. metrics (replicated scalars): 'loss' (mean
    over the batch), 'accuracy' (phase 2 only; fraction), 'finite' (the loss and every new parameter are
    finite), 'learning_rate' (the rate this step applied).
    """

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        _check_batch(batch, ("label",))

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Variables]]:
            variables = {"params": params, "batch_stats": state.batch_stats}
            output, updates = _output(state.apply_fn, variables, batch["image"], True, rng)
            return jnp.mean(_per_example_loss(phase, output, batch)), (output, updates)

        (loss, (output, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
        metrics = {"loss": loss, "finite": jnp.isfinite(loss) & _all_finite(new_state.params),
                   "learning_rate": current_learning_rate(new_state.opt_state)}
        if phase == JOINT:
            metrics["accuracy"] = jnp.mean((jnp.argmax(output, axis=-1) == batch["label"]).astype(jnp.float32))
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    return jax.jit(_traced_once(train_step, f"phase{phase}_train_step"),
                   in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(model: nn.Module, phase: int,
                   mesh: jax.sharding.Mesh) -> Callable[[Variables, Batch], Metrics]:
    """The jit-compiled evaluation (variables, batch) -> sums over the batch's real (mask=True) rows.

    batch: {'image', 'label', 'mask' (bool (B,))} sharded along 'data'. Returns replicated float32
    scalars 'loss_sum' (phase 1: per-image MSE; phase 2: cross-entropy), 'correct' (phase 2), 'count'.
    """
    apply_fn = phase_apply_fn(model, phase)

    def eval_step(variables: Variables, batch: Batch) -> Metrics:
        _check_batch(batch, ("label", "mask"))
        output, _ = _output(apply_fn, variables, batch["image"], False)
        mask = batch["mask"].astype(jnp.float32)
        sums = {"loss_sum": jnp.sum(_per_example_loss(phase, output, batch) * mask), "count": jnp.sum(mask)}
        if phase == JOINT:
            sums["correct"] = jnp.sum((jnp.argmax(output, axis=-1) == batch["label"]) * mask)
        return sums

    replicated = sharding.replicated(mesh)
    return jax.jit(_traced_once(eval_step, f"phase{phase}_eval_step"),
                   in_shardings=(replicated, sharding.batch_sharded(mesh)), out_shardings=replicated)


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
