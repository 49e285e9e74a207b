"""UR-Net = Net4: ResNet101 + the UR-Net enhancer, enhancer pre-trained (the paper's protocol)."""

from urnet_jax.config import base_config


def get_config():
    return base_config()
