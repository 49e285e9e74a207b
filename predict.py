"""Classifies every image under a folder (recursively) with a trained run and prints the differential count:
count and percentage per class with a 95% Wilson confidence interval.

    python predict.py --workdir runs/urnet --images path/to/cells [--out preds.csv] [--checkpoint best]
"""

from __future__ import annotations

from absl import app, flags, logging

from urnet_jax import cli
from urnet_jax.errors import ConfigError

_RUN = cli.define_run_flags()
_IMAGES = flags.DEFINE_string("images", None, "folder of cell images (searched recursively)")
_OUT = flags.DEFINE_string("out", "preds.csv", "the per-image predictions CSV")
flags.mark_flags_as_required(["workdir", "images"])


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    with cli.one_line_errors():
        cli.reject_positional_args(argv)
        from urnet_jax import differential_count, inference, workdir  # deferred: keeps --help instant

        run = workdir.load_run(_RUN.workdir.value, _RUN.checkpoint.value)
        if run.config.data.variant != "raw":
            print(f"note: this run was trained on the '{run.config.data.variant}' variant; the images are "
                  f"classified as they are")
        result = inference.predict_folder(run.model, run.variables, run.class_names, _IMAGES.value,
                                          int(run.config.data.image_size),
                                          _RUN.batch_size.value or int(run.config.eval_batch_size),
                                          progress=_RUN.progress.value)
        try:
            inference.write_predictions_csv(_OUT.value, result.paths, result.probabilities, result.class_names,
                                            unreadable=result.unreadable)
        except OSError as error:
            raise ConfigError(f"cannot write --out {_OUT.value}: {error.strerror or error}") from None
        counts = differential_count.differential_count(result.predicted, run.class_names)
        print(differential_count.format_differential_count(counts, result.unreadable))
        print(f"per-image predictions: {_OUT.value}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
