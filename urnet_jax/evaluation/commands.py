"""Command-line front ends of `evaluate.py` and `predict.py` (argparse; one-line errors, never a traceback).

Heavy imports (JAX, the model zoo, TensorFlow for the data readers) happen after the command line is
parsed, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a single `error: ...` line (exit status 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _quiet_logs() -> None:
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def evaluate_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a trained run (metrics, predictions, figures, report in DIR/eval/), or compare "
                    "evaluated runs side by side.")
    parser.add_argument("--workdir", help="the training run's directory")
    parser.add_argument("--checkpoint", default="best", choices=("best", "latest"),
                        help="best: highest test accuracy (default); latest: the last checkpoint")
    parser.add_argument("--split", default="test", choices=("test", "train"), help="split to evaluate")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval_batch_size")
    parser.add_argument("--examples-per-class", type=int, default=3,
                        help="images per class in enhanced.png and gradcam.png (default 3)")
    parser.add_argument("--perturb", action="store_true",
                        help="also measure accuracy under brightness/contrast/blur/noise perturbations")
    parser.add_argument("--compare", nargs="+", metavar="DIR",
                        help="compare evaluated runs (Table 3 and Table 2 layouts) instead of evaluating")
    parser.add_argument("--out", default="compare.md", help="where --compare writes its Markdown (default compare.md)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def evaluate_main(argv: Sequence[str] | None = None) -> None:
    """`python evaluate.py --workdir DIR [...]` or `python evaluate.py --compare DIR1 DIR2 ... [--out F]`."""
    args = evaluate_parser().parse_args(argv)
    if (args.workdir is None) == (args.compare is None):
        evaluate_parser().error("give exactly one of --workdir DIR or --compare DIR [DIR ...]")
    if args.batch_size is not None and args.batch_size < 1:
        evaluate_parser().error(f"--batch-size must be >= 1, got {args.batch_size}")
    _quiet_logs()
    from urnet_jax.cli import ConfigError, one_line_errors

    with one_line_errors():
        if args.compare is not None:
            from urnet_jax.evaluation.report import compare_report

            try:
                text = compare_report(args.compare)
                pathlib.Path(args.out).write_text(text)
            except (ValueError, OSError) as error:
                raise ConfigError(str(error)) from None
            print(text, end="")
            print(f"written to {args.out}")
            return
        from urnet_jax.evaluation.runner import evaluate_run

        metrics = evaluate_run(args.workdir, args.checkpoint, args.split, args.batch_size,
                               args.examples_per_class, args.perturb, progress=not args.no_progress)
        out = pathlib.Path(args.workdir) / "eval"
        print(f"{args.split} accuracy {100 * metrics['accuracy']:.2f}%, macro F1 {100 * metrics['macro']['f1']:.2f}% "
              f"({sum(map(sum, metrics['confusion_matrix']))} images); report: {out / 'report.md'}")


def predict_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="predict.py",
        description="Classify every image under a folder (recursively) and print the differential count "
                    "(count and percentage per class with a 95% Wilson confidence interval).")
    parser.add_argument("--workdir", required=True, help="the training run's directory")
    parser.add_argument("--images", required=True, help="folder of cell images (searched recursively)")
    parser.add_argument("--out", default="preds.csv", help="per-image predictions CSV (default preds.csv)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval_batch_size")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def predict_main(argv: Sequence[str] | None = None) -> None:
    """`python predict.py --workdir DIR --images FOLDER [--out preds.csv] [--checkpoint best]`."""
    args = predict_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        predict_parser().error(f"--batch-size must be >= 1, got {args.batch_size}")
    _quiet_logs()
    from urnet_jax.cli import ConfigError, one_line_errors

    with one_line_errors():
        folder = pathlib.Path(args.images)
        if not folder.is_dir():
            raise ConfigError(f"--images {folder} is not a directory")
        from urnet_jax import prediction
        from urnet_jax.data.images import IMAGE_EXTENSIONS
        from urnet_jax.training import load_run

        run = load_run(args.workdir, args.checkpoint)
        if not prediction.find_images(folder):
            raise ConfigError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
        if run.config.data.variant != "raw":
            print(f"note: this run was trained on the '{run.config.data.variant}' variant; the images are "
                  f"classified as they are")
        result = prediction.predict_folder(run.model, run.variables, run.class_names, folder,
                                           int(run.config.data.image_size),
                                           args.batch_size or int(run.config.eval_batch_size),
                                           progress=not args.no_progress)
        try:
            prediction.write_predictions_csv(args.out, result)
        except OSError as error:
            raise ConfigError(f"cannot write --out {args.out}: {error.strerror or error}") from None
        print(prediction.format_differential_count(
            prediction.differential_count(result.predicted, run.class_names), result.unreadable))
        print(f"per-image predictions: {args.out}")
