"""The data layer: prepare a class-per-folder white-blood-cell image set, then read it for training.

`prepare(config.data, out_dir)` scans, splits (stratified, leak-free), augments the training split,
optionally applies the stain-free proxy, and writes a tensorflow-datasets data set plus manifest.csv
and skipped.csv; the readers (`train_batches`, `eval_batches`) read what it wrote. TensorFlow is only
imported when building, if installed, with its GPUs hidden (without it the same records are
written); reading never imports it.
CLI: `python -m urnet_jax.data --help`.
"""

from urnet_jax.errors import DataError
from urnet_jax.data.images import load_image
from urnet_jax.data.pipeline import epoch_order, eval_batches, steps_per_epoch, train_batches
from urnet_jax.data.prepare import PreparedInfo, PrepareSummary, load_info, prepare, read_manifest
from urnet_jax.data.stainfree import stainfree_proxy

__all__ = [
    "DataError",
    "PrepareSummary",
    "PreparedInfo",
    "epoch_order",
    "eval_batches",
    "load_image",
    "load_info",
    "prepare",
    "read_manifest",
    "stainfree_proxy",
    "steps_per_epoch",
    "train_batches",
]
