"""Tuning phase 1's learning rate on the validation split: Net4 of configs/study_wbcatt.py (the paper's UR-Net
enhancer, sigmoid output, pre-trained to reproduce its input with AdamW) on `raw`, phase 1 only
(`train.epochs` 0), at a few learning rates, one candidate per model variant.

    python -m urnet_jax.study run --config configs/phase1_tuning.py --out results/phase1_tuning \\
        --prepared results/study_wbcatt/_prepared --delete-checkpoints
    python -m urnet_jax.study report results/phase1_tuning --out docs/RESULTS.md

Net4 - Net3 measures phase-1 pre-training only when phase 1 works: a study run whose kept enhancer ends below
`pretrain.min_psnr` (30 dB on the validation split) says so. The first setting, lr 2e-3, ended below it, so
two larger rates were tried. The rule: the candidate with the highest mean validation PSNR of the kept
enhancer among those at or above 30 dB (`target_rule` 'highest'; the range's upper end, 100 dB, is an MSE of
1e-10 and bounds nothing in practice). The report of this folder (`report: 'validation'`) shows validation
numbers only; a phase-1-only run has no classifier to test (its eval/phase1.json holds the kept phase-1 row).
The chosen rate is then copied into configs/study_wbcatt.py (`pretrain.optimizer.lr`).

Each candidate is net4-raw-seed1 of the study but for `train.epochs` and `pretrain.optimizer.lr`: it loads the
study's stand-in (`standins_dir`) like that run, though phase 1 never touches the classifier, and reads the
study's prepared `raw` data (--prepared). About 5 min per candidate on a 2-core CPU.
"""

import pathlib
import runpy

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
CANDIDATES = {"lr0_002": 2e-3, "lr0_01": 1e-2, "lr0_02": 2e-2}  # phase 1's AdamW learning rate


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    study = runpy.run_path(str(CONFIG_DIR / "study_wbcatt.py"))["get_config"](data_dir)
    net4 = study.models["net4"].to_dict()
    return ml_collections.ConfigDict({
        "base": study.base,
        "models": {name: {**net4, "train": {"epochs": 0}, "pretrain": {"optimizer": {"lr": lr}}}
                   for name, lr in CANDIDATES.items()},
        "data_variants": ("raw",), "seeds": (1,), "data_seeds": (1,), "subset_per_class": 0, "baseline": "",
        "pretrained_classifier": study.pretrained_classifier, "standins_dir": "results/study_wbcatt",
        "report": "validation", "tuning_metric": "phase1_psnr", "target_range": (30.0, 100.0),
        "target_rule": "highest"})
