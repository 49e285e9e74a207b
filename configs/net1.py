"""Net1: ResNet101 alone, no enhancement (the paper's ablation)."""

from urnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model.enhancer = "none"
    config.pretrain.epochs = 0
    return config
