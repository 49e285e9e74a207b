"""The tensorflow-datasets builder that writes a prepared data set from a class-per-folder image set.

The image folders are the builder's manual dir (`tfds.download.DownloadConfig(manual_dir=...)`); the
data config travels in the BuilderConfig. Storage: ArrayRecord files (random access, so the readers
can shuffle by index), one record per example holding the image as raw uint8 pixels
(image_size, image_size, 3) -- already transformed (urnet_jax.data.transforms), in the requested variant
and augmented, so reading is a copy, not a JPEG decode -- the label, and, when data.target is not "image",
the phase-1 target (same shape, same augmentation). ArrayRecord compresses each record (zstd). Records are
written in manifest order (shuffling disabled), so record i of a split is row i of that split in
manifest.csv.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from urnet_jax.data.augment import apply_augmentation
from urnet_jax.data.plan import SPLITS, Plan, build_plan
from urnet_jax.data.tf_runtime import import_tfds

tfds = import_tfds()

BUILDER_CONFIG_NAME = "prepared"


@dataclasses.dataclass(eq=False)
class WbcFoldersConfig(tfds.core.BuilderConfig):
    """data_config: the validated `config.data` as a dict; class_folders: class -> folder names."""

    data_config: Mapping | None = None
    class_folders: Mapping | None = None


class WbcFolders(tfds.core.GeneratorBasedBuilder):
    """White blood cell images, one folder per source class, mapped to output classes by a class_map."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the images in one folder per class under the manual dir (e.g. the PBC data set's "
        "neutrophil/, eosinophil/, basophil/, monocyte/, lymphocyte/); config.data.class_map maps "
        "folders to classes.")
    # No download checksums file belongs to this builder. (TFDS's own lookup of one goes through
    # `code_path`, which needs the `importlib_resources` backport that tensorflow-datasets does not
    # declare for Python >= 3.9.)
    code_path = None

    def __init__(self, *, data_config: Mapping, class_folders: Mapping, **kwargs):
        config = WbcFoldersConfig(name=BUILDER_CONFIG_NAME, data_config=dict(data_config),
                                  class_folders={k: tuple(v) for k, v in class_folders.items()})
        super().__init__(config=config, **kwargs)
        self.plan: Plan | None = None

    def _info(self):
        data_config = self.builder_config.data_config
        size = data_config["image_size"]

        def pixels():
            return tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)

        features = {"image": pixels(), "label": tfds.features.ClassLabel(names=list(self.builder_config.class_folders))}
        if data_config["target"] != "image":
            features["target"] = pixels()
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"White blood cells, {size}x{size} uint8 RGB, variant {data_config['variant']}, "
                        f"phase-1 target {data_config['target']}.",
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        self.plan = build_plan(dl_manager.manual_dir, self.builder_config.class_folders,
                               self.builder_config.data_config, dl_manager.download_dir)
        # an empty split (no validation split when data.val_fraction is 0) is not written: TFDS cannot
        return {split: self._generate_examples(self.plan, split) for split in SPLITS if self.plan.examples[split]}

    def _generate_examples(self, plan: Plan, split: str):
        for index, example in enumerate(plan.examples[split]):
            record = {"image": np.ascontiguousarray(apply_augmentation(plan.pixels[example.slot], example.augmentation)),
                      "label": example.label_id}
            if plan.targets is not None:
                record["target"] = np.ascontiguousarray(apply_augmentation(plan.targets[example.slot],
                                                                           example.augmentation))
            yield index, record
