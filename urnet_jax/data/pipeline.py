"""Readers of a prepared data set: deterministic training batches and padded evaluation batches.

Both read the ArrayRecord files by index through tensorflow-datasets' random-access data source (which
decodes with numpy: TensorFlow is not imported), batch by batch, with grain's threaded prefetching
(order preserved). Batches stay uint8 on the host (training converts to float on the device).

Training order: epoch e uses the permutation np.random.default_rng([seed, e]).permutation(n); step s
of the epoch takes positions [s B, (s + 1) B) of it (B = the global batch size, the last partial batch
dropped), and process p of P takes its contiguous B/P share of each global batch. So the batches are
a pure function of (seed, epoch, step): resuming at start_step yields exactly the batches the
uninterrupted epoch would have yielded from that step on. The training-only random augmentation
(`data_config`, see urnet_jax.data.online) is seeded per (seed, epoch, example index), so it keeps this.

Batches carry 'target' (uint8, like 'image', aligned with it) when the data set was prepared with a
data.target other than "image" (`load_info(out_dir).target`); read it with `batch.get("target")`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping

import numpy as np

from urnet_jax.data.online import OnlineAugmentation
from urnet_jax.data.prepare import PreparedInfo, load_info
from urnet_jax.data.split import SPLITS
from urnet_jax.data.tf_runtime import import_tfds_for_reading
from urnet_jax.errors import DataError

READ_THREADS = 2  # grain's reader threads
PREFETCH_BATCHES = 4  # batches grain reads ahead


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")


def _process_share(batch_size: int, process_index: int, process_count: int) -> int:
    """The number of examples of each global batch that one process reads."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise DataError(f"batch size {batch_size} must be a positive multiple of the process count "
                        f"{process_count}")
    return batch_size // process_count


def _steps(num_train: int, batch_size: int) -> int:
    if not 1 <= batch_size <= num_train:
        raise DataError(f"batch size {batch_size} must be between 1 and the {num_train} training examples")
    return num_train // batch_size


def steps_per_epoch(out_dir: str | os.PathLike, batch_size: int) -> int:
    """Training steps per epoch: floor(training examples / global batch size); DataError if zero."""
    return _steps(load_info(out_dir).num_examples["train"], batch_size)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The training example order of one epoch: a permutation of range(num_examples)."""
    if seed < 0 or epoch < 0:
        raise DataError(f"seed ({seed}) and epoch ({epoch}) must be >= 0")
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _batches(info: PreparedInfo, split: str, index_batches: np.ndarray, with_padding: bool,
             augment: tuple[OnlineAugmentation, int, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the records named by each row of index_batches (-1 = padding), read ahead by grain;
    `augment` = (augmentation, seed, epoch) augments each example (training only)."""
    if not len(index_batches):
        return iter(())
    source = import_tfds_for_reading().builder_from_directory(info.tfds_dir).as_data_source(split)
    size = info.image_size
    with_target = info.target != "image"

    def read(indices: np.ndarray) -> dict[str, np.ndarray]:
        valid = indices >= 0
        images = np.zeros((len(indices), size, size, 3), np.uint8)
        targets = np.zeros_like(images) if with_target else None
        labels = np.zeros(len(indices), np.int32)
        for row, record in zip(np.flatnonzero(valid), source.__getitems__(indices[valid].tolist()), strict=True):
            image, target = record["image"], record["target"] if with_target else None
            if augment is not None:
                augmentation, seed, epoch = augment
                image, target = augmentation.apply(image, target, seed, epoch, int(indices[row]))
            images[row], labels[row] = image, record["label"]
            if with_target:
                targets[row] = target
        batch = {"image": images, "label": labels}
        if with_target:
            batch["target"] = targets
        if with_padding:
            batch.update(mask=valid, index=indices.astype(np.int64))
        return batch

    import grain  # here, so that importing the training loop needs no input-pipeline packages

    options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
    return iter(grain.MapDataset.source(index_batches).map(read).to_iter_dataset(options))


def train_batches(out_dir: str | os.PathLike, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  data_config: Mapping | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The training batches of one epoch, from start_step on, for one process.

    batch_size is the global batch; each batch is {'image': uint8 (b, S, S, 3), 'label': int32 (b,)}
    plus 'target' uint8 (b, S, S, 3) when the data set has phase-1 targets, with b = batch_size /
    process_count (this process's contiguous share of the global batch). data_config: `config.data`,
    whose training-only augmentation keys (online_augment, random_scale, stain_augment, color_jitter)
    are applied to every example, seeded by (seed, epoch, example index); None = no augmentation.
    """
    share = _process_share(batch_size, process_index, process_count)
    info = load_info(out_dir)
    num_train = info.num_examples["train"]
    steps = _steps(num_train, batch_size)
    if not 0 <= start_step <= steps:
        raise DataError(f"start_step {start_step} is not in [0, {steps}] (steps per epoch)")
    order = epoch_order(num_train, seed, epoch)[: steps * batch_size].reshape(steps, batch_size)
    augmentation = OnlineAugmentation.from_config(data_config or {})
    return _batches(info, "train", order[start_step:, process_index * share:(process_index + 1) * share], False,
                    (augmentation, seed, epoch) if augmentation.active else None)


def eval_batches(out_dir: str | os.PathLike, split: str, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example of a split ('train', 'val' or 'test') once, in manifest order, in ceil(n / batch_size)
    global batches (none for an empty split, e.g. 'val' when data.val_fraction is 0).

    Each batch: 'image' uint8 (b, S, S, 3), 'label' int32 (b,), 'mask' bool (b,) (False on the padding
    of the last global batch, whose image and label are zeros), 'index' int64 (b,) (the row in
    read_manifest(out_dir, split); -1 on padding), and 'target' uint8 (b, S, S, 3) when the data set has
    phase-1 targets (see the module docstring); b = batch_size / process_count. Never augmented.
    """
    share = _process_share(batch_size, process_index, process_count)
    _check_split(split)
    info = load_info(out_dir)
    num_examples = info.num_examples[split]
    num_batches = math.ceil(num_examples / batch_size)
    positions = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)
    indices = np.where(positions < num_examples, positions, -1)
    return _batches(info, split, indices[:, process_index * share:(process_index + 1) * share], True)
