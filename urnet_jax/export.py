"""Export a trained run so that it runs without JAX: a TensorFlow SavedModel and a TFLite (LiteRT) file.

    python -m urnet_jax.export --workdir runs/urnet --out exported/urnet [--checkpoint best]

The exported function is the whole model in inference mode (enhancer + classifier, BatchNorm with its
running statistics) at the run's fixed image size, preprocessing included:

    images: uint8 (N, S, S, 3) RGB, NHWC, values 0..255 (any batch size N)
    -> logits (N, K) float32, probabilities (N, K) float32 = softmax(logits / T)

T is the temperature of the run's calibration.json when it was fitted for the exported checkpoint, else 1.
It is converted with `jax.experimental.jax2tf` (lowered for the CPU, the weights as TensorFlow
variables) to DIR/saved_model/ (signature "serving_default"), then with TensorFlow's TFLite converter to
DIR/model.tflite; DIR/model.json lists the class names, the input and outputs, the temperature and (for a
run) its data settings; a calibrated export also holds calibration.json and heldout_predictions.npz. The
export checks itself: both files must reproduce the JAX logits on random images. Everything is written to
a temporary folder next to DIR and renamed to DIR at the end, so an export that fails leaves nothing
behind.

From Python, `predict_exported(DIR, images)` returns the probabilities, with the LiteRT interpreter
(package `ai-edge-litert`) when installed, else TensorFlow's `tf.lite.Interpreter`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import app, flags, logging

from urnet_jax import cli
from urnet_jax.errors import ConfigError, DataError, RunError

if TYPE_CHECKING:
    from urnet_jax.calibration import Calibration, HeldOutPredictions

SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
MODEL_JSON = "model.json"
SIGNATURE = "serving_default"
INPUT_NAME = "images"
PARITY_IMAGES = 4  # random images the export is checked on
# An export whose logits differ from JAX's by more than this (relative to max(1, |logits|)) is broken;
# float32 conversions agree to about 1e-6.
PARITY_TOLERANCE = 1e-3

@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What an export wrote: the folder, the TFLite file's size (bytes), the largest |logit| difference
    to JAX of each exported format on PARITY_IMAGES random images, the calibration whose temperature the
    probabilities use (None: temperature 1), and the seconds taken."""

    out: pathlib.Path
    tflite_bytes: int
    parity: dict[str, float]
    calibration: Calibration | None
    seconds: float


def _tensorflow() -> Any:
    """TensorFlow, kept off any GPU (JAX may be using it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


def _serving_function(model: Any, temperature: float) -> Any:
    """f(variables, images uint8 (N, S, S, 3)) -> {"logits", "probabilities"} (N, K) float32, eval mode."""
    import jax
    import jax.numpy as jnp

    from urnet_jax.steps import to_unit_range

    def serve(variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        logits = model.apply(variables, to_unit_range(images), train=False).astype(jnp.float32)
        return {"logits": logits, "probabilities": jax.nn.softmax(logits / temperature, axis=-1)}

    return serve


def _write_saved_model(tf: Any, serve: Any, variables: Mapping[str, Any], image_size: int,
                       path: pathlib.Path) -> None:
    from jax.experimental import jax2tf

    weights = tf.nest.map_structure(lambda value: tf.Variable(value, trainable=False), variables)
    converted = jax2tf.convert(serve, polymorphic_shapes=[None, f"(b, {image_size}, {image_size}, 3)"],
                               with_gradient=False, native_serialization_platforms=("cpu",))
    module = tf.Module()
    module.weights = tf.nest.flatten(weights)  # tracked, so that the SavedModel stores them
    module.serve = tf.function(
        lambda images: converted(weights, images), autograph=False,
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name=INPUT_NAME)])
    tf.saved_model.save(module, str(path), signatures={SIGNATURE: module.serve})


def _write_tflite(tf: Any, saved_model: pathlib.Path, path: pathlib.Path) -> int:
    try:
        flat = tf.lite.TFLiteConverter.from_saved_model(str(saved_model)).convert()
    except Exception as error:  # the converter reports unsupported operations in many forms
        message = str(error).strip().splitlines()
        raise RunError(f"TFLite conversion failed: {message[0] if message else type(error).__name__}") from None
    path.write_bytes(flat)
    return len(flat)


def _tflite_interpreter(model_path: pathlib.Path) -> Any:
    """A LiteRT interpreter of `model_path` (ai_edge_litert when installed, else TensorFlow's)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = _tensorflow().lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TensorFlow's copy warns that it moved to ai_edge_litert
        return Interpreter(model_path=str(model_path))


def _exported_outputs(export_dir: pathlib.Path, images: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """{"saved_model": outputs, "tflite": outputs} of the exported files for uint8 `images`."""
    tf = _tensorflow()
    signature = tf.saved_model.load(str(export_dir / SAVED_MODEL_DIR)).signatures[SIGNATURE]
    saved = {name: value.numpy() for name, value in signature(**{INPUT_NAME: tf.constant(images)}).items()}
    runner = _tflite_interpreter(export_dir / TFLITE_FILE).get_signature_runner(SIGNATURE)
    return {"saved_model": saved, "tflite": runner(**{INPUT_NAME: images})}


def _check_parity(serve: Any, variables: Mapping[str, Any], image_size: int, export_dir: pathlib.Path
                  ) -> dict[str, float]:
    """Largest |logit| difference of each exported format to the JAX forward (on the CPU) on random images;
    RunError when one exceeds PARITY_TOLERANCE * max(1, max |logit|)."""
    import jax

    images = np.random.default_rng(0).integers(0, 256, (PARITY_IMAGES, image_size, image_size, 3), np.uint8)
    with jax.default_device(jax.devices("cpu")[0]):
        expected = np.asarray(jax.jit(serve)(variables, images)["logits"])
    scale = max(1.0, float(np.abs(expected).max()))
    parity = {}
    for name, outputs in _exported_outputs(export_dir, images).items():
        parity[name] = float(np.abs(outputs["logits"] - expected).max())
        if not parity[name] <= PARITY_TOLERANCE * scale:
            raise RunError(f"the exported {name} does not reproduce the JAX logits (largest difference "
                           f"{parity[name]:.3g}); the conversion is broken")
    return parity


def _check_out(out: pathlib.Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists; choose a new folder (nothing was written)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")


def export_model(model: Any, variables: Mapping[str, Any], class_names: Sequence[str], image_size: int,
                 out: str | pathlib.Path, calibration: Calibration | None = None,
                 metadata: Mapping[str, Any] | None = None, heldout: HeldOutPredictions | None = None
                 ) -> ExportSummary:
    """Exports `model` (an EnhanceClassify) with `variables` {'params', 'batch_stats'} for uint8 images
    (N, image_size, image_size, 3) to the new folder `out` (see the module docstring), the probabilities
    scaled by the temperature of `calibration`; `metadata` is added to model.json. With `calibration`,
    calibration.json is copied into the export, and with `heldout` heldout_predictions.npz (what
    `predict.py --exported` needs for the corrected count). Writes nothing at `out` unless the whole
    export succeeds."""
    import jax

    from urnet_jax.calibration import write_calibration, write_heldout
    from urnet_jax.models import layers

    started = time.perf_counter()
    out = pathlib.Path(out)
    _check_out(out)
    tf = _tensorflow()
    variables = jax.device_get(variables)
    temperature = calibration.temperature if calibration else 1.0
    serve = _serving_function(model, temperature)
    staging = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        # XLA's convolutions whatever the run trained with: the files must run without this process's oneDNN
        # library (a SavedModel cannot hold its FFI calls); the weights are the same.
        with layers.conv_backend_scope("xla"):
            _write_saved_model(tf, serve, variables, image_size, staging / SAVED_MODEL_DIR)
            tflite_bytes = _write_tflite(tf, staging / SAVED_MODEL_DIR, staging / TFLITE_FILE)
            parity = _check_parity(serve, variables, image_size, staging)
        description = {
            "class_names": list(class_names),
            "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC",
                      "shape": [None, image_size, image_size, 3], "values": "RGB 0..255"},
            "outputs": {"logits": "float32 (N, K)", "probabilities": "float32 (N, K), softmax(logits / temperature)"},
            "temperature": temperature,
            "calibration": dataclasses.asdict(calibration) if calibration else None, "signature": SIGNATURE,
            "files": {"saved_model": SAVED_MODEL_DIR, "tflite": TFLITE_FILE},
            "parity_max_abs_logit_difference": parity, **(metadata or {})}
        (staging / MODEL_JSON).write_text(json.dumps(description, indent=2) + "\n")
        if calibration is not None:
            write_calibration(staging, calibration)
        if heldout is not None:
            write_heldout(staging, heldout)
        staging.chmod(0o755)  # mkdtemp's folders are private to the user
        if out.exists():
            out.rmdir()  # an empty folder (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportSummary(out, tflite_bytes, parity, calibration, time.perf_counter() - started)


def export_run(workdir: str | pathlib.Path, out: str | pathlib.Path, checkpoint: str = "best") -> ExportSummary:
    """Exports the `checkpoint` weights of the run in `workdir` to the new folder `out`, with the run's
    calibrated temperature when its calibration.json was fitted for that checkpoint."""
    from urnet_jax.calibration import (
        CALIBRATION_FILE,
        HELDOUT_FILE,
        read_calibration,
        read_heldout,
    )
    from urnet_jax.workdir import load_run

    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    _check_out(out)
    run = load_run(workdir, checkpoint)
    calibration = read_calibration(workdir) if (workdir / CALIBRATION_FILE).is_file() else None
    if calibration is not None and calibration.checkpoint != checkpoint:
        calibration = None
    heldout = read_heldout(workdir) if calibration is not None and (workdir / HELDOUT_FILE).is_file() else None
    metadata = {"checkpoint": checkpoint, "enhancer": run.config.model.enhancer,
                "classifier": run.config.model.classifier, "data": run.config.data.to_dict()}
    return export_model(run.model, run.variables, run.class_names, int(run.config.data.image_size), out,
                        calibration, metadata, heldout)


def read_model_json(export_dir: str | pathlib.Path) -> dict[str, Any]:
    """The model.json of an export; DataError (one line) when `export_dir` holds no export."""
    path = pathlib.Path(export_dir) / MODEL_JSON
    if not path.is_file():
        raise DataError(f"{export_dir} holds no exported model (no {MODEL_JSON})")
    return json.loads(path.read_text())


def predict_exported(export_dir: str | pathlib.Path, images: np.ndarray, batch_size: int = 32,
                     output: str = "probabilities") -> np.ndarray:
    """Probabilities (N, K) float32 (temperature-scaled when the export is calibrated, see model.json), or
    with output="logits" the logits (N, K), of the exported TFLite model for uint8 `images` (N, S, S, 3),
    S the export's image size; no JAX needed."""
    if output not in ("probabilities", "logits"):
        raise ConfigError(f"output must be 'probabilities' or 'logits', got {output!r}")
    export_dir = pathlib.Path(export_dir)
    description = read_model_json(export_dir)
    shape = tuple(description["input"]["shape"][1:])
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != shape:
        raise DataError(f"the exported model takes uint8 images (N, {', '.join(map(str, shape))}), got "
                        f"{images.dtype} {images.shape}")
    runner = _tflite_interpreter(export_dir / description["files"]["tflite"]).get_signature_runner(SIGNATURE)
    batches = [runner(**{INPUT_NAME: images[start:start + batch_size]})[output]
               for start in range(0, len(images), batch_size)]
    return np.concatenate(batches) if batches else np.zeros((0, len(description["class_names"])), np.float32)


def define_flags() -> None:
    """The command's flags; defined only when it runs, so that importing this module (for
    `predict_exported`) leaves the importing program's flags alone."""
    flags.DEFINE_string("workdir", None, "the training run's directory")
    flags.DEFINE_string("out", None, "the folder to create with the exported model (must not exist yet)")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                      "best: the weights chosen on the run's selection split (train.select_on); latest: the last checkpoint")


def main(argv: list[str]) -> None:
    """`python -m urnet_jax.export --workdir RUN --out DIR [--checkpoint best|latest]`."""
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the data readers import TensorFlow
    workdir, out, checkpoint = flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.checkpoint
    with cli.one_line_errors():
        cli.reject_positional_args(argv)
        if not workdir or not out:
            raise ConfigError("give both --workdir RUN and --out DIR")
        summary = export_run(workdir, out, checkpoint)
        calibration = summary.calibration
        calibrated = (f"temperature {calibration.temperature:.4g} (fitted on the {calibration.split} split)"
                      if calibration else "not calibrated for this checkpoint (temperature 1)")
        agreement = ", ".join(f"{name} {difference:.2g}" for name, difference in summary.parity.items())
        print(f"exported {workdir} ({checkpoint} checkpoint) to {summary.out} in "
              f"{summary.seconds:.1f} s: {SAVED_MODEL_DIR}/, {TFLITE_FILE} ({summary.tflite_bytes / 1e6:.1f} MB), "
              f"{MODEL_JSON}; {calibrated}; largest |logit| difference to JAX: {agreement}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
