"""Test-time re-estimation of BatchNorm statistics on unlabelled images of the target domain.

A model trained in one lab normalises every BatchNorm layer with that lab's running statistics; on
another lab's images those statistics are off. Re-estimating them on the target images, with the
learned parameters untouched, is "AdaBN" (Li, Wang, Shi, Liu, Hou, "Revisiting batch normalization for
practical domain adaptation", ICLR workshop 2017; Schneider et al., "Improving robustness against
common corruptions by covariate shift adaptation", NeurIPS 2020).

`adapt_batch_stats` runs the model over the target images with each BatchNorm layer normalising by the
current batch's own statistics (as in training) and returns new variables whose batch_stats are the
exact statistics of each layer's inputs over all the target images: the mean, and the unbiased
variance (the convention of `layers.BatchNorm`'s running variance), pooled across batches with Chan et
al.'s parallel formula in float64, so they do not depend on how the images are batched (momentum plays
no part). The stored variables and checkpoint are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from urnet_jax import compiler_options
from urnet_jax.errors import ConfigError, DataError
from urnet_jax.models import layers
from urnet_jax.steps import to_unit_range

Variables = Mapping[str, Any]
Path = tuple[str, ...]


class _PooledMoments:
    """Running count, mean and sum of squared deviations of one layer's channels (float64, shape (C,))."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | float = 0.0
        self.squared_deviations: np.ndarray | float = 0.0

    def add(self, count: int, mean: np.ndarray, squared_deviations: np.ndarray) -> None:
        """Merges a group's moments (Chan, Golub, LeVeque's parallel update)."""
        total = self.count + count
        delta = mean.astype(np.float64) - self.mean
        self.mean = self.mean + delta * (count / total)
        self.squared_deviations = (self.squared_deviations + squared_deviations.astype(np.float64)
                                   + delta**2 * (self.count * count / total))
        self.count = total

    def unbiased_variance(self) -> np.ndarray:
        return np.asarray(self.squared_deviations) / max(self.count - 1, 1)


def _batch_moments(model: nn.Module, prepare_input: Callable[[jax.Array], jax.Array]
                   ) -> Callable[[Variables, jax.Array], dict[Path, list[tuple[jax.Array, ...]]]]:
    """A jit-compiled (variables, uint8 images) -> for each BatchNorm layer (by its module path), one
    (count, mean (C,), sum of squared deviations (C,)) per call of the layer in the forward pass."""

    def moments(variables: Variables, images: jax.Array) -> dict[Path, list[tuple[jax.Array, ...]]]:
        collected: dict[Path, list[tuple[jax.Array, ...]]] = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if not (isinstance(module, layers.BatchNorm) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            x = args[0]
            x32 = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            squared_deviations = jnp.sum(jnp.square(x32 - mean), axis=axes)
            count = jnp.asarray(x.size // x.shape[-1], jnp.int32)
            collected.setdefault(tuple(module.scope.path), []).append((count, mean, squared_deviations))
            return next_fun(x, True)  # normalise by the batch's own statistics, as in training

        with nn.intercept_methods(interceptor):
            # train=False elsewhere (no dropout); the running-average updates are discarded.
            model.apply(variables, prepare_input(images), train=False, mutable=["batch_stats"])
        return collected

    return compiler_options.jit(moments)


def adapt_batch_stats(model: nn.Module, variables: Variables, image_batches: Iterable[np.ndarray],
                      prepare_input: Callable[[jax.Array], jax.Array] = to_unit_range) -> dict[str, Any]:
    """New variables whose BatchNorm statistics are those of the target images (see module doc).

    model: a Flax module called as `model.apply(variables, inputs, train=...)`; variables: its variables
    (not modified; 'params' and every other collection are passed through as they are);
    image_batches: uint8 (N, H, W, 3) arrays of target images (any batch sizes); prepare_input maps a
    uint8 batch to the model's input (default: scaling to [0, 1], the composite model's convention).
    Raises ConfigError if the model has no BatchNorm layer, DataError if there are no images.
    """
    if "batch_stats" not in variables:
        raise ConfigError("the model has no BatchNorm layer whose statistics could be adapted")
    moments_fn = _batch_moments(model, prepare_input)
    pooled: dict[Path, _PooledMoments] = {}
    for images in image_batches:
        for path, calls in jax.device_get(moments_fn(variables, jnp.asarray(images))).items():
            for count, mean, squared_deviations in calls:
                pooled.setdefault(path, _PooledMoments()).add(int(count), mean, squared_deviations)
    if not pooled:
        raise DataError("no target images to adapt the BatchNorm statistics on")
    stats = traverse_util.flatten_dict(dict(variables["batch_stats"]))
    for path, moments in pooled.items():
        stats[(*path, "mean")] = jnp.asarray(moments.mean, jnp.float32)
        stats[(*path, "var")] = jnp.asarray(moments.unbiased_variance(), jnp.float32)
    return {**variables, "batch_stats": traverse_util.unflatten_dict(stats)}
