"""The pretrained-classifier stand-in for ImageNet weights: ResNet18 alone on half of PBC's training split.

    python train.py --config configs/pretrain_standin.py --workdir runs/standin-a
    python train.py --config configs/pretrain_standin.py:/other/pbc --workdir runs/standin-a  # data elsewhere

The classifier is trained on the stained images of partition "a" of the WBCAtt training split, with PBC's
5 folder classes (basophil, eosinophil, lymphocyte, monocyte, neutrophil), and its `best` weights are
chosen on the validation split. A study then sets `model.pretrained` to this run's workdir (the head is
replaced, as for torchvision weights) and trains its 3-class models on partition "b", so no image is seen
by both stages. The architecture (classifier, width, norm) must match the study's.
"""

import pathlib

import ml_collections

from urnet_jax.config import base_config

PBC_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"  # ../shared/data/pbc


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.model.enhancer = "none"
    config.model.classifier = "resnet18"
    config.model.classifier_width = 0
    config.data.dir = data_dir or str(PBC_DIR)
    config.data.split_dir = str(pathlib.Path(config.data.dir) / "splits")  # the WBCAtt train / val / test split
    config.data.class_map = "folders"
    config.data.partition = "a"
    config.data.variant = "raw"  # stained images
    config.data.image_size = 96
    config.data.train_size = 3000  # about partition a's size: the originals, hardly any offline augmentation
    config.data.online_augment = True
    config.pretrain.epochs = 0
    config.train.epochs = 15
    config.train.select_on = "val"
    config.optimizer.lr = 0.05
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 200
    config.optimizer.clip_norm = 1.0
    config.optimizer.weight_decay = 1e-4
    config.batch_size = 32
    config.eval_batch_size = 64
    config.checkpoint.every_steps = 0
    config.checkpoint.keep = 1
    config.log_every_steps = 10
    return config
