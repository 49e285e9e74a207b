"""A follow-up to configs/study_cpu.py: the same runs on the stain-free proxy, with the learning rate decayed.

    python -m urnet_jax.study run --config configs/study_cpu_cosine.py --out results/study_cpu_cosine \\
        --prepared results/study_cpu/_prepared

Under study_cpu's constant lr of 0.01, test accuracy swings by tens of points from epoch to epoch, so the
best-epoch numbers partly measure which epoch happened to land high. Here the lr follows a half cosine
from 0.01 to 0 over each phase (`optimizer.schedule` 'cosine'); everything else is study_cpu's protocol
(same subset, split, models, seeds and epochs), so the two studies differ in the schedule alone. Only the
stain-free proxy is run: it is the condition the paper's claims are about, and the CPU time of this
follow-up covers one data variant.
"""

import pathlib
import runpy

import ml_collections

STUDY_CPU = runpy.run_path(str(pathlib.Path(__file__).resolve().with_name("study_cpu.py")))


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    study = STUDY_CPU["get_config"](data_dir)
    study.base.optimizer.schedule = "cosine"
    study.base.pretrain.optimizer.schedule = "cosine"
    study.data_variants = ("stainfree_proxy",)
    study.baseline = "study_cpu"  # the report pairs each run with results/study_cpu/<same run name>
    return study
