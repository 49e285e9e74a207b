"""The study's command line: `run` trains and evaluates the runs of a study config, `report` writes their tables.

    python -m urnet_jax.study run --config configs/study_cpu.py --out results/study_cpu \\
        [--only 'net4-*' ...] [--limit N] [--delete-checkpoints] [--prepared DIR] [--noprogress] \\
        [--config.KEY=VALUE ...]   # e.g. --config.base.train.epochs=5 --config.seeds='(1,)'
    python -m urnet_jax.study report results/study_cpu [--out docs/RESULTS.md [--check]] [--curves PNG]

The first argument names the command; each command has its own absl flags (`--help` lists them), and a
study config file is read with ml_collections' `config_flags`, so that any key of it, the nested `base` run
config included, can be overridden. Exit status: 0, 1 for failed runs or an out-of-date document (--check),
2 for a bad command line, config or results folder (one `error: ...` line), 128 + N when stopped by signal N.
"""

from __future__ import annotations

import pathlib
import signal
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from urnet_jax import cli
from urnet_jax.errors import ConfigError

USAGE = ("usage: python -m urnet_jax.study run --config FILE --out DIR [--config.KEY=VALUE ...] [flags]\n"
         "       python -m urnet_jax.study report RESULTS_DIR [--out FILE [--check]] [--curves PNG]")


def define_run_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """The flags of `run`; `argv` is where config_flags finds the --config.KEY=VALUE overrides."""
    config_flags.DEFINE_config_file(
        "config", None, "study config file (e.g. configs/study_cpu.py); override keys with --config.KEY=VALUE "
        "(e.g. --config.seeds='(1,)' --config.base.train.epochs=5)", flag_values=flag_values, lock_config=True,
        sys_argv=list(argv))
    flags.DEFINE_string("out", None, "results folder (e.g. results/study_cpu)", flag_values=flag_values)
    flags.DEFINE_multi_string("only", [], "run only the runs whose name matches this glob (e.g. 'net4-*', "
                              "'*-raw-seed1')", flag_values=flag_values)
    flags.DEFINE_integer("limit", None, "train at most N unfinished runs, then stop (finished runs are skipped and "
                         "not counted)", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_bool("delete-checkpoints", False, "delete each run's checkpoints/ once it is evaluated",
                      flag_values=flag_values)
    flags.DEFINE_string("prepared", None, "folder for the prepared data sets and the subset's links (default "
                        "OUT/_prepared)", flag_values=flag_values)
    flags.DEFINE_bool("progress", True, "show progress bars", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "out"], flag_values=flag_values)


def define_report_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
    """The flags of `report` (its one positional argument: the results folder written by `run`)."""
    del argv  # no config overrides
    flags.DEFINE_string("out", None, "also write the tables into this Markdown file between its markers "
                        "(e.g. docs/RESULTS.md)", flag_values=flag_values)
    flags.DEFINE_bool("check", False, "exit with status 1 when --out FILE's tables differ from the results "
                      "(writes nothing)", flag_values=flag_values)
    flags.DEFINE_string("curves", None, "also plot every run's phase-2 test accuracy per epoch (from "
                        "metrics.jsonl) into this PNG", flag_values=flag_values)


def _unknown_override(flag_values: flags.FlagValues, argv: Sequence[str]) -> str | None:
    """The first --config.KEY of argv that the config file does not have (None when it cannot tell)."""
    files = [arg.split("=", 1)[1] if "=" in arg else following for arg, following in zip(argv, [*argv[1:], ""])
             if arg == "--config" or arg.startswith("--config=")]
    if not files:
        return None
    try:
        config = flag_values["config"].parser.parse(files[-1])
    except Exception:  # noqa: BLE001 - the file's own problem is reported instead
        return None
    for arg in argv:
        if arg.startswith(("--config.", "--noconfig.")):
            key = arg.split("=", 1)[0].split(".", 1)[1]
            try:
                config_path.get_value(key, config)
            except (AttributeError, KeyError, IndexError):
                return key
    return None


def parse_command_line(argv: Sequence[str]) -> tuple[str, flags.FlagValues, list[str]]:
    """(command, its parsed flags, its positional arguments) of `python -m urnet_jax.study ...`;
    ConfigError (one line) for a bad command line."""
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise ConfigError(f"expected the command run or report, got {' '.join(argv[1:2]) or 'nothing'}; "
                          f"{USAGE.splitlines()[0].removeprefix('usage: ')} (see --help)")
    command_argv = [f"{argv[0]} {argv[1]}", *argv[2:]]
    flag_values = flags.FlagValues()
    COMMANDS[argv[1]][0](flag_values, command_argv)
    try:
        positional = flag_values(command_argv)[1:]
    except flags.Error as error:
        raise ConfigError(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    except Exception as error:  # noqa: BLE001 - the config file's own failure, or an override it cannot take
        unknown = _unknown_override(flag_values, command_argv)
        if unknown is not None:
            raise ConfigError(f"unknown config key {unknown} (see the study config file and urnet_jax/config.py)") \
                from None
        raise ConfigError(f"--config: {type(error).__name__}: {str(error).strip().splitlines()[0]}") from None
    return argv[1], flag_values, positional


def _study_config(flag_values: flags.FlagValues) -> ml_collections.ConfigDict:
    """The parsed --config of `run`; ConfigError when its file is missing or does not give a ConfigDict."""
    path = config_flags.get_config_filename(flag_values["config"])
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"--config file {path!r} not found")
    study = flag_values.config
    if not isinstance(study, ml_collections.ConfigDict):
        raise ConfigError(f"--config {path}: get_config() must return an ml_collections.ConfigDict")
    return study


def run_command(flag_values: flags.FlagValues, positional: Sequence[str]) -> int:
    """Trains and evaluates the unfinished runs; 1 when some failed, 128 + N when stopped by signal N."""
    import jax  # deferred, as is the runner (training, evaluation): keeps --help fast

    from urnet_jax.study.run import run_study

    if positional:
        raise ConfigError(f"unexpected argument(s): {' '.join(positional)}")
    study = _study_config(flag_values)
    out_dir = pathlib.Path(flag_values.out)
    if not jax.config.jax_compilation_cache_dir:  # the runs of one model variant compile the same programs
        jax.config.update("jax_compilation_cache_dir", str((out_dir / "_jax_cache").resolve()))
    try:
        outcome = run_study(study, out_dir, flag_values.only, flag_values.limit, flag_values["delete-checkpoints"].value,
                            flag_values.prepared, show_progress=flag_values.progress)
    except KeyboardInterrupt as stop:  # Ctrl-C outside training, or TrainingStopped (a checkpoint was saved)
        print(f"interrupted: {str(stop) or 'run the same command again to resume'}", file=sys.stderr)
        return 128 + getattr(stop, "signal_number", signal.SIGINT)
    print(f"trained {len(outcome.trained)}, skipped {len(outcome.skipped)} finished, failed {len(outcome.failed)}"
          + (f", left for later (--limit) {len(outcome.not_started)}" if outcome.not_started else ""))
    if outcome.failed:
        print(f"{len(outcome.failed)} run(s) failed:", file=sys.stderr)
        for line in outcome.failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def report_command(flag_values: flags.FlagValues, positional: Sequence[str]) -> int:
    """Prints (and writes or checks) the tables of one results folder; 1 when --check finds them out of date."""
    from urnet_jax.study import report  # deferred: pandas and scipy keep --help slow

    if len(positional) != 1:
        raise ConfigError(f"report takes one results folder (e.g. results/study_cpu), got {len(positional)} arguments")
    results_dir = pathlib.Path(positional[0])
    if not results_dir.is_dir():
        print(f"note: {results_dir} does not exist (yet): no finished runs", file=sys.stderr)
    block = report.results_block(results_dir)
    document = None if flag_values.out is None else pathlib.Path(flag_values.out)
    if flag_values.check:
        if document is None:
            raise ConfigError("--check needs --out FILE (the document to check)")
        if not report.check_document(document.read_text() if document.is_file() else "", results_dir):
            print(f"{document}: the tables of {results_dir} are missing or out of date; regenerate them with "
                  f"python -m urnet_jax.study report {results_dir} --out {document}", file=sys.stderr)
            return 1
        print(f"{document}: the tables of {results_dir} are up to date")
        return 0
    print(block)
    if flag_values.curves is not None:
        _write_curves(results_dir, flag_values.curves)
    if document is not None:
        try:
            text = document.read_text() if document.is_file() else ""
            document.write_text(report.replace_block(text, block, results_dir.resolve().name))
        except OSError as error:
            raise ConfigError(f"cannot write --out {document}: {error.strerror or error}") from None
        print(f"written to {document}")
    return 0


def _write_curves(results_dir: pathlib.Path, png: str) -> None:
    from urnet_jax.evaluation.figures import plot_study_curves  # deferred: matplotlib
    from urnet_jax.study.results import learning_curves

    curves = learning_curves(results_dir)
    if not curves:
        raise ConfigError(f"--curves: no finished run in {results_dir} has phase-2 rows in its metrics.jsonl")
    try:
        plot_study_curves(curves, png)
    except OSError as error:
        raise ConfigError(f"cannot write --curves {png}: {error.strerror or error}") from None
    print(f"learning curves written to {png}")


Command = tuple[Callable[[flags.FlagValues, Sequence[str]], None], Callable[[flags.FlagValues, Sequence[str]], int]]
COMMANDS: dict[str, Command] = {"run": (define_run_flags, run_command), "report": (define_report_flags, report_command)}


def _print_help(argv: Sequence[str]) -> None:
    """The module's docstring and the flags of the named command (of both without one)."""
    print(__doc__)
    for name, (define, _) in COMMANDS.items():
        if argv[1] == name or argv[1] not in COMMANDS:
            flag_values = flags.FlagValues()
            define(flag_values, [])
            print(f"flags of {name}:")
            for flag in sorted({flag_values[key] for key in flag_values}, key=lambda flag: flag.name):
                default = "" if flag.default in (None, []) else f" (default: {flag.default_as_str})"
                print(f"  --{'[no]' if flag.boolean else ''}{flag.name}: {flag.help}{default}")


def main(argv: Sequence[str]) -> int:
    """The command line (argv[0] is the program); returns the exit status, or exits with status 2 and one
    `error: ...` line for a bad command line or config."""
    if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv[1:]):
        _print_help(argv)
        return 0
    logging.set_verbosity(logging.WARNING)
    with cli.one_line_errors():
        command, flag_values, positional = parse_command_line(argv)
        return COMMANDS[command][1](flag_values, positional)


def _flags_parser(argv: list[str]) -> list[str]:
    """app.run's flag parser: each command parses its own flags in `main`; absl's global FLAGS hold none."""
    flags.FLAGS.mark_as_parsed()
    return argv


if __name__ == "__main__":
    app.run(main, flags_parser=_flags_parser)
