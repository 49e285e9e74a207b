"""Net2: the unmodified ResUNet + ResNet101, enhancer not pre-trained (the paper's ablation)."""

from urnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model.enhancer = "resunet"
    config.pretrain.epochs = 0
    return config
