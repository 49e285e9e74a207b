"""Net1 (ResNet18 alone) on stained PBC at 96 px: a counting model that trains on a 2-core CPU in about
half an hour, used for the calibration, corrected-count and cross-lab examples in the README.

    python train.py --config configs/pbc_net1.py --workdir runs/pbc_net1
    python train.py --config configs/pbc_net1.py:/other/pbc --workdir runs/pbc_net1  # data elsewhere

PBC through the published WBCAtt split (6169 / 1030 / 3099 images, less byte-identical duplicates), mapped
to the paper's 3 classes; the training split is larger than `data.train_size`, so it is used as it is (no
offline augmentation), with online flips and 90-degree rotations. SGD with warm-up and cosine decay, gradient clipping, and the
`best` weights chosen on the validation split. No enhancer, no phase 1.
"""

import pathlib

import ml_collections

from urnet_jax.config import base_config

PBC_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"  # ../shared/data/pbc


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    config = base_config()
    config.model.enhancer = "none"
    config.model.classifier = "resnet18"
    config.data.dir = data_dir or str(PBC_DIR)
    config.data.split_dir = str(pathlib.Path(config.data.dir) / "splits")
    config.data.image_size = 96
    config.data.train_size = 3000
    config.data.online_augment = True
    config.pretrain.epochs = 0
    config.train.epochs = 8
    config.train.select_on = "val"
    config.optimizer.lr = 0.05
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 100
    config.optimizer.clip_norm = 1.0
    config.optimizer.weight_decay = 1e-4
    config.batch_size = 32
    config.eval_batch_size = 64
    config.checkpoint.every_steps = 0
    config.checkpoint.keep = 1
    config.log_every_steps = 10
    return config
