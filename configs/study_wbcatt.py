"""The study of docs/RESULTS.md's decision rule: does joint enhancement help a pretrained classifier on
low-contrast cells? Selection on validation, a pretrained-classifier stand-in, paired statistics.

    python -m urnet_jax.study run --config configs/study_wbcatt.py --out results/study_wbcatt \\
        --only 'net*-raw-*' --only 'c*-raw-*' --delete-checkpoints   # the core models (and controls) first
    python -m urnet_jax.study run --config configs/study_wbcatt.py --out results/study_wbcatt \\
        --only '*-raw-*' --delete-checkpoints                           # then the other models of that variant
    python -m urnet_jax.study report results/study_wbcatt --out docs/RESULTS.md
    python -m urnet_jax.study run --config configs/study_wbcatt.py:/other/pbc ...   # PBC elsewhere

Data: PBC through the published WBCAtt split (`data.split_dir`: 6169 train / 1030 validation / 3099 test
images), mapped to 3 classes (granulocyte, monocyte, lymphocyte). The training split is halved
(`data.partition`, stratified and seeded by `data.seed`): the stand-in classifier (configs/pretrain_standin.py,
ResNet18 on the 5 folder classes of the stained images) trains on half "a", every study run on half "b", so
no image is seen by both stages. Two seed groups (`data_seeds`): seeds 1-3 use data seed 1, seeds 4-5 data
seed 2, so two different halvings and two stand-ins; the runner trains each stand-in first
(results/study_wbcatt/standin_dataseed<k>/) and starts every run of its group from it.

Variants: `raw` (stained), `stainfree_proxy`, `severe_proxy` (its strength `data.severe_*` tuned on the
validation split with configs/severe_tuning.py until Net1's validation balanced accuracy lands in 65-75%,
never on test: contrast 12-26%, defocus 1.25-2.25 px at 200 px, noise 0.015-0.035). Models (first minus second in the
`comparisons` below):
- net1: the stand-in classifier alone, fine-tuned;
- net3: + the UR-Net enhancer (width 8) started at the identity (`enhancer_output` 'residual': zero head),
  no phase 1;
- net4: + the paper's UR-Net enhancer (sigmoid output) pre-trained to reproduce its input (phase 1, its own
  AdamW optimiser; a run below `pretrain.min_psnr` 30 dB says so). Net4 - Net3: does phase-1 pre-training
  matter beyond starting at the identity. Phase 1's learning rate, 2e-2, is the choice of
  configs/phase1_tuning.py (phase-1-only runs of net4-raw-seed1's config, read on the validation split's
  PSNR; docs/RESULTS.md gives its table);
- conv_frontend: the extra-layers control: a plain 5-layer convolutional front end, sigmoid output (the
  residual output is for the U-shaped enhancers only), no phase 1. Its width, 20, makes its compute per
  image (about 0.11 GMAC at 96 px, all at full resolution) of the order of the UR-Net enhancer's, with
  about 12 thousand parameters against UR-Net's 567 thousand. The parameter-matched width 144
  (`conv_frontend.width_matching_urnet(8)`) costs about 5 GMAC per image, 15x ResNet18: it did not finish
  one benchmark step within 15 min on this CPU (width 48 trained at 0.7 images/s). On a GPU, run it with
  --config.models.conv_frontend.model.enhancer_width=144;
- clahe: the fixed-enhancement control (Shahzad et al. 2021, configs/shahzad2021.py: CLAHE before the
  classifier, no learned enhancer);
- rsgunet, dynamic_enhancement: Table 4's learned enhancers (configs/huang2018_rsgunet.py,
  configs/sharma2018.py) with this study's classifier and phase-1 budget; RSGUNet's phase 1 (proxy -> stained
  pairs) at AdamW 1e-3, chosen on validation by configs/phase1_tuning_rsgunet.py;
- net4_stained: the paired-target control for RSGUNet: Net4 whose phase 1 maps each image to the stained original
  of the same cell (RSGUNet's target, `data.target` 'stained') instead of reproducing its input, then trains
  jointly with the classifier as Net4 does. Net4_stained - Net4: do paired clean targets help UR-Net; RSGUNet -
  Net4_stained: is RSGUNet's gain its network (and frozen enhancer) or its targets. Only the proxies have
  stained targets that differ from the input (on `raw` it would repeat Net4), so the study runs it on the
  proxies only (`model_data_variants`). Phase 1's learning rate, the base's 2e-2, is the choice of
  configs/phase1_tuning_net4_stained.py on validation.

Protocol: ResNet18 (torchvision width, as the stand-in) at 96 px, batch 32, SGD momentum 0.9 lr 0.01 with
150 warm-up steps then cosine to 0, gradient-norm clipping at 1.0, weight decay 1e-4, online random flips
and 90-degree rotations, the training originals only (no offline augmentation), 4 epochs of joint
training (fine-tuning a pretrained classifier), phase 1 of 3 epochs (Net4, RSGUNet, dynamic enhancement),
model selection on the validation split, test evaluated at the selected and the last epoch.

Sizing and cost (2-core CPU). Measured with bench/train_step.py at 96 px, batch 32, train step only, on a
2-core Intel Xeon with AVX-512 (JAX 0.10): ResNet18 alone trains at about 48 images/s; with the UR-Net
enhancer of width 8, 27; with RSGUNet and with dynamic enhancement (width 16), 35 and 19 (the same benchmark
gave 21, 15.5, 3.3 and 2.7 images/s before the library compiled CPU programs without YNNPACK's convolutions).
At 64 px the same networks are 10x slower (3x3 convolutions on 2x2 maps), so 96 px is the smallest usable
size. Half the training split is about 3080 images (2299 granulocytes, 414 monocytes, 368 lymphocytes).
Measured training time of the committed runs (sum of their epochs in metrics.jsonl, validation and test
logging included, the final evaluation on the 3099 test images adds about 1 min): Net1 and CLAHE 5-6 min (one
CLAHE run on a shared machine 12.6 min), Net3 and `conv_frontend` 9-11 min, Net4 12-14 min with its 3 phase-1
epochs; about 45 min per seed for the five core models, so 5 seeds take about 4 hours per data variant.
RSGUNet took 20-33 min and dynamic enhancement 39-61 min a run with their 3 phase-1 epochs while two runs shared the
2 cores (alone, their step times give about 12 and 20 min; one dynamic enhancement run alone took 21 min), and
`net4_stained` 27-31 min shared, its data preparation included. On a 2-core AMD EPYC with AVX2 (no AVX-512) the
runs took about 3x longer (Net1 17 min with data preparation, CLAHE 16, Net3 24, Net4 31, the stand-in 47).
Preparing the 10298 WBCAtt images at 96 px takes a few minutes once per data variant (and per model that
changes data.*, such as RSGUNet's stained targets). Each stand-in (15 epochs on half "a") takes 20-40 min,
once per data seed.
"""

import pathlib
import runpy

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
PBC_DIR = CONFIG_DIR.parent.parent / "shared" / "data" / "pbc"  # ../shared/data/pbc from the repository root
# What each model variant changes in the study's base (Net3: the UR-Net enhancer, residual, no phase 1).
MODELS = {
    "net1": {"model": {"enhancer": "none"}, "pretrain": {"epochs": 0}},
    "net3": {"pretrain": {"epochs": 0}},
    "net4": {"model": {"enhancer_output": "sigmoid"}},
    "conv_frontend": {"model": {"enhancer": "conv_frontend", "enhancer_width": 20, "enhancer_output": "sigmoid"},
                      "pretrain": {"epochs": 0}},
    "clahe": {"model": {"enhancer": "none"}, "pretrain": {"epochs": 0},
              "data": {"preprocessing": "clahe", "clahe_clip_limit": 0.01, "clahe_kernel_size": 0}},
    # Phase 1's learning rate: the choice of configs/phase1_tuning_rsgunet.py (the base's 2e-2 saturated every output).
    "rsgunet": {"model": {"enhancer": "rsgunet", "enhancer_width": 0, "enhancer_output": "sigmoid"},
                "data": {"target": "stained"}, "pretrain": {"loss": "rsgunet", "optimizer": {"lr": 1e-3}},
                "train": {"freeze_enhancer": True}},
    "dynamic_enhancement": {"model": {"enhancer": "dynamic_enhancement", "enhancer_width": 0,
                                      "enhancer_output": "sigmoid"},
                            "data": {"target": "unsharp_mask"}},
    # RSGUNet's paired targets with UR-Net and joint training: Net4 whose phase 1 maps each image to its stained
    # original. Phase 1's learning rate: the base's 2e-2, which configs/phase1_tuning_net4_stained.py chose.
    "net4_stained": {"model": {"enhancer_output": "sigmoid"}, "data": {"target": "stained"}},
}
# The paired comparisons of the report (first minus second); DECISION_RULE reads the first three.
COMPARISONS = (("net4", "net1"), ("net4", "conv_frontend"), ("net4", "clahe"), ("net3", "net1"), ("net4", "net3"),
               ("conv_frontend", "net1"), ("clahe", "net1"), ("rsgunet", "net1"), ("dynamic_enhancement", "net1"),
               ("net4_stained", "net1"), ("net4_stained", "net4"), ("rsgunet", "net4_stained"))

# docs/RESULTS.md's decision rule, written before the study's runs; the report applies it to each data variant.
DECISION_RULE = {"effect": ("net4", "net1"), "controls": (("net4", "conv_frontend"), ("net4", "clahe")),
                 "metric": "balanced_accuracy", "epoch": "selected", "margin": 1.5, "min_seeds": 5,
                 "claim_variants": ("stainfree_proxy", "severe_proxy")}


def config_file(name: str, *args: str) -> ml_collections.ConfigDict:
    """get_config(*args) of configs/<name>.py, read by path (the configs folder is not a package)."""
    return runpy.run_path(str(CONFIG_DIR / f"{name}.py"))["get_config"](*args)


def get_config(data_dir: str = "") -> ml_collections.ConfigDict:
    data_dir = data_dir or str(PBC_DIR)
    standin = config_file("pretrain_standin", data_dir)
    base = config_file("net4")  # the paper's protocol, changed below
    base.model.classifier = standin.model.classifier  # the stand-in's architecture, so its weights load
    base.model.classifier_width = standin.model.classifier_width
    base.model.enhancer_width = 8
    base.model.enhancer_output = "residual"
    base.data.dir = data_dir
    base.data.split_dir = standin.data.split_dir
    base.data.partition = "b"
    base.data.image_size = standin.data.image_size
    base.data.train_size = 0  # the originals of half "b" only
    base.data.online_augment = True
    # The severe proxy's strength: candidate 'mild' of configs/severe_tuning.py, chosen on the validation split.
    base.data.severe_contrast = (0.12, 0.26)
    base.data.severe_blur_sigma = (1.25, 2.25)
    base.data.severe_noise_std = (0.015, 0.035)
    base.pretrain.epochs = 3
    base.pretrain.optimizer.name = "adamw"
    base.pretrain.optimizer.lr = 2e-2  # chosen on validation PSNR (docstring)
    base.pretrain.optimizer.schedule = "cosine"
    base.pretrain.optimizer.warmup_steps = 50
    base.train.epochs = 4
    base.train.select_on = "val"
    base.optimizer.lr = 0.01
    base.optimizer.schedule = "cosine"
    base.optimizer.warmup_steps = 150
    base.optimizer.clip_norm = 1.0
    base.optimizer.weight_decay = 1e-4
    base.batch_size = 32
    base.eval_batch_size = 64
    base.checkpoint.every_steps = 0  # a checkpoint at every epoch end: 'latest' is the last epoch's weights
    base.checkpoint.keep = 1
    base.log_every_steps = 10
    # The XLA options of the study's first runs (and of the stand-in digests they recorded): faster option sets
    # change float rounding, and with it every run's trajectory (`urnet_jax.compiler_options`).
    standin.xla_cpu_options = base.xla_cpu_options = "no_ynnpack"
    return ml_collections.ConfigDict({
        "base": base, "models": MODELS, "data_variants": ("raw", "stainfree_proxy", "severe_proxy"),
        "model_data_variants": {"net4_stained": ("stainfree_proxy", "severe_proxy")},
        "seeds": (1, 2, 3, 4, 5), "data_seeds": (1, 1, 1, 2, 2), "subset_per_class": 0, "baseline": "",
        "pretrained_classifier": standin, "comparisons": COMPARISONS,
        "decision_rule": DECISION_RULE})
