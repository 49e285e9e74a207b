"""The reproduction study on a 2-core CPU: Net1-Net4 x {raw, stainfree_proxy} x seeds 1-3 on stained PBC.

    python -m urnet_jax.study run --config configs/study_cpu.py --out results/study_cpu
    python -m urnet_jax.study run --config configs/study_cpu.py:/other/pbc --out results/study_cpu  # data elsewhere

A reduced protocol (every deviation from the paper is listed in docs/RESULTS.md):
- ResNet18 (torchvision width) instead of ResNet101, randomly initialised (the study runs without network
  access, so without ImageNet weights); UR-Net/ResUNet enhancer width 8 (8-16-32-64-128 channels) instead of 64.
- 96 px instead of 200 px (ResNet18's deepest feature map is 3x3).
- A class-balanced subset of PBC: 625 images per class drawn once (seeded by data.seed), split 8:2 ->
  about 500 training and 125 test images per class; train_size 1500 (the originals: no offline
  augmentation is needed to balance them, and there is no time for more images).
- Phase 1: 3 epochs; phase 2: 10 epochs (the paper: 100 and 200), SGD momentum 0.9, batch 32, constant
  lr 0.01 (the paper's 1e-4 fine-tunes ImageNet weights for 200 epochs; from scratch in 10 epochs it
  would barely move); phase 1 with the same optimiser settings.
- Model selection on the test split (`train.select_on` 'test', the paper's protocol): the kept checkpoints
  are the epochs of highest test accuracy and lowest test MSE. configs/study_wbcatt.py selects on a
  validation split instead.
"""

import pathlib
import runpy

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
PBC_DIR = CONFIG_DIR.parent.parent / "shared" / "data" / "pbc"  # ../shared/data/pbc from the repository root
# The paper's ablation as overrides of its protocol (Net4, configs/net4.py): what configs/net1.py..net3.py
# change in it.
ABLATION_MODELS = {
    "net1": {"model": {"enhancer": "none"}, "pretrain": {"epochs": 0}},  # the classifier alone
    "net2": {"model": {"enhancer": "resunet"}, "pretrain": {"epochs": 0}},  # a plain ResUNet, not pre-trained
    "net3": {"pretrain": {"epochs": 0}},  # the UR-Net enhancer, not pre-trained
    "net4": {},  # the full UR-Net
}


def config_file(name: str, *args: str) -> ml_collections.ConfigDict:
    """get_config(*args) of configs/<name>.py, read by path (the configs folder is not a package)."""
    return runpy.run_path(str(CONFIG_DIR / f"{name}.py"))["get_config"](*args)


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    base = config_file("net4")  # the paper's protocol, reduced below
    base.model.classifier = "resnet18"
    base.model.classifier_width = 0
    base.model.enhancer_width = 8
    base.data.dir = data_dir or str(PBC_DIR)
    base.data.image_size = 96
    base.data.train_size = 1500
    base.pretrain.epochs = 3
    base.train.epochs = 10
    base.optimizer.lr = 0.01
    base.pretrain.optimizer.lr = 0.01  # phase 1 used the same optimiser settings as phase 2
    base.train.select_on = "test"  # the paper's protocol: best and pretrain_best chosen on the test split
    base.batch_size = 32
    base.eval_batch_size = 64
    base.checkpoint.every_steps = 0  # a checkpoint at every epoch end (an epoch takes a few minutes)
    base.checkpoint.keep = 1
    base.log_every_steps = 10
    return ml_collections.ConfigDict({
        "base": base, "models": ABLATION_MODELS, "data_variants": ("raw", "stainfree_proxy"), "seeds": (1, 2, 3),
        "subset_per_class": 625, "baseline": ""})
