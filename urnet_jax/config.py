"""The one place that lists every configuration key, its default and what it means.

Config files in `configs/` start from `base_config()` and override what differs; the training
entry point validates the result with `validate` before doing any work.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The paper's UR-Net (Net4) protocol: ResNet101 + UR-Net enhancer, 200 px, SGD lr 1e-4, batch 32."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.precision = "float32"  # or "bfloat16": bf16 compute, float32 master weights.
    config.batch_size = 32  # global batch, split over every device.
    config.eval_batch_size = 64

    config.model = ml_collections.ConfigDict()
    config.model.enhancer = "urnet"  # none | unet | unetpp | resunet | urnet
    config.model.classifier = "resnet101"  # any classifier name of urnet_jax.models.create
    config.model.enhancer_width = 64  # channels of the first level; UNet's 64-128-256-512-1024.
    config.model.classifier_width = 0  # 0: torchvision's width; smaller values give tiny test models.
    config.model.pretrained = ""  # path to a torchvision .pth (or a converted checkpoint); "" = random init.

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # class-per-folder image root; "" = the built-in synthetic data set.
    # "wbc3" | "folders" | {"class": ["folder", ...]}; typed `object` so that a config file may assign a dict.
    config.data.class_map = ml_collections.FieldReference("wbc3", field_type=object)
    config.data.image_size = 200  # pixels (square)
    config.data.test_fraction = 0.2
    config.data.seed = 0  # split and augmentation seed
    config.data.train_size = 10000  # training images after offline augmentation
    config.data.variant = "raw"  # raw | stainfree_proxy
    config.data.synthetic_per_class = 200  # images per class of the synthetic data set
    config.data.prepared_dir = ""  # where `prepare` writes the data set; "" = <workdir>/data

    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.epochs = 100  # phase 1: enhancer identity reconstruction (0 skips the phase)

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 200  # phase 2: joint enhancer + classifier training

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # sgd | adamw
    config.optimizer.lr = 1e-4
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 0.0

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500  # periodic saves within an epoch (0: only at epoch ends)
    config.checkpoint.keep = 2  # periodic checkpoints kept (the best one is kept apart)

    config.log_every_steps = 50
    return config
