"""Export to a TensorFlow SavedModel and TFLite: parity with the JAX logits, model.json, the command, bad input.

Tolerance: float32 logits of the exported files match the JAX forward within 1e-4 (absolute; logits of
order 1). XLA (JAX), TensorFlow's XLA call and TFLite's kernels sum in different orders, so the files are
not bit-identical; observed differences are about 1e-6.
"""

import dataclasses
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny_run import REPO_ROOT, subprocess_env

from urnet_jax import compiler_options
from urnet_jax.calibration import Calibration, temperature_scaled, write_calibration
from urnet_jax.errors import ConfigError, DataError
from urnet_jax.export import (MODEL_JSON, SAVED_MODEL_DIR, SIGNATURE, TFLITE_FILE, export_model, predict_exported,
                              read_model_json)
from urnet_jax.models.composite import build_model

CLASSES = ["granulocyte", "monocyte", "lymphocyte"]
IMAGE_SIZE = 96
TOLERANCE = 1e-4
CALIBRATION = Calibration(temperature=2.0, split="validation", checkpoint="best", n=300, bins=15, ece_before=0.2,
                          ece_after=0.03, nll_before=0.9, nll_after=0.5)


def random_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def jax_logits(model, variables, images: np.ndarray) -> np.ndarray:
    forward = jax.jit(lambda images: model.apply(variables, images.astype(jnp.float32) / 255.0, train=False))
    return np.asarray(forward(images))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny UR-Net (fresh variables) exported with a temperature of 2: (model, variables, folder, summary)."""
    model = build_model(ml_collections.ConfigDict(
        {"enhancer": "urnet", "classifier": "resnet18", "enhancer_width": 4, "classifier_width": 4}), len(CLASSES))
    dummy = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    variables = compiler_options.run_unoptimised(model.init, jax.random.PRNGKey(0), dummy, train=False)
    out = tmp_path_factory.mktemp("export") / "tiny"
    summary = export_model(model, variables, CLASSES, IMAGE_SIZE, out, CALIBRATION, {"note": "tiny"})
    return model, variables, out, summary


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_exported_files_reproduce_the_jax_logits(exported):
    import tensorflow as tf

    model, variables, out, summary = exported
    images = random_images(5, seed=1)
    expected = jax_logits(model, variables, images)
    assert np.abs(expected).max() > 0.1  # a comparison of non-trivial logits
    saved = tf.saved_model.load(str(out / SAVED_MODEL_DIR)).signatures[SIGNATURE](images=tf.constant(images))
    interpreter = tf.lite.Interpreter(model_path=str(out / TFLITE_FILE))
    tflite = interpreter.get_signature_runner(SIGNATURE)(images=images)
    for outputs in ({name: value.numpy() for name, value in saved.items()}, tflite):
        np.testing.assert_allclose(outputs["logits"], expected, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(outputs["probabilities"], temperature_scaled(expected, 2.0), rtol=0,
                                   atol=TOLERANCE)
    assert set(summary.parity) == {"saved_model", "tflite"} and max(summary.parity.values()) < TOLERANCE
    assert summary.calibration == CALIBRATION and summary.tflite_bytes == (out / TFLITE_FILE).stat().st_size


def test_model_json_and_predict_exported(exported):
    model, variables, out, _ = exported
    description = read_model_json(out)
    assert description["class_names"] == CLASSES
    assert description["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC",
                                    "shape": [None, IMAGE_SIZE, IMAGE_SIZE, 3], "values": "RGB 0..255"}
    assert description["temperature"] == 2.0 and description["calibration"] == dataclasses.asdict(CALIBRATION)
    assert description["note"] == "tiny"
    assert sorted(path.name for path in out.iterdir()) == sorted([MODEL_JSON, SAVED_MODEL_DIR, TFLITE_FILE,
                                                                 "calibration.json"])
    images = random_images(5, seed=2)
    probabilities = predict_exported(out, images, batch_size=2)  # batches of 2, 2 and 1
    np.testing.assert_allclose(probabilities, temperature_scaled(jax_logits(model, variables, images), 2.0),
                               rtol=0, atol=TOLERANCE)
    with pytest.raises(DataError, match=r"uint8 images \(N, 96, 96, 3\)"):
        predict_exported(out, images[:, :64])
    with pytest.raises(DataError, match="no exported model"):
        predict_exported(out.parent, images)


def test_export_never_overwrites(exported, tmp_path):
    model, variables, _, _ = exported
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        export_model(model, variables, CLASSES, IMAGE_SIZE, taken)
    assert [path.name for path in tmp_path.iterdir()] == ["taken"]
    assert [path.name for path in taken.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------------------------------------------
# The command on a tiny trained run.


def run_export(*args):
    return subprocess.run([sys.executable, "-m", "urnet_jax.export", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)


def test_export_command_on_a_trained_run(trained_run, tmp_path):
    from urnet_jax.workdir import load_run

    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    write_calibration(workdir, dataclasses.replace(CALIBRATION, temperature=1.5))
    out = tmp_path / "exported"
    result = run_export("--workdir", workdir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"to {out} in " in result.stdout and "temperature 1.5 (fitted on the validation split)" in result.stdout
    description = read_model_json(out)
    run = load_run(workdir)
    assert description["class_names"] == run.class_names and description["checkpoint"] == "best"
    assert (description["enhancer"], description["classifier"], description["temperature"]) == ("urnet", "resnet18",
                                                                                                 1.5)
    images = random_images(6, seed=3)
    np.testing.assert_allclose(predict_exported(out, images),
                               temperature_scaled(jax_logits(run.model, run.variables, images), 1.5),
                               rtol=0, atol=TOLERANCE)


def test_export_of_a_run_without_checkpoint_is_one_line_and_writes_nothing(trained_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "exports" / "model"
    out.parent.mkdir()
    result = run_export("--workdir", workdir, "--out", out)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {workdir} has no 'best' checkpoint yet"
    assert result.stdout == "" and list(out.parent.iterdir()) == []
    missing = run_export("--workdir", workdir)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == (
        "error: give both --workdir RUN and --out DIR")
