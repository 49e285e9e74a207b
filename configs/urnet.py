"""UR-Net = Net4: ResNet101 + the UR-Net enhancer, enhancer pre-trained (the paper's protocol).

    python train.py --config configs/urnet.py --config.data.dir=FOLDER  (one sub-folder of images per class)

Like every paper-scale config it needs real images; configs/demo.py is a quick try on synthetic cells.
The kept weights are chosen on the validation split (train.select_on="val"); the paper chose them on
the test split: add --config.train.select_on=test to reproduce that selection.
"""

from urnet_jax.config import base_config


def get_config():
    return base_config()
