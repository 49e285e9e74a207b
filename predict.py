"""Classifies every image under a folder (recursively) with a trained run and prints the differential count:
the raw count per class with 95% Wilson intervals, then the proportions corrected for the classifier's
errors with 95% bootstrap intervals (`urnet_jax.quantification`), estimated from the held-out predictions
that `evaluate.py` stores with the run.

    python predict.py --workdir runs/urnet --images path/to/cells [--out preds.csv] [--checkpoint best]
                      [--correction adjusted_count|em|none] [--adapt-bn]
    python predict.py --exported exported/urnet --images path/to/cells    # the TFLite export, no model code

The CSV's probabilities are temperature-scaled with the run's calibration.json. A run that has not been
evaluated (no calibration.json) needs `python evaluate.py --workdir RUN` first, or `--correction none`
(uncalibrated probabilities, raw count only).
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging

from urnet_jax import cli
from urnet_jax.errors import ConfigError

_RUN = cli.define_run_flags()
_EXPORTED = flags.DEFINE_string("exported", None, "predict with this exported model (python -m urnet_jax.export) "
                                "instead of --workdir")
_IMAGES = flags.DEFINE_string("images", None, "folder of cell images (searched recursively)")
_OUT = flags.DEFINE_string("out", "preds.csv", "the per-image predictions CSV")
_CORRECTION = flags.DEFINE_enum("correction", "adjusted_count", ["adjusted_count", "em", "none"],
                                "how the differential count is corrected for the classifier's errors")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "bootstrap resamples of the corrected count's intervals",
                                  lower_bound=1)
_ADAPT_BN = flags.DEFINE_bool("adapt-bn", False, "re-estimate the BatchNorm statistics on the folder's images "
                              "first (in memory; the checkpoint is unchanged)")
flags.mark_flags_as_required(["images"])


def _calibration_of(source: str, checkpoint: str | None):
    """(calibration or None, held-out predictions or None) stored in `source` (a run or an export) for
    `checkpoint` (None: an export's own); ConfigError when --correction needs them and they are missing."""
    from urnet_jax import (
        calibration as calibration_lib,  # deferred: keeps --help instant
    )

    stored = pathlib.Path(source) / calibration_lib.CALIBRATION_FILE
    fitted = calibration_lib.read_calibration(source) if stored.is_file() else None
    if fitted is not None and checkpoint is not None and fitted.checkpoint != checkpoint:
        fitted = None  # fitted for the other checkpoint
    if _CORRECTION.value == "none":
        return fitted, None
    if fitted is None:
        what = "run" if checkpoint is not None else "export"
        raise ConfigError(f"{source} is not calibrated{f' for its {checkpoint!r} checkpoint' if checkpoint else ''}: "
                          f"run `python evaluate.py --workdir RUN{f' --checkpoint {checkpoint}' if checkpoint else ''}`"
                          f" first (and export the {what} again if it is an export), or use --correction none")
    return fitted, calibration_lib.read_heldout(source)


def _predict_with_run():
    from urnet_jax import inference, workdir  # deferred: keeps --help instant

    run = workdir.load_run(_RUN.workdir.value, _RUN.checkpoint.value)
    fitted, heldout = _calibration_of(_RUN.workdir.value, _RUN.checkpoint.value)
    if run.config.data.variant != "raw":
        print(f"note: this run was trained on the '{run.config.data.variant}' variant; the images are "
              f"classified as they are")
    result = inference.predict_folder(run.model, run.variables, run.class_names, _IMAGES.value, run.config.data,
                                      _RUN.batch_size.value or int(run.config.eval_batch_size),
                                      adapt_bn=_ADAPT_BN.value, progress=_RUN.progress.value)
    return result, fitted, heldout


def _predict_with_export():
    import numpy as np

    from urnet_jax import export, inference  # deferred: keeps --help instant

    description = export.read_model_json(_EXPORTED.value)
    data_config = description.get("data") or {"image_size": description["input"]["shape"][1]}
    fitted, heldout = _calibration_of(_EXPORTED.value, None)
    paths = inference.folder_images(_IMAGES.value)
    read = inference.image_reader(data_config)
    unreadable: list[tuple[str, str]] = []
    good, logits = [], []
    batch_size = _RUN.batch_size.value or 32
    for chunk, images in inference.image_batches(paths, read, batch_size, unreadable, _RUN.progress.value):
        good.extend(chunk)
        logits.append(export.predict_exported(_EXPORTED.value, images, batch_size, output="logits"))
    class_names = list(description["class_names"])
    logits = np.concatenate(logits) if logits else np.zeros((0, len(class_names)), np.float32)
    return inference.FolderPredictions(class_names, good, logits, unreadable), fitted, heldout


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    with cli.one_line_errors():
        cli.reject_positional_args(argv)
        if (_RUN.workdir.value is None) == (_EXPORTED.value is None):
            raise ConfigError("give exactly one of --workdir RUN or --exported DIR")
        if _EXPORTED.value is not None and _ADAPT_BN.value:
            raise ConfigError("--adapt-bn needs --workdir (an export's statistics are fixed)")
        if __name__ == "__main__":  # run as a script: the restart runs its command again
            cli.restart_with_host_memory_of_run(_RUN.workdir.value)
        from urnet_jax import (  # deferred: keeps --help instant
            differential_count,
            inference,
            quantification,
        )

        result, fitted, heldout = _predict_with_run() if _RUN.workdir.value else _predict_with_export()
        temperature = fitted.temperature if fitted else 1.0
        try:
            inference.write_predictions_csv(_OUT.value, result.paths, result.probabilities(temperature),
                                            result.class_names, unreadable=result.unreadable)
        except OSError as error:
            raise ConfigError(f"cannot write --out {_OUT.value}: {error.strerror or error}") from None
        counts = differential_count.differential_count(result.predicted, result.class_names)
        print(differential_count.format_differential_count(counts, result.unreadable))
        if heldout is not None and len(result.paths):
            print()
            if _ADAPT_BN.value:
                print("note: the correction's confusion matrix was measured without BatchNorm adaptation")
            rows = quantification.corrected_count(result.logits, heldout, result.class_names, _CORRECTION.value,
                                                  resamples=_RESAMPLES.value)
            print(quantification.format_corrected_count(rows))
        calibrated = (f"temperature-scaled probabilities (T = {temperature:.4g}, fitted on the {fitted.split} split)"
                      if fitted else "uncalibrated probabilities (no calibration.json)")
        print(f"per-image predictions ({calibrated}): {_OUT.value}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
