"""Shared pieces of the command-line entry points (train.py, evaluate.py, predict.py, `python -m
urnet_jax.data`, `python -m urnet_jax.study`, `python -m urnet_jax.port`).

Every entry point defines absl flags (multi-word names with dashes: `--batch-size`; booleans as
`--progress` / `--noprogress`), parses them through `parse_flags`, and runs its work inside
`one_line_errors()`: a bad command line, config value, data folder or checkpoint ends the program with
one line on stderr (`error: ...`) and a non-zero exit status, never a traceback. A config is a
`--config path/to/config.py [--config.key=value ...]` flag of ml_collections' `config_flags`
(`define_config_flag`). Heavy imports (JAX, TensorFlow) happen inside main(), so `--help` is instant.

    _CONFIG = cli.define_config_flag()

    def main(argv):
        with cli.one_line_errors():
            cli.reject_positional_args(argv)
            config = cli.config_value(_CONFIG)
            ...

    if __name__ == "__main__":
        app.run(main, flags_parser=cli.parse_flags)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import pathlib
import sys
from collections.abc import Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from urnet_jax.errors import ConfigError, DataError, PortError, RunError, TrainingStopped

EXIT_USAGE = 2  # bad command line, config value, data folder, or a workdir of another configuration
EXIT_FAILURE = 1  # the run itself failed (e.g. a non-finite loss)

# The flags that the helpers below define belong to the calling entry point (its `--help` lists them).
flags.disclaim_key_flags()


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """The flags of the commands that read a trained run (evaluate.py, predict.py)."""

    workdir: flags.FlagHolder
    checkpoint: flags.FlagHolder
    batch_size: flags.FlagHolder
    progress: flags.FlagHolder


def define_run_flags() -> RunFlags:
    """Defines `--workdir DIR`, `--checkpoint best|latest`, `--batch-size N` and `--[no]progress`."""
    return RunFlags(
        workdir=flags.DEFINE_string("workdir", None, "the training run's directory"),
        checkpoint=flags.DEFINE_string(
            "checkpoint", "best",
            "best: the weights chosen on the run's selection split (train.select_on); latest: the last checkpoint"),
        batch_size=flags.DEFINE_integer("batch-size", None, "images per batch (default: the run's eval_batch_size)",
                                        lower_bound=1),
        progress=flags.DEFINE_bool("progress", True, "show progress bars"))


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _config_problem(argv: Sequence[str]) -> str | None:
    """Why the config file of argv does not load, or the first --config.KEY it does not define (None if
    neither)."""
    path = _config_file_argument(argv)
    if path is None:
        return None
    try:
        config = load_config_file(path)
    except ConfigError as error:
        return str(error)
    except Exception as error:  # a config file runs arbitrary code
        return f"cannot load the config file {path}: {type(error).__name__}: {_first_line(error)}"
    unknown = next((key for key in _override_keys(argv) if not _has_key(config, key)), None)
    return None if unknown is None else f"unknown config key {unknown!r} (see urnet_jax/config.py for every key)"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit status 2); use as `app.run(main, flags_parser=...)`."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(_first_line(error))
    except Exception as error:  # the config file's own failure, or an override that does not fit the config
        _fail(_config_problem(argv) or f"invalid config override: {_first_line(error)}")
    return []


def config_value(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
    """The parsed config of a `define_config_flag` flag; ConfigError when missing or unloadable."""
    if holder.value is None:
        raise ConfigError(f"--{holder.name} is required (e.g. --{holder.name} configs/urnet.py)")
    try:
        config = holder.value
        config.get("seed")  # an unloadable file yields a placeholder that raises on first access
    except Exception as error:
        path = config_flags.get_config_filename(flags.FLAGS[holder.name])
        raise ConfigError(_config_problem([f"--config={path}"]) or f"cannot load --{holder.name}: "
                          f"{_first_line(error)}") from None
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


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turns the project's expected errors into `error: <one line>` on stderr and an exit status.

    Configuration, data, weights-file and workdir problems exit with status 2, a failed run with status 1;
    training stopped by a signal prints its message and exits with 128 + the signal's number, as the
    signal would.
    """
    try:
        yield
    except (ConfigError, DataError, PortError) as error:
        _fail(str(error), EXIT_USAGE)
    except RunError as error:
        _fail(str(error), EXIT_FAILURE)
    except TrainingStopped as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(128 + stop.signal_number)


# The conv backends whose runs evaluate.py and predict.py restart with the block cache unasked: with oneDNN's
# convolutions the eval step went from 0.95-0.99x to 1.03-1.09x torch's best variant with it; with XLA's it was
# not faster in both pairs measured, and the restart costs about a second (docs/BENCHMARKS.md).
EVAL_BLOCK_CACHE_BACKENDS = ("onednn",)


def restart_with_host_memory_of_run(workdir: str | None) -> None:
    """`host_memory.restart_with_host_memory_settings` for a script that computes with the run in `workdir`
    (None: no run): the block cache by default for a run trained with one of `EVAL_BLOCK_CACHE_BACKENDS`, on
    request ($URNET_JAX_BLOCK_CACHE=1) for any. Call it only when the script runs as a program (it runs the
    command again)."""
    from urnet_jax import host_memory, workdir as workdir_lib  # deferred: keeps --help instant

    backend = workdir_lib.saved_conv_backend(workdir) if workdir else None
    host_memory.restart_with_host_memory_settings(backend if backend in EVAL_BLOCK_CACHE_BACKENDS else None)
