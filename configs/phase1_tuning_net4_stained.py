"""Tuning the paired-target control's phase-1 learning rate on the validation split: `net4_stained` of
configs/study_wbcatt.py (the UR-Net enhancer, sigmoid output, trained to map each `severe_proxy` image to the
stained original of the same cell with MSE, then trained jointly with the classifier) on `severe_proxy`, phase 1
only (`train.epochs` 0), one candidate per AdamW learning rate.

    python -m urnet_jax.study run --config configs/phase1_tuning_net4_stained.py \\
        --out results/phase1_tuning_net4_stained --prepared results/study_wbcatt/_prepared --delete-checkpoints
    python -m urnet_jax.study report results/phase1_tuning_net4_stained --out docs/RESULTS.md

Why: the study's phase-1 rate, 2e-2, was chosen for Net4 reproducing its input (configs/phase1_tuning.py);
mapping a low-contrast, blurred, noisy image to a stained one is another task, and RSGUNet's phase 1 on the
same pairs saturated at that rate. The candidates are phase1_tuning.py's grid.

The rule, written before these runs: the candidate with the highest mean validation PSNR of the kept enhancer
(to the stained target), at any level (`target_range` 0-100 dB), as for RSGUNet. The candidates are the study's
seed-4 run (data seed 2 and its stand-in; phase 1 never touches the classifier) and read the study's prepared
`severe_proxy` data with stained targets (link `_prepared/severe_proxy-dataseed2-<candidate>` to
`_prepared/severe_proxy-dataseed2-rsgunet`, or let them prepare their own). About 4 min per candidate on a
2-core CPU.
"""

import pathlib
import runpy

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
CANDIDATES = {"lr0_002": 2e-3, "lr0_01": 1e-2, "lr0_02": 2e-2}  # phase 1's AdamW learning rate


def get_config(data_dir: str = ""):
    tuning_study = runpy.run_path(str(CONFIG_DIR / "phase1_tuning.py"))["tuning_study"]
    return tuning_study("net4_stained", "severe_proxy", CANDIDATES, (0.0, 100.0), data_dir, seed=4)
