"""End to end: each Table 4 comparison method's config (configs/jeon2022.py, shahzad2021.py,
huang2018_rsgunet.py, sharma2018.py), scaled down, trains and evaluates on tiny synthetic data."""

from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest

from urnet_jax import config as config_lib, sharding, train_state, trainer
from urnet_jax.cli import load_config_file
from urnet_jax.checkpointing import CheckpointStore
from urnet_jax.evaluation.runner import evaluate_run
from urnet_jax.workdir import load_run
from tiny_run import REPO_ROOT, TINY

METHODS = ("jeon2022", "shahzad2021", "huang2018_rsgunet", "sharma2018")
# The paper-scale configs shrunk like tests/tiny_run.py's TINY, one epoch per phase.
SHRINK = {**TINY, "data.synthetic_per_class": 8, "data.train_size": 32, "pretrain.epochs": 1, "train.epochs": 1,
          "checkpoint.every_steps": 0}


def method_config(name: str, **changes):
    """configs/<name>.py with SHRINK and `changes` applied, validated."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO_ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in {**SHRINK, **changes}.items():
        section, _, key_name = key.rpartition(".")
        (config[section] if section else config)[key_name] = value
    if config.model.enhancer == "none":
        config.pretrain.epochs = 0
    return config_lib.validate(config)


def test_paper_configs_need_a_data_folder_and_describe_their_method():
    for name in METHODS:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert "reimplemented" in module.__doc__
        with pytest.raises(config_lib.ConfigError, match="data.dir is not set"):
            config_lib.validate(module.get_config(), device_count=1)


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_and_evaluates(name, tmp_path):
    config = method_config(name)
    rows = trainer.train_and_evaluate(config, tmp_path, show_progress=False)
    phases = [row["phase"] for row in rows]
    assert phases == ([1, 2] if config.model.enhancer != "none" else [2])
    metrics = evaluate_run(tmp_path, progress=False)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["enhancer"] == config.model.enhancer
    assert (tmp_path / "eval" / "enhanced.png").is_file() and (tmp_path / "eval" / "gradcam.png").is_file()
    report = (tmp_path / "eval" / "report.md").read_text()
    if name == "shahzad2021":  # the figure shows the images after CLAHE, and says so
        assert "fixed CLAHE step" in report
    elif config.model.enhancer != "none":
        assert "the enhancer's output that the classifier sees" in report
    if name == "huang2018_rsgunet":
        check_frozen_enhancer(tmp_path, config)


def check_frozen_enhancer(workdir, config):
    """RSGUNet: the phase-2 weights' enhancer is the phase-1 best exactly (frozen), the classifier moved."""
    model, mesh = train_state.build(config, 3), sharding.data_mesh()
    target = sharding.with_sharding(train_state.abstract_variables(model, ("enhancer",), config.data.image_size),
                                    sharding.replicated(mesh))
    store = CheckpointStore(workdir / "checkpoints" / "pretrain_best", for_writing=False)
    phase1 = store.restore_latest(lambda meta: target).state
    store.close()
    phase2 = load_run(workdir, "best").variables
    assert "batch_stats" not in phase1 or "enhancer" not in phase1["batch_stats"]  # RSGUNet has no BatchNorm
    equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                         phase1["params"]["enhancer"], phase2["params"]["enhancer"])
    assert all(jax.tree.leaves(equal))
    init_key, _ = train_state.init_keys(config.seed)  # the key the run initialised its classifier from
    fresh = train_state.init_variables(model, ("classifier",), config.data.image_size, init_key)
    moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                         fresh["params"]["classifier"], phase2["params"]["classifier"])
    assert any(jax.tree.leaves(moved))


@pytest.mark.parametrize("name", METHODS)
def test_demo_config_scales_each_method_to_the_synthetic_quick_try(name):
    """`configs/demo.py:NAME` keeps the method (enhancer, preprocessing, phase-1 target, freezing) at demo scale."""
    method = load_config_file(str(REPO_ROOT / "configs" / f"{name}.py"))
    demo = config_lib.validate(load_config_file(str(REPO_ROOT / "configs" / f"demo.py:{name}")), device_count=1)
    kept = ("model.enhancer", "data.preprocessing", "data.target", "data.variant", "pretrain.loss",
            "train.freeze_enhancer")
    assert {key: demo[key.split(".")[0]][key.split(".")[1]] for key in kept} == {
        key: method[key.split(".")[0]][key.split(".")[1]] for key in kept}
    assert (demo.data.allow_synthetic, demo.data.image_size, demo.model.classifier_width) == (True, 96, 8)
