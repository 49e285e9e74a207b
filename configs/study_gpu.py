"""The reproduction study on one GPU, closer to the paper in model and image size: ResNet101 at 200 px.

    python -m urnet_jax.study run --config configs/study_gpu.py --out results/study_gpu --only 'net[14]-raw-seed1'
    python -m urnet_jax.study run --config configs/study_gpu.py:/path/to/pbc --out ...  # data elsewhere
    python -m urnet_jax.study run --config configs/study_gpu.py --config.subset_per_class=0 ...  # all of PBC

Same as the paper (section 3.3) in the networks (UR-Net enhancer width 64, ResNet101), the image size
(200 px), the batch (32) and SGD momentum 0.9. It departs from the paper in these ways:
- the classifier is randomly initialised: the study runs on machines without network access, so
  without ImageNet weights;
- the images are the 625-per-class subset of stained PBC that configs/study_cpu.py draws (same seed,
  so the same files and the same 8:2 split): about 35 MB of JPEGs, quick to copy to a GPU machine
  beside the code, where all of PBC is 191 MB;
- phase 1 runs 3 epochs and phase 2 runs 10 (the paper: 100 and 200), at a constant lr of 0.01 (the
  paper's 1e-4 fine-tunes ImageNet weights over 200 epochs). These are the CPU study's schedule, so the
  two protocols differ only in network size, image size and precision;
- compute is bfloat16, with float32 weights.
"""

import pathlib
import runpy

import ml_collections

STUDY_CPU = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("study_cpu.py")))


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    base = STUDY_CPU["config_file"]("net4")  # ResNet101, UR-Net enhancer width 64, 200 px, batch 32
    base.data.dir = data_dir or str(STUDY_CPU["PBC_DIR"])
    base.data.train_size = 1500
    base.pretrain.epochs = 3
    base.train.epochs = 10
    base.optimizer.lr = 0.01
    base.pretrain.optimizer.lr = 0.01  # phase 1 used the same optimiser settings as phase 2
    base.train.select_on = "test"  # the paper's protocol: best and pretrain_best chosen on the test split
    base.precision = "bfloat16"
    base.eval_batch_size = 128
    base.checkpoint.every_steps = 0
    base.checkpoint.keep = 1
    base.log_every_steps = 10
    return ml_collections.ConfigDict({
        "base": base, "models": STUDY_CPU["ABLATION_MODELS"], "data_variants": ("raw", "stainfree_proxy"),
        "seeds": (1, 2, 3), "subset_per_class": 625, "baseline": ""})
