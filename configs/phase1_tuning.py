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


def tuning_study(model: str, data_variant: str, candidates: dict[str, float], target_range: tuple[float, float],
                 data_dir: str = "", seed: int = 1) -> ml_collections.ConfigDict:
    """Phase-1-only runs of `model`-`data_variant`-seed<seed> of configs/study_wbcatt.py (its data seed and
    stand-in), one per AdamW learning rate of `candidates` (name -> lr); the highest validation PSNR inside
    `target_range` (dB) is chosen."""
    study = runpy.run_path(str(CONFIG_DIR / "study_wbcatt.py"))["get_config"](data_dir)
    overrides = study.models[model].to_dict()
    data_seed = dict(zip(study.seeds, study.data_seeds))[seed]
    return ml_collections.ConfigDict({
        "base": study.base,
        "models": {name: {**overrides, "train": {**overrides.get("train", {}), "epochs": 0},
                          "pretrain": {**overrides.get("pretrain", {}), "optimizer": {"lr": lr}}}
                   for name, lr in candidates.items()},
        "data_variants": (data_variant,), "seeds": (seed,), "data_seeds": (data_seed,), "subset_per_class": 0,
        "baseline": "", "pretrained_classifier": study.pretrained_classifier, "standins_dir": "results/study_wbcatt",
        "report": "validation", "tuning_metric": "phase1_psnr", "target_range": target_range,
        "target_rule": "highest"})


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    return tuning_study("net4", "raw", CANDIDATES, (30.0, 100.0), data_dir)
