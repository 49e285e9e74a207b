"""Table 4, Shahzad et al. 2021 (Complex Intell. Syst. 8:3143): fixed, non-learned contrast enhancement by
contrast-limited adaptive histogram equalisation (CLAHE), then a CNN. The paper reports 80.96 % test
accuracy for its reproduction on its data.

    python train.py --config configs/shahzad2021.py --config.data.dir=FOLDER  (one sub-folder of images per class)

What is reimplemented: CLAHE on every image that reaches the model (`data.preprocessing="clahe"`:
training, validation and test images when the data set is prepared, and images read by predict.py and
external evaluation, through `urnet_jax.data.transforms.model_input`), computed by scikit-image's
`exposure.equalize_adapthist` (`urnet_jax.data.clahe`). On an RGB image it equalises the V channel of HSV,
keeping hue and saturation; on the stain-free proxy (three equal channels) that is the grey level.
Parameters: clip limit 0.01 and tiles of 1/8 of the image side (scikit-image's defaults; Shahzad et al.
do not give theirs), `data.clahe_clip_limit` and `data.clahe_kernel_size` (pixels, 0 = 1/8 of the side).

Not reimplemented: their 4B-AdditionNet and the ant-colony feature selection are not described in enough
detail to rebuild. The CNN is the library's classifier, the UR-Net protocol's ResNet101 without an
enhancer (200 px, SGD lr 1e-4, batch 32, 200 epochs), so that this row differs from UR-Net's only in
the enhancement. There is no phase 1: CLAHE has nothing to learn.
"""

from urnet_jax.config import base_config


def get_config():
    config = base_config()
    config.model.enhancer = "none"
    config.pretrain.epochs = 0
    config.data.preprocessing = "clahe"
    config.data.clahe_clip_limit = 0.01
    config.data.clahe_kernel_size = 0
    return config
