"""Table 4, Jeon et al. 2022 (Anal. Chem. 94:6394): classification of label-free white blood cells without
any enhancement. The paper reports 81.44 % test accuracy for its reproduction on its data.

    python train.py --config configs/jeon2022.py --config.data.dir=FOLDER  (one sub-folder of images per class)

What is reimplemented: a fine-tuned ResNet-50 on the raw images, as in the same group's earlier label-free
work (Sensors 2021), which the Anal. Chem. paper builds on. The approximation: Jeon et al.'s own pipeline
(their acquisition-specific preprocessing and training schedule) is not described enough to rebuild; what
is kept is the architecture class (an ImageNet ResNet-50, torchvision layout, fine-tuned end to end) and
the absence of an enhancer. Everything else is the UR-Net protocol of configs/urnet.py (200 px images,
SGD lr 1e-4 momentum 0.9, batch 32, 200 epochs), so that the rows of Table 4 differ only in the method.
No phase 1 (there is no enhancer). Start from ImageNet weights with --config.model.pretrained=resnet50.pth
(the torchvision IMAGENET1K_V1 file, see `python -m urnet_jax.port`): "fine-tuned" presumes them.
"""

from urnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model.enhancer = "none"
    config.model.classifier = "resnet50"
    config.pretrain.epochs = 0
    return config
