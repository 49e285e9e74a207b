"""Net3: the UR-Net enhancer + ResNet101 without phase-1 pre-training (the paper's ablation)."""

from urnet_jax.config import base_config


def get_config():
    config = base_config()
    config.pretrain.epochs = 0
    return config
