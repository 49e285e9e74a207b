"""The reproduction study on one GPU, closer to the paper: ResNet101 at 200 px on all of stained PBC.

    python -m urnet_jax.study run --config configs/study_gpu.py --out results/study_gpu --limit 1
    python -m urnet_jax.study run --config configs/study_gpu.py:/path/to/pbc --out ...  # data elsewhere

Same as the paper (section 3.3) except, for time (the device tool allows 10 minutes per command, so
every run must finish within one command; not yet timed on a GPU: time the first run and lower the
epochs if it does not fit):
- randomly initialised ResNet101: no ImageNet weights can be downloaded here;
- phase 1: 3 epochs, phase 2: 12 epochs (the paper: 100 and 200), constant lr 0.01 (the paper's 1e-4
  fine-tunes ImageNet weights for 200 epochs);
- bfloat16 compute (float32 weights).
The data: every PBC image (about 8,200 training originals after the 8:2 split), augmented offline to
train_size 10,000 as in the paper (minority classes up to 8 dihedral variants per image).
"""

import pathlib

from urnet_jax.config import base_config
from urnet_jax.study import ablation_models, study_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
PBC_DIR = CONFIG_DIR.parent.parent / "shared" / "data" / "pbc"  # ../shared/data/pbc from the repository root


def get_config(data_dir: str = ""):
    base = base_config()  # ResNet101, UR-Net enhancer width 64, 200 px, train_size 10000, batch 32
    base.data.dir = data_dir or str(PBC_DIR)
    base.pretrain.epochs = 3
    base.train.epochs = 12
    base.optimizer.lr = 0.01
    base.precision = "bfloat16"
    base.eval_batch_size = 256
    base.checkpoint.every_steps = 0
    base.checkpoint.keep = 1
    base.log_every_steps = 50
    return study_config(base, ablation_models(CONFIG_DIR), data_variants=("raw", "stainfree_proxy"),
                        seeds=(1, 2, 3))
