"""Net4: the full UR-Net (UR-Net enhancer pre-trained, then joint training), defined in configs/urnet.py."""

import pathlib

from urnet_jax.cli import load_config_file


def get_config():
    return load_config_file(str(pathlib.Path(__file__).resolve().with_name("urnet.py")))
