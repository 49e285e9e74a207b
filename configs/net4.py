"""Net4: the full UR-Net (UR-Net enhancer pre-trained, then joint training); same as urnet.py."""

from urnet_jax.config import base_config


def get_config():
    return base_config()
