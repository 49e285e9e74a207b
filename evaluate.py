"""Evaluates a trained run (metrics, predictions, figures, report in WORKDIR/eval/), or compares evaluated runs.

    python evaluate.py --workdir runs/urnet [--checkpoint best|latest] [--split test|train] [--perturb]
    python evaluate.py --compare runs/net1 runs/net2 runs/net3 runs/net4 [--out compare.md]

--compare prints the paper's Table 3 and Table 2 layouts of the runs' eval/metrics.json and writes them
to --out.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging

from urnet_jax import cli
from urnet_jax.errors import ConfigError

_RUN = cli.define_run_flags()
_SPLIT = flags.DEFINE_string("split", "test", "the split to evaluate: test or train")
_EXAMPLES_PER_CLASS = flags.DEFINE_integer("examples-per-class", 3, "images per class in enhanced.png and gradcam.png",
                                           lower_bound=1)
_PERTURB = flags.DEFINE_bool("perturb", False, "also measure accuracy under brightness/contrast/blur/noise")
_COMPARE = flags.DEFINE_bool("compare", False, "compare the evaluated runs given as arguments instead")
_OUT = flags.DEFINE_string("out", "compare.md", "where --compare writes its Markdown")


def compare(directories: list[str]) -> None:
    from urnet_jax.evaluation.report import compare_report  # deferred: keeps --help instant

    text = compare_report(directories)
    try:
        pathlib.Path(_OUT.value).write_text(text)
    except OSError as error:
        raise ConfigError(f"cannot write --out {_OUT.value}: {error.strerror or error}") from None
    print(text, end="")
    print(f"written to {_OUT.value}")


def evaluate(workdir: str) -> None:
    from urnet_jax.evaluation.runner import evaluate_run  # deferred: keeps --help instant

    metrics = evaluate_run(workdir, _RUN.checkpoint.value, _SPLIT.value, _RUN.batch_size.value,
                           _EXAMPLES_PER_CLASS.value, _PERTURB.value, progress=_RUN.progress.value)
    images = sum(map(sum, metrics["confusion_matrix"]))
    print(f"{_SPLIT.value} accuracy {100 * metrics['accuracy']:.2f}%, macro F1 {100 * metrics['macro']['f1']:.2f}% "
          f"({images} images); report: {pathlib.Path(workdir) / 'eval' / 'report.md'}")


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    with cli.one_line_errors():
        if _COMPARE.value == (_RUN.workdir.value is not None):
            raise ConfigError("give exactly one of --workdir DIR or --compare DIR [DIR ...]")
        if _COMPARE.value:
            if len(argv) < 2:
                raise ConfigError("--compare needs at least one evaluated run directory")
            compare(argv[1:])
        else:
            cli.reject_positional_args(argv)
            evaluate(_RUN.workdir.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
