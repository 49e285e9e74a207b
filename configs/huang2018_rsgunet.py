"""Table 4, Huang et al. 2018, RSGUNet ("Range Scaling Global U-Net for Perceptual Image Enhancement on
Mobile Devices", ECCV 2018 workshops): a perceptual enhancer trained separately, then frozen while the
classifier trains on its outputs. The paper reports 81.79 % test accuracy for its reproduction on its data.

    python train.py --config configs/huang2018_rsgunet.py --config.data.dir=FOLDER  (stained images per class)

What is reimplemented (`urnet_jax.models.rsgunet`, after the authors' public TensorFlow code): a U-Net
of width 16 and depth 4 (16-32-64-128, the authors' network) with a global-feature branch (global average
pooling of the deepest map, a dense layer, tiled and concatenated) and the range scaling layer (the
decoder output multiplies the input features element-wise); LeakyReLU(0.2), no normalisation.
Departures: torch-style symmetric padding, any image size, and a sigmoid output in [0, 1] instead of the
authors' tanh * 0.58 + 0.52.

Phase 1 (`pretrain.loss="rsgunet"`, `urnet_jax.models.rsgunet_losses`): the authors' loss as far as it
fits, with their ratios (L1 at 1): L1 + 2/3 (1 - SSIM) + 2/15 TV, plus a VGG16 perceptual term when
`pretrain.perceptual_vgg` names ImageNet VGG16 weights (off by default: it needs the download). Single-
scale SSIM replaces 5-scale MS-SSIM (which needs >= 176 px images); VGG16 replaces VGG-19; the
adversarial texture loss is left out. Training pairs: `data.variant="stainfree_proxy"` with
`data.target="stained"`, i.e. each degraded proxy image is mapped to the original stained image of the
same cell (pairs exist by construction). On `data.variant="raw"` the stained target is the input itself,
so phase 1 trains RSGUNet on the identity (kept, rather than skipping the enhancer, so the model is the
same on both variants). To compare with the other rows of Table 4, run them on the same variant
(--config.data.variant). Phase 1 selects the enhancer with the lowest validation MSE to its target.

Phase 2 (`train.freeze_enhancer=True`): the enhancer is frozen (inference mode, no gradient, no update)
and only the classifier trains on its outputs, as the method prescribes (enhancement for human perception,
separate from classification). The classifier is the UR-Net protocol's ResNet101 (200 px, SGD lr 1e-4,
batch 32, 100 + 200 epochs), so that this row differs from UR-Net's only in the enhancer and its training.
"""

from urnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model.enhancer = "rsgunet"
    config.model.enhancer_width = 0  # the registry's default: 16, the authors' width
    config.data.variant = "stainfree_proxy"
    config.data.target = "stained"
    config.pretrain.loss = "rsgunet"
    config.train.freeze_enhancer = True
    return config
