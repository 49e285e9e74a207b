"""Table 4, Sharma et al. 2018 ("Classification-Driven Dynamic Image Enhancement", CVPR 2018, pp. 4033-4041):
an enhancement network predicting per-pixel dynamic filters applied to the image's luminance, first
trained to emulate a fixed enhancement operator, then end to end with the classifier. The paper reports
82.27 % test accuracy for its reproduction on its data.

    python train.py --config configs/sharma2018.py --config.data.dir=FOLDER  (one sub-folder of images per class)

What is reimplemented (`urnet_jax.models.dynamic_enhancement`): a filter-generating encoder-decoder on the
luminance Y (BT.601 / JPEG YCbCr) predicts a 5 x 5 filter for every pixel; the dynamic local filtering
layer applies each pixel's filter to its neighbourhood of Y; the new Y is recombined with the unchanged
chroma. Choices where the paper is not specific enough: the filter-generating network is a U-shaped
encoder-decoder of width 16 and depth 3 (two 3x3 convs per level, strided-conv down, transposed-conv up,
skip concatenation, BatchNorm, LeakyReLU(0.01)), a size that fits these machines; a zero-initialised 1x1
head gives k * k weights per pixel, normalised to sum to one as delta + (raw - mean(raw)) (identity at
start; smoothing and sharpening both expressible); Y is edge-padded.

Phase 1: emulation of unsharp masking (`data.target="unsharp_mask"`: Y + (Y - Gaussian(sigma 1) * Y),
`urnet_jax.data.enhancement_operators`) with the pixel MSE; the paper trains emulators of several
operators (including weighted-least-squares smoothing and histogram equalisation, not provided here) and
reports the best; this config uses one, detail enhancement, the natural one for faint nuclei
(`guided_filter` and `bilateral` are the other choices of `data.target`). Phase 2: enhancer and classifier
trained end to end (`train.freeze_enhancer=False`). The classifier is the UR-Net protocol's ResNet101
(200 px, SGD lr 1e-4, batch 32, 100 + 200 epochs), so that this row differs from UR-Net's only in the
enhancer and its phase-1 target.
"""

from urnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model.enhancer = "dynamic_enhancement"
    config.model.enhancer_width = 0  # the registry's default: 16
    config.data.target = "unsharp_mask"
    return config
