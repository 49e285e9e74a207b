"""The pretrained-classifier stand-in for ImageNet weights: ResNet18 alone on half of PBC's training split.

    python train.py --config configs/pretrain_standin.py --workdir runs/standin-a
    python train.py --config configs/pretrain_standin.py:/other/pbc --workdir runs/standin-a  # data elsewhere

The classifier is trained on the stained images of partition "a" of the WBCAtt training split, with PBC's
5 folder classes (basophil, eosinophil, lymphocyte, monocyte, neutrophil), and its `best` weights are
chosen on the validation split. The training recipe is `configs/pbc_net1.py`'s (ResNet18 at 96 px, SGD
with warm-up, cosine decay and clipping), run for 15 epochs. A study then sets `model.pretrained` to this
run's workdir (the head is replaced, as for torchvision weights) and trains its 3-class models on
partition "b", so no image is seen by both stages. The architecture (classifier, width, norm) must match the study's.
"""

import pathlib
import runpy

import ml_collections

COUNTING_CONFIG = pathlib.Path(__file__).resolve().parent / "pbc_net1.py"  # the same recipe, other data


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    config = runpy.run_path(str(COUNTING_CONFIG))["get_config"](data_dir)
    config.data.class_map = "folders"
    config.data.partition = "a"
    config.data.variant = "raw"  # stained images
    config.data.train_size = 3000  # about partition a's size: the originals, hardly any offline augmentation
    config.train.epochs = 15
    config.optimizer.warmup_steps = 200
    return config
