"""Importing tensorflow-datasets: with TensorFlow, if installed (quiet, GPUs hidden), to build; without it to read.

JAX owns the accelerators; TensorFlow only writes files here, so it must never allocate GPU memory.
Call `import_tfds()` (building) or `import_tfds_for_reading()` instead of importing either directly.
"""

from __future__ import annotations

import functools
import os
import warnings


@functools.cache
def import_tfds():
    """-> the tensorflow_datasets module for building. When TensorFlow is installed it is imported first,
    with its logs quiet and its GPUs hidden; without it, tensorflow-datasets encodes and writes the same
    records with numpy and PIL alone (the GPU machines have no TensorFlow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # also silences TF's start-up banner about oneDNN
    try:
        import tensorflow as tf
    except ImportError:
        return import_tfds_for_reading()
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices elsewhere in this process.
        if tf.config.get_visible_devices("GPU"):
            warnings.warn("TensorFlow was initialised before urnet_jax.data could hide the GPUs from it")
    tf.get_logger().setLevel("ERROR")
    return import_tfds_for_reading()


@functools.cache
def import_tfds_for_reading():
    """-> the tensorflow_datasets module without TensorFlow: its random-access data sources read and
    decode the prepared ArrayRecord files with numpy alone, so reading works where TensorFlow is not
    installed and never imports it (about 0.4 s instead of several seconds)."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    return tfds
