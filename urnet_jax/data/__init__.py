"""The data layer: prepare a class-per-folder white-blood-cell image set, then read it for training.

`prepare(config.data, out_dir)` scans, splits into train / val / test (stratified and leak-free, or a
published split), transforms every image as a model sees it (`transforms.model_input`), optionally
applies a stain-free proxy, augments the training split, and writes a tensorflow-datasets data set plus
manifest.csv and skipped.csv; the readers (`train_batches`, `eval_batches`) read what it wrote.
Images read from a folder outside `prepare` (prediction, external evaluation) go through
`model_input(load_image(path), config.data)`. TensorFlow is only imported when building, if
installed, with its GPUs hidden (without it the same records are written); reading never imports it.
CLI: `python -m urnet_jax.data --help`.
"""

from urnet_jax.data.images import load_image
from urnet_jax.data.pipeline import (
    epoch_order,
    eval_batches,
    steps_per_epoch,
    train_batches,
)
from urnet_jax.data.prepare import (
    PreparedInfo,
    PrepareSummary,
    load_info,
    prepare,
    read_manifest,
)
from urnet_jax.data.stainfree import severe_proxy, stainfree_proxy
from urnet_jax.data.transforms import model_input
from urnet_jax.errors import DataError

__all__ = [
    "DataError",
    "PrepareSummary",
    "PreparedInfo",
    "epoch_order",
    "eval_batches",
    "load_image",
    "load_info",
    "model_input",
    "prepare",
    "read_manifest",
    "severe_proxy",
    "stainfree_proxy",
    "steps_per_epoch",
    "train_batches",
]
