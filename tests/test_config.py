"""The config files match the paper, `config.validate` rejects bad values, and train.py fails in one line."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from urnet_jax import cli, config as config_lib, errors, workdir
from urnet_jax.config import base_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


def load(name: str):
    return cli.load_config_file(str(CONFIGS / f"{name}.py"))


PAPER_CONFIGS = ["urnet", "net1", "net2", "net3", "net4"]


def with_data_dir(config, data_dir: pathlib.Path):
    config.data.dir = str(data_dir)
    return config


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_config_is_valid_with_a_data_folder(name, tmp_path):
    config_lib.validate(with_data_dir(load(name), tmp_path), device_count=1)


def test_the_demo_config_is_valid_on_synthetic_data():
    config = config_lib.validate(load("demo"), device_count=1)
    assert config.data.dir == "" and config.data.allow_synthetic


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_without_a_data_folder_ask_for_one(name):
    # The paper-scale model on synthetic cells would take hours per epoch on a CPU: never by accident.
    with pytest.raises(errors.ConfigError) as error:
        config_lib.validate(load(name), device_count=1)
    message = str(error.value)
    assert message.startswith("data.dir is not set: pass --config.data.dir=FOLDER") and "configs/demo.py" in message


def test_urnet_is_the_papers_protocol():
    config = load("urnet")
    assert config.to_dict() == load("net4").to_dict()
    assert (config.model.enhancer, config.model.classifier, config.model.enhancer_width) == ("urnet", "resnet101", 64)
    assert (config.optimizer.name, config.optimizer.lr, config.optimizer.momentum) == ("sgd", 1e-4, 0.9)
    phase1 = config.pretrain.optimizer
    assert (phase1.name, phase1.lr, phase1.momentum, phase1.clip_norm) == ("sgd", 1e-4, 0.9, 0.0)
    assert config.model.enhancer_output == "sigmoid" and config.optimizer.clip_norm == 0.0
    assert (config.batch_size, config.pretrain.epochs, config.train.epochs, config.data.image_size) == (32, 100, 200, 200)


@pytest.mark.parametrize("name, enhancer, pretrain_epochs", [
    ("net1", "none", 0), ("net2", "resunet", 0), ("net3", "urnet", 0), ("net4", "urnet", 100)])
def test_ablation_configs_match_the_paper(name, enhancer, pretrain_epochs):
    config = load(name)
    assert (config.model.enhancer, config.pretrain.epochs) == (enhancer, pretrain_epochs)
    assert (config.model.classifier, config.train.epochs, config.optimizer.lr) == ("resnet101", 200, 1e-4)


@pytest.mark.parametrize("key, value, message", [
    ("precision", "float16", "precision must be one of"),
    ("xla_cpu_options", "fast", "xla_cpu_options must be one of ynnpack_reductions, no_ynnpack, xla_defaults"),
    ("model.enhancer", "resunet2", "model.enhancer must be one of"),
    ("model.classifier", "resnet9", "model.classifier must be one of"),
    ("model.pretrained", "/nonexistent/weights.pth", "model.pretrained file"),
    ("data.dir", "/nonexistent/images", "data.dir"),
    ("pretrain.epochs", -1, "pretrain.epochs must be an integer >= 0"),
    ("train.epochs", -3, "train.epochs must be an integer >= 0"),
    ("batch_size", 30, "batch_size 30 is not divisible by the number of devices (4)"),
    ("eval_batch_size", 0, "eval_batch_size must be an integer >= 1"),
    ("optimizer.name", "rmsprop", "optimizer.name must be one of"),
    ("optimizer.lr", 0.0, "optimizer.lr must be > 0"),
    ("optimizer.momentum", 1.0, "optimizer.momentum must be in [0, 1)"),
    ("optimizer.schedule", "linear", "optimizer.schedule must be one of constant, cosine"),
    ("optimizer.warmup_steps", -1, "optimizer.warmup_steps must be an integer >= 0"),
    ("checkpoint.keep", 0, "checkpoint.keep must be an integer >= 1"),
    ("data.image_size", 16, "data.image_size must be an integer >= 32"),
])
def test_validate_names_the_bad_key(key, value, message, tmp_path):
    config = with_data_dir(load("urnet"), tmp_path)
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(errors.ConfigError) as error:
        config_lib.validate(config, device_count=4)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_nothing_to_train_is_rejected(tmp_path):
    config = with_data_dir(load("net1"), tmp_path)
    config.train.epochs = 0
    with pytest.raises(errors.ConfigError, match="nothing to train"):
        config_lib.validate(config, device_count=1)


def test_a_saved_config_without_later_keys_compares_as_their_defaults():
    saved = base_config().to_dict()
    del saved["optimizer"]["schedule"], saved["optimizer"]["warmup_steps"]  # a run from before they existed
    saved["data"]["class_map"] = {"a": ["x"], "b": ["y"]}  # a dict value is one value, not a section
    current = config_lib.saved_config(saved)
    assert current.optimizer.schedule == "constant" and current.data.class_map == {"a": ["x"], "b": ["y"]}
    assert config_lib.config_differences(saved, current.to_dict()) == []
    current.optimizer.schedule = "cosine"
    assert config_lib.config_differences(saved, current.to_dict()) == ["optimizer.schedule: 'constant' != 'cosine'"]
    with pytest.raises(ValueError, match="saved config key model.depth=3 does not fit"):
        config_lib.saved_config({**saved, "model": {**saved["model"], "depth": 3}})


def test_train_epochs_may_change_on_resume_only_under_a_constant_schedule():
    saved = base_config().to_dict()
    longer = base_config()
    longer.train.epochs += 10
    assert workdir.run_config_differences(saved, longer) == []
    longer.optimizer.schedule = saved["optimizer"]["schedule"] = "cosine"
    assert workdir.run_config_differences(saved, longer) == ["train.epochs: 200 != 210"]


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/demo.py", "--config.model.foo=3"], "error: unknown config key 'model.foo'"),
    (["--config", "configs/demo.py", "--config.model.enhancer=bogus"], "error: model.enhancer must be one of"),
    (["--config", "configs/demo.py", "--config.train.epochs=-1"], "error: train.epochs must be an integer >= 0"),
    (["--config", "configs/demo.py", "--config.batch_size=abc"], "error: flag --config.batch_size=abc:"),
    (["--config", "configs/missing.py"], "error: config file 'configs/missing.py' not found"),
    (["--config", "configs/demo.py", "--config.model.pretrained=/nonexistent.pth"],
     "error: model.pretrained file '/nonexistent.pth' not found"),
    (["--config", "configs/urnet.py"], "error: data.dir is not set: pass --config.data.dir=FOLDER"),
])
def test_train_py_reports_config_errors_in_one_line(args, message):
    result = run_train(*args, "--workdir", "/nonexistent/never-created")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not pathlib.Path("/nonexistent/never-created").exists()
