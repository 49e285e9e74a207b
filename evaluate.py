"""Evaluates a trained run (metrics, predictions, calibration, figures, report in WORKDIR/eval/), evaluates it
on another lab's images, or compares evaluated runs.

    python evaluate.py --workdir runs/urnet [--checkpoint best|latest] [--split test|val|train] [--perturb]
    python evaluate.py --workdir runs/urnet --data-dir path/to/lab_b [--class-map wbc3|folders] [--name lab_b]
                       [--adapt-bn]
    python evaluate.py --compare runs/net1 runs/net2 runs/net3 runs/net4 [--out compare.md]

--data-dir evaluates on a class-per-folder image set (folders mapped to the run's classes; default: the
run's own class map) into WORKDIR/eval/NAME/. --adapt-bn re-estimates the BatchNorm statistics on those
images first, in memory (the checkpoint is never modified). --compare prints the paper's Table 3, Table 2
and Table 4 layouts of the runs' eval/metrics.json, and their external evaluations side by side, and
writes them to --out.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging

from urnet_jax import cli
from urnet_jax.errors import ConfigError

_RUN = cli.define_run_flags()
_SPLIT = flags.DEFINE_string("split", "test", "the split to evaluate: test, val or train")
_EXAMPLES_PER_CLASS = flags.DEFINE_integer("examples-per-class", 3, "images per class in enhanced.png and gradcam.png",
                                           lower_bound=1)
_PERTURB = flags.DEFINE_bool("perturb", False, "also measure accuracy under brightness/contrast/blur/noise")
_DATA_DIR = flags.DEFINE_string("data-dir", None, "evaluate on this class-per-folder image set instead")
_CLASS_MAP = flags.DEFINE_enum("class-map", None, ["wbc3", "folders"],
                               "how --data-dir's folders map to classes (default: the run's own class map)")
_NAME = flags.DEFINE_string("name", None, "the folder under WORKDIR/eval/ for --data-dir (default: its name)")
_ADAPT_BN = flags.DEFINE_bool("adapt-bn", False, "re-estimate the BatchNorm statistics on --data-dir's images "
                              "(in memory; the checkpoint is unchanged)")
_COMPARE = flags.DEFINE_bool("compare", False, "compare the evaluated runs given as arguments instead")
_OUT = flags.DEFINE_string("out", "compare.md", "where --compare writes its Markdown")


def compare(directories: list[str]) -> None:
    from urnet_jax.evaluation.report import (
        compare_report,  # deferred: keeps --help instant
    )

    text = compare_report(directories)
    try:
        pathlib.Path(_OUT.value).write_text(text)
    except OSError as error:
        raise ConfigError(f"cannot write --out {_OUT.value}: {error.strerror or error}") from None
    print(text, end="")
    print(f"written to {_OUT.value}")


def evaluate(workdir: str) -> None:
    from urnet_jax.evaluation.runner import (
        evaluate_run,  # deferred: keeps --help instant
    )

    metrics = evaluate_run(workdir, _RUN.checkpoint.value, _SPLIT.value, _RUN.batch_size.value,
                           _EXAMPLES_PER_CLASS.value, _PERTURB.value, progress=_RUN.progress.value)
    images = sum(map(sum, metrics["confusion_matrix"]))
    print(f"{_SPLIT.value} accuracy {100 * metrics['accuracy']:.2f}%, macro F1 {100 * metrics['macro']['f1']:.2f}% "
          f"({images} images); report: {pathlib.Path(workdir) / 'eval' / 'report.md'}")


def evaluate_external(workdir: str) -> None:
    from urnet_jax.evaluation.runner import (
        evaluate_external,  # deferred: keeps --help instant
    )

    metrics, details = evaluate_external(workdir, _DATA_DIR.value, _CLASS_MAP.value, _NAME.value,
                                         _RUN.checkpoint.value, _RUN.batch_size.value, _EXAMPLES_PER_CLASS.value,
                                         _ADAPT_BN.value, progress=_RUN.progress.value)
    name = _NAME.value or pathlib.Path(_DATA_DIR.value).resolve().name
    adapted = ", BatchNorm adapted" if details["adapt_bn"] else ""
    print(f"{name}: accuracy {100 * metrics['accuracy']:.2f}%, balanced accuracy "
          f"{100 * details['balanced_accuracy']:.2f}% ({details['images']} images, {len(details['unreadable'])} "
          f"unreadable{adapted}); report: {pathlib.Path(workdir) / 'eval' / name / 'report.md'}")


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    with cli.one_line_errors():
        if _COMPARE.value == (_RUN.workdir.value is not None):
            raise ConfigError("give exactly one of --workdir DIR or --compare DIR [DIR ...]")
        external_only = [flag for flag, holder in (("--class-map", _CLASS_MAP), ("--name", _NAME),
                                                   ("--adapt-bn", _ADAPT_BN)) if holder.value]
        if external_only and _DATA_DIR.value is None:
            raise ConfigError(f"{', '.join(external_only)} need(s) --data-dir")
        if _COMPARE.value:
            if len(argv) < 2:
                raise ConfigError("--compare needs at least one evaluated run directory")
            compare(argv[1:])
        else:
            cli.reject_positional_args(argv)
            if __name__ == "__main__":  # run as a script: the restart runs its command again
                cli.restart_with_host_memory_of_run(_RUN.workdir.value)
            if _DATA_DIR.value is not None:
                evaluate_external(_RUN.workdir.value)
            else:
                evaluate(_RUN.workdir.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
