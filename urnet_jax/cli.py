"""Shared pieces of the command-line entry points (train.py, evaluate.py, predict.py).

Every entry point parses `--config path/to/config.py [--config.key=value ...]` with ml_collections'
`config_flags` through `parse_flags`, validates the result with `validate`, and runs its work inside
`one_line_errors()`: a bad command line, config value, data folder or checkpoint ends the program with
one line on stderr (`error: ...`) and a non-zero exit status, never a traceback.

    _CONFIG = cli.define_config_flag()

    def main(argv):
        with cli.one_line_errors():
            cli.reject_positional_args(argv)
            config = cli.validate(cli.config_value(_CONFIG))
            ...

    if __name__ == "__main__":
        app.run(main, flags_parser=cli.parse_flags)
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import pathlib
import sys
from collections.abc import Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from urnet_jax.models import CLASSIFIERS, ENHANCERS

EXIT_USAGE = 2  # bad command line, config value, data folder, or a workdir of another configuration
EXIT_FAILURE = 1  # the run itself failed (e.g. a non-finite loss)

PRECISIONS = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
MIN_IMAGE_SIZE = 32


class ConfigError(Exception):
    """An invalid command line or configuration value; the message is one line."""


class RunError(Exception):
    """A run that cannot go on (non-finite loss, unusable checkpoint); the message is one line."""


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; the message is one line. A
    KeyboardInterrupt, so that handlers of ordinary errors let it through."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.signal_number = signal_number


def define_config_flag(name: str = "config") -> flags.FlagHolder:
    """Defines `--config FILE` (a config file whose `get_config()` returns a ConfigDict)."""
    return config_flags.DEFINE_config_file(
        name, None, "configuration file (e.g. configs/urnet.py); override keys with --config.KEY=VALUE",
        lock_config=True)


def _fail(message: str, status: int = EXIT_USAGE) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(status)


def _config_file_argument(argv: Sequence[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def _override_keys(argv: Sequence[str]) -> list[str]:
    keys = []
    for arg in argv:
        for prefix in ("--config.", "--noconfig."):
            if arg.startswith(prefix):
                keys.append(arg[len(prefix):].split("=", 1)[0])
    return keys


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the config file `path` (`path:arg` passes `arg` to it)."""
    file_name, _, argument = path.partition(":")
    spec = importlib.util.spec_from_file_location("_urnet_config", file_name)
    if spec is None or spec.loader is None or not pathlib.Path(file_name).is_file():
        raise ConfigError(f"config file {file_name!r} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def _has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _unknown_override(argv: Sequence[str]) -> str | None:
    """The first --config.KEY of argv that the config file does not define (None if all exist)."""
    path = _config_file_argument(argv)
    if path is None:
        return None
    try:
        config = load_config_file(path)
    except Exception:  # the flag parser reports the file's own problem
        return None
    return next((key for key in _override_keys(argv) if not _has_key(config, key)), None)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit status 2); use as `app.run(main, flags_parser=...)`."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        unknown = _unknown_override(argv)
        if unknown is not None:
            _fail(f"unknown config key {unknown!r} (see urnet_jax/config.py for every key)")
        _fail(f"invalid config override: {str(error).strip() or type(error).__name__}")
    return []


def config_value(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
    """The parsed config of a `define_config_flag` flag; ConfigError when missing or unloadable."""
    if holder.value is None:
        raise ConfigError(f"--{holder.name} is required (e.g. --{holder.name} configs/urnet.py)")
    try:
        config = holder.value
        config.get("seed")  # an unloadable file yields a placeholder that raises on first access
    except Exception as error:
        raise ConfigError(f"cannot load --{holder.name}: {str(error).strip().splitlines()[0]}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--{holder.name}: get_config() must return an ml_collections.ConfigDict")
    return config


def config_path(holder: flags.FlagHolder) -> pathlib.Path:
    """The config file given to a `define_config_flag` flag (without a `:arg` suffix)."""
    return pathlib.Path(config_flags.get_config_filename(flags.FLAGS[holder.name]))


def reject_positional_args(argv: Sequence[str]) -> None:
    """ConfigError when the command line has arguments that are not flags."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected argument(s): {' '.join(argv[1:])}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> ml_collections.ConfigDict:
    """Checks every key that training reads; raises ConfigError naming the first bad one. Returns config.

    `device_count` (default: `jax.device_count()`) must divide both batch sizes. Data-set keys that only
    the data package interprets (class_map, variant, ...) are checked by `urnet_jax.data.prepare`.
    """
    if device_count is None:
        import jax  # deferred: a multi-host launch initialises JAX's distributed runtime first

        device_count = jax.device_count()
    model = config.model
    _check(config.precision in PRECISIONS,
           f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    _check(model.enhancer in ("none", *ENHANCERS),
           f"model.enhancer must be one of none, {', '.join(ENHANCERS)}, got {model.enhancer!r}")
    _check(model.classifier in CLASSIFIERS,
           f"model.classifier must be one of {', '.join(CLASSIFIERS)}, got {model.classifier!r}")
    for key in ("enhancer_width", "classifier_width"):
        value = model[key]
        _check(isinstance(value, int) and value >= 0, f"model.{key} must be an integer >= 0 (0: default), got {value!r}")
    if model.pretrained:
        _check(pathlib.Path(model.pretrained).is_file(), f"model.pretrained file {model.pretrained!r} not found")
        _check(model.classifier_width == 0,
               "model.pretrained needs the classifier's standard width (model.classifier_width=0)")
    if config.data.dir:
        _check(pathlib.Path(config.data.dir).is_dir(), f"data.dir {config.data.dir!r} is not a directory")
    _check(isinstance(config.data.image_size, int) and config.data.image_size >= MIN_IMAGE_SIZE,
           f"data.image_size must be an integer >= {MIN_IMAGE_SIZE}, got {config.data.image_size!r}")
    _check(_is_number(config.data.test_fraction) and 0 < config.data.test_fraction < 1,
           f"data.test_fraction must be in (0, 1), got {config.data.test_fraction!r}")
    for key in ("pretrain", "train"):
        epochs = config[key].epochs
        _check(isinstance(epochs, int) and epochs >= 0, f"{key}.epochs must be an integer >= 0, got {epochs!r}")
    pretrains = model.enhancer != "none" and config.pretrain.epochs > 0
    _check(pretrains or config.train.epochs > 0, "nothing to train: train.epochs is 0 and there is no phase 1")
    for key in ("batch_size", "eval_batch_size"):
        size = config[key]
        _check(isinstance(size, int) and size >= 1, f"{key} must be an integer >= 1, got {size!r}")
        _check(size % device_count == 0,
               f"{key} {size} is not divisible by the number of devices ({device_count})")
    optimizer = config.optimizer
    _check(optimizer.name in OPTIMIZERS,
           f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {optimizer.name!r}")
    _check(_is_number(optimizer.lr) and optimizer.lr > 0, f"optimizer.lr must be > 0, got {optimizer.lr!r}")
    _check(_is_number(optimizer.momentum) and 0 <= optimizer.momentum < 1,
           f"optimizer.momentum must be in [0, 1), got {optimizer.momentum!r}")
    _check(_is_number(optimizer.weight_decay) and optimizer.weight_decay >= 0,
           f"optimizer.weight_decay must be >= 0, got {optimizer.weight_decay!r}")
    _check(optimizer.schedule in SCHEDULES,
           f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {optimizer.schedule!r}")
    _check(isinstance(optimizer.warmup_steps, int) and optimizer.warmup_steps >= 0,
           f"optimizer.warmup_steps must be an integer >= 0, got {optimizer.warmup_steps!r}")
    _check(isinstance(config.checkpoint.every_steps, int) and config.checkpoint.every_steps >= 0,
           f"checkpoint.every_steps must be an integer >= 0, got {config.checkpoint.every_steps!r}")
    _check(isinstance(config.checkpoint.keep, int) and config.checkpoint.keep >= 1,
           f"checkpoint.keep must be an integer >= 1, got {config.checkpoint.keep!r}")
    _check(isinstance(config.log_every_steps, int) and config.log_every_steps >= 1,
           f"log_every_steps must be an integer >= 1, got {config.log_every_steps!r}")
    _check(isinstance(config.seed, int) and 0 <= config.seed < 2**32,
           f"seed must be an integer in [0, 2**32), got {config.seed!r}")
    return config


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turns the project's expected errors into `error: <one line>` on stderr and an exit status.

    Configuration, data and workdir problems exit with status 2, a failed run with status 1; training
    stopped by a signal prints its message and exits with 128 + the signal's number, as the signal would.
    """
    from urnet_jax.data import DataError  # deferred: keeps `--help` fast

    try:
        yield
    except (ConfigError, DataError) as error:
        _fail(str(error), EXIT_USAGE)
    except RunError as error:
        _fail(str(error), EXIT_FAILURE)
    except TrainingStopped as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(128 + stop.signal_number)
