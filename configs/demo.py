"""A tiny UR-Net on the built-in synthetic data: trains and evaluates on a 2-core CPU in a few minutes.

    python train.py --config configs/demo.py

Same two-phase schedule as configs/urnet.py, with the widths divided by 8, 96 px images, 600 training
images and a higher learning rate (the paper's 1e-4 needs its 300 epochs).
"""

from urnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model.enhancer_width = 8
    config.model.classifier = "resnet18"
    config.model.classifier_width = 8
    config.data.image_size = 96
    config.data.synthetic_per_class = 80
    config.data.train_size = 600
    config.pretrain.epochs = 2
    config.train.epochs = 4
    config.batch_size = 32
    config.eval_batch_size = 64
    config.optimizer.lr = 0.02
    config.checkpoint.every_steps = 10
    config.log_every_steps = 5
    return config
