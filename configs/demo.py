"""A tiny UR-Net on the built-in synthetic data: trains and evaluates on a 2-core CPU in a few minutes.

    python train.py --config configs/demo.py
    python train.py --config configs/demo.py:sharma2018 --workdir runs/demo-sharma2018   # a Table 4 method

Same two-phase schedule and model family as configs/urnet.py, scaled down: UR-Net enhancer of width 8
(8-16-32-64-128 channels), ResNet18 with every width divided by 8, 96 px images, 480 training images,
2 pre-training + 5 joint epochs. AdamW at 2e-3 replaces the paper's SGD at 1e-4, which needs its 300
epochs; SGD at a rate high enough for 7 epochs moves these tiny nets' weights faster than BatchNorm's
running statistics follow, and the test accuracy (measured with those statistics) swings between epochs.

With an argument (`configs/demo.py:NAME`), the same scaling is applied to `configs/NAME.py` (e.g. one of the
Table 4 methods: jeon2022, shahzad2021, huang2018_rsgunet, sharma2018), so each method runs end to end on
the synthetic cells in a few minutes; its classifier becomes the tiny ResNet18 too.
"""

import pathlib
import runpy

import ml_collections

from urnet_jax.config import base_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parent


def get_config(method: str = "") -> ml_collections.ConfigDict:
    config = runpy.run_path(str(CONFIG_DIR / f"{method}.py"))["get_config"]() if method else base_config()
    config.model.enhancer_width = 8
    config.model.classifier = "resnet18"
    config.model.classifier_width = 8
    config.data.allow_synthetic = True  # data.dir stays empty: the built-in synthetic cells
    config.data.image_size = 96
    config.data.synthetic_per_class = 80
    config.data.train_size = 480
    config.pretrain.epochs = 2
    config.train.epochs = 5
    config.batch_size = 32
    config.eval_batch_size = 48
    config.optimizer.name = "adamw"
    config.optimizer.lr = 2e-3
    config.pretrain.optimizer.name = "adamw"  # phase 1's optimiser: the same
    config.pretrain.optimizer.lr = 2e-3
    config.log_every_steps = 5
    if config.model.enhancer == "none":
        config.pretrain.epochs = 0
    return config
