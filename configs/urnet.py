"""UR-Net = Net4: ResNet101 + the UR-Net enhancer, enhancer pre-trained (the paper's protocol).

    python train.py --config configs/urnet.py --config.data.dir=FOLDER  (one sub-folder of images per class)

Like every paper-scale config it needs real images; configs/demo.py is a quick try on synthetic cells.
"""

from urnet_jax.config import base_config


def get_config():
    return base_config()
