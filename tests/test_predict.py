"""predict.py: folder discovery, the predictions CSV, differential count output, and the command on a folder
with corrupt files."""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tiny_run import REPO_ROOT, subprocess_env

from urnet_jax.differential_count import differential_count, format_differential_count
from urnet_jax.inference import FolderPredictions, find_images, write_predictions_csv

CLASSES = ["granulocyte", "monocyte", "lymphocyte"]


def test_find_images_is_recursive_and_skips_hidden_and_non_images(tmp_path):
    for name in ("a.png", "sub/b.JPG", "sub/deeper/c.tiff", ".hidden.png", ".cache/d.png", "notes.txt",
                 "sub/e.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory with an image-like name is not an image
    found = [path.relative_to(tmp_path).as_posix() for path in find_images(tmp_path)]
    assert found == ["a.png", "sub/b.JPG", "sub/deeper/c.tiff", "sub/e.jpeg"]


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_predictions_csv_and_count_include_unreadable_files(tmp_path):
    result = FolderPredictions(
        class_names=CLASSES, paths=[tmp_path / "a.png", tmp_path / "b.png"],
        logits=np.log(np.array([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]])),
        unreadable=[(str(tmp_path / "bad.png"), "corrupt or truncated image")])
    np.testing.assert_array_equal(result.predicted, [1, 0])
    np.testing.assert_allclose(result.probabilities(2.0)[0], np.array([0.1, 0.7, 0.2]) ** 0.5 / np.sum(
        np.array([0.1, 0.7, 0.2]) ** 0.5))  # softmax(log p / T)
    write_predictions_csv(tmp_path / "preds.csv", result.paths, result.probabilities(), CLASSES,
                          unreadable=result.unreadable)
    rows = read_csv(tmp_path / "preds.csv")
    assert list(rows[0]) == ["path", "true_label", "predicted_label", *[f"prob_{c}" for c in CLASSES], "error"]
    assert [row["path"] for row in rows] == [str(tmp_path / name) for name in ("a.png", "b.png", "bad.png")]
    assert [row["predicted_label"] for row in rows] == ["monocyte", "granulocyte", ""]
    assert [row["true_label"] for row in rows] == ["", "", ""]  # unknown for a folder of images
    assert rows[0]["prob_monocyte"] == "0.700000" and rows[2]["prob_monocyte"] == ""
    assert [row["error"] for row in rows] == ["", "", "corrupt or truncated image"]
    text = format_differential_count(differential_count(result.predicted, CLASSES), result.unreadable)
    assert "Differential count of 2 classified image(s)" in text
    assert "monocyte          1    50.00%  [9.45%, 90.55%]" in text
    assert "Unreadable files: 1" in text and "bad.png: corrupt or truncated image" in text


def test_predictions_csv_with_true_labels(tmp_path):
    """The schema evaluate.py writes for a labelled split: the same columns, true_label filled in."""
    probabilities = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    write_predictions_csv(tmp_path / "preds.csv", ["x.png", "y.png"], probabilities, CLASSES, true_labels=[2, 1])
    rows = read_csv(tmp_path / "preds.csv")
    assert [(row["true_label"], row["predicted_label"], row["error"]) for row in rows] == [
        ("lymphocyte", "lymphocyte", ""), ("monocyte", "granulocyte", "")]
    assert [float(rows[1][f"prob_{c}"]) for c in CLASSES] == [0.6, 0.3, 0.1]
    with pytest.raises(ValueError):  # one true label per file
        write_predictions_csv(tmp_path / "bad.csv", ["x.png", "y.png"], probabilities, CLASSES, true_labels=[2])


def test_empty_count_is_well_defined():
    rows = differential_count([], CLASSES)
    assert [(row.count, row.percent, row.ci_low, row.ci_high) for row in rows] == [(0, 0.0, 0.0, 100.0)] * 3


# ---------------------------------------------------------------------------------------------------
# The command on a tiny trained run.


def run_predict(*args):
    return subprocess.run([sys.executable, "predict.py", *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)


def test_the_block_cache_changes_no_prediction(trained_run, tmp_path):
    """predict.py restarts once with the block cache where $URNET_JAX_BLOCK_CACHE=1 asks for it (a run trained
    with XLA's convolutions, like the tiny one, gets no cache by default), and writes the same predictions."""
    import urnet_jax.data as data_lib
    from urnet_jax import host_memory
    from urnet_jax.workdir import load_run, saved_conv_backend

    reason = host_memory.block_cache_unavailable()
    if reason is not None:
        pytest.skip(f"no block cache here: {reason}")
    assert saved_conv_backend(trained_run) == "xla" and saved_conv_backend(tmp_path) is None
    folder = tmp_path / "cells"
    folder.mkdir()
    for i, row in enumerate(data_lib.read_manifest(load_run(trained_run).prepared_dir, "test")[:6]):
        shutil.copy(row["path"], folder / f"cell{i}.png")
    outputs = {}
    for value in ("0", "1"):
        outputs[value] = tmp_path / f"preds_{value}.csv"
        result = subprocess.run(
            [sys.executable, "predict.py", "--workdir", str(trained_run), "--images", str(folder), "--out",
             str(outputs[value]), "--noprogress", "--correction", "none"], cwd=REPO_ROOT, capture_output=True,
            text=True, env={**subprocess_env(), host_memory.BLOCK_CACHE_ENV: value}, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("restarting with LD_PRELOAD=") == int(value)
    assert outputs["1"].read_text() == outputs["0"].read_text()


def uncalibrated_copy(trained_run, tmp_path):
    """A copy of the tiny run without what evaluate.py adds (eval/, calibration.json, held-out predictions)."""
    copy = tmp_path / "uncalibrated_run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("eval", "calibration.json",
                                                                     "heldout_predictions.npz"))
    return copy


def test_predict_counts_a_folder_with_corrupt_files(trained_run, tmp_path):
    import urnet_jax.data as data_lib
    from urnet_jax.inference import batched_probabilities
    from urnet_jax.workdir import load_run

    trained_run = uncalibrated_copy(trained_run, tmp_path)
    run = load_run(trained_run)
    manifest = data_lib.read_manifest(run.prepared_dir, "test")
    folder = tmp_path / "cells"
    copies = []
    for i, row in enumerate(manifest):  # the test split's source files, spread over nested folders
        target = folder / f"slide{i % 2}" / ("deep" if i % 3 == 0 else "") / f"cell{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["path"], target)
        copies.append(target)
    (folder / "slide0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / ".hidden.png").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.csv"

    result = run_predict("--workdir", trained_run, "--images", folder, "--out", out, "--noprogress",
                         "--correction", "none")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert f"Differential count of {len(manifest)} classified image(s):" in lines
    class_lines = [line.split() for line in lines if line.split()[:1] and line.split()[0] in CLASSES]
    assert [parts[0] for parts in class_lines] == CLASSES
    assert sum(int(parts[1]) for parts in class_lines) == len(manifest)
    assert sum(float(parts[2].rstrip("%")) for parts in class_lines) == pytest.approx(100.0, abs=0.02)
    assert "Unreadable files: 2" in lines
    assert "Corrected differential count" not in result.stdout
    assert lines[-1] == f"per-image predictions (uncalibrated probabilities (no calibration.json)): {out}"
    assert f"  {folder / 'slide0' / 'broken.png'}: not an image (format not recognised)" in lines
    assert f"  {folder / 'empty.jpg'}: empty file" in lines

    rows = {pathlib.Path(row["path"]).name: row for row in read_csv(out)}
    assert set(rows) == {path.name for path in copies} | {"broken.png", "empty.jpg"}
    assert rows["broken.png"]["predicted_label"] == "" and rows["broken.png"]["error"]
    # Files decoded by predict.py get the probabilities of the prepared test split's pixels.
    images = np.concatenate([b["image"][b["mask"]] for b in data_lib.eval_batches(run.prepared_dir, "test", 8)])
    expected = batched_probabilities(run.model, run.variables, images, 8)
    for i, path in enumerate(copies):
        got = [float(rows[path.name][f"prob_{c}"]) for c in CLASSES]
        np.testing.assert_allclose(got, expected[i], atol=2e-5)


def test_predict_errors_are_one_line(trained_run, tmp_path):
    no_checkpoint = tmp_path / "run"
    no_checkpoint.mkdir()
    config = json.loads((trained_run / "config.json").read_text())
    config["data"]["prepared_dir"] = str(trained_run / "data")
    (no_checkpoint / "config.json").write_text(json.dumps(config))
    images = tmp_path / "images"
    images.mkdir()
    for args, message in (
            (["--workdir", tmp_path / "missing", "--images", images], "holds no training run"),
            (["--workdir", no_checkpoint, "--images", images], "no 'best' checkpoint"),
            (["--workdir", trained_run, "--images", tmp_path / "nowhere"], "is not a directory"),
            (["--workdir", trained_run, "--images", images], "no image files"),
            (["--workdir", trained_run, "--images", images, "--checkpoint", "first"], "checkpoint must be one of"),
            (["--workdir", trained_run, "--images", images, "--batch-size", "0"], "0 is not a positive integer"),
            (["--workdir", trained_run], "Flag --images must have a value"),
            (["--workdir", trained_run, "--images"], "Missing value for flag --images"),
            (["--workdir", trained_run, "--images", images, "--no-progress"],
             "Unknown command line flag 'no-progress'"),
            (["--workdir", trained_run, "--images", images, "extra"], "unexpected argument(s): extra")):
        result = run_predict("--correction=none", *args)  # the folder's errors, calibrated or not
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr


def test_a_run_loads_from_a_relative_workdir(trained_run, monkeypatch):  # noqa: F811
    """`--workdir runs/x` as users type it: orbax needs absolute paths, the library makes them so."""
    from urnet_jax.workdir import load_run

    monkeypatch.chdir(trained_run.parent)
    for checkpoint in ("best", "latest"):
        run = load_run(trained_run.name, checkpoint)
        assert set(run.variables) == {"params", "batch_stats"}
