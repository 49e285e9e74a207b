"""Wiring of evaluation and prediction on a tiny trained run: external validation (folder mapping, skip list,
errors, --adapt-bn leaving the checkpoint byte-identical), calibration and per-split predictions written by
evaluate.py, the corrected count of predict.py, predicting from an export, and the Table 4 / external
comparison layouts."""

import csv
import hashlib
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import SHARED_DATA
from tiny_run import REPO_ROOT, subprocess_env

import urnet_jax.data as data_lib
from urnet_jax.calibration import (
    Calibration,
    read_calibration,
    read_heldout,
    temperature_scaled,
)
from urnet_jax.evaluation.metrics import classification_metrics
from urnet_jax.evaluation.report import calibration_section, compare_report
from urnet_jax.evaluation.runner import evaluate_external, evaluate_run
from urnet_jax.evaluation.split_predictions import read_split_predictions
from urnet_jax.inference import adapted_variables, batched_logits, image_reader
from urnet_jax.models.registry import display_name
from urnet_jax.workdir import load_run

CLASSES = ["granulocyte", "monocyte", "lymphocyte"]
FOLDER_OF = {"granulocyte": "Neutrophil", "monocyte": "monocyte", "lymphocyte": "LYMPHOCYTE"}


def run_script(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory):
    """A private copy of the tiny run, evaluated once (calibrated on its validation split)."""
    workdir = tmp_path_factory.mktemp("external") / "run"
    shutil.copytree(trained_run, workdir, ignore=shutil.ignore_patterns("eval", "calibration.json",
                                                                        "heldout_predictions.npz"))
    evaluate_run(workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def lab_folder(run_copy, tmp_path_factory):
    """The test split's source files under lab-style folder names, plus a corrupt file and a hidden one."""
    root = tmp_path_factory.mktemp("lab") / "lab_b"
    manifest = data_lib.read_manifest(load_run(run_copy).prepared_dir, "test")
    for row in manifest:
        folder = root / FOLDER_OF[row["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["path"], folder / f"{row['index']}.png")
    (root / "monocyte" / "broken.png").write_bytes(b"not an image")
    (root / "monocyte" / ".hidden.png").write_bytes(b"junk")
    return root, manifest


def checkpoint_digests(workdir):
    return {str(path.relative_to(workdir)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((workdir / "checkpoints").rglob("*")) if path.is_file()}


def test_evaluate_writes_calibration_and_split_predictions(run_copy):
    eval_dir = run_copy / "eval"
    run = load_run(run_copy)
    manifest = data_lib.read_manifest(run.prepared_dir, "test")
    stored = read_split_predictions(eval_dir / "predictions_test.csv")
    val = read_split_predictions(eval_dir / "predictions_val.csv")
    assert stored.class_names == val.class_names == CLASSES
    assert len(val.indices) == len(data_lib.read_manifest(run.prepared_dir, "val")) > 0
    np.testing.assert_array_equal(stored.indices, np.arange(len(manifest)))
    np.testing.assert_array_equal(stored.labels, [row["label_id"] for row in manifest])
    images = np.concatenate([b["image"][b["mask"]] for b in data_lib.eval_batches(run.prepared_dir, "test", 8)])
    logits = batched_logits(run.model, run.variables, images, 8)
    np.testing.assert_array_equal(stored.predicted, logits.argmax(-1))
    np.testing.assert_allclose(stored.probabilities, temperature_scaled(logits), atol=5e-5 + 1e-6)
    line = (eval_dir / "predictions_test.csv").read_text().splitlines()[1].split(",")
    assert all(len(value.split(".")[1]) == 4 for value in line[3:])  # 4 decimals

    calibration, heldout = read_calibration(run_copy), read_heldout(run_copy)
    assert (calibration.split, heldout.split, calibration.n) == ("val", "val", len(val.indices))
    np.testing.assert_array_equal(heldout.labels, val.labels)
    np.testing.assert_allclose(temperature_scaled(heldout.logits), val.probabilities, atol=5e-5 + 1e-6)
    assert calibration.nll_after <= calibration.nll_before + 1e-9  # the fitted T minimises the NLL
    report = (eval_dir / "report.md").read_text()
    assert "## Calibration (temperature scaling)" in report and "](reliability.png)" in report
    assert f"fitted on the val split, {len(val.indices)} images (checkpoint 'best')." in report
    assert f"{100 * calibration.ece_before:.2f}% before, {100 * calibration.ece_after:.2f}% after" in report
    assert (eval_dir / "reliability.png").stat().st_size > 0


def test_report_says_when_the_test_split_calibrated():
    calibration = Calibration(temperature=1.5, split="test", checkpoint="best", n=9, bins=15, ece_before=0.2,
                              ece_after=0.1, nll_before=1.0, nll_after=0.9)
    text = "\n".join(calibration_section(calibration, "test split, 9 images (checkpoint 'best')", True, "r.png"))
    assert ("fitted on the test split, 9 images (checkpoint 'best'): this run has no validation split, so the "
            "temperature was fitted on the test split, and test-split calibration numbers are optimistic") in text
    assert "20.00% before, 10.00% after" in text


def test_external_evaluation_maps_folders_and_lists_unreadable_files(run_copy, lab_folder):
    root, manifest = lab_folder
    result = run_script("evaluate.py", "--workdir", run_copy, "--data-dir", root, "--name", "lab", "--noprogress")
    assert result.returncode == 0, result.stderr
    out = run_copy / "eval" / "lab"
    metrics = json.loads((out / "metrics.json").read_text())
    details = json.loads((out / "external.json").read_text())
    # The same files as the test split, read as in training: the same predictions as the test split.
    test_metrics = json.loads((run_copy / "eval" / "metrics.json").read_text())
    assert metrics == test_metrics
    assert details["folders"] == {c: [FOLDER_OF[c]] for c in CLASSES} and details["class_map"] == "wbc3"
    assert details["images"] == len(manifest) and not details["adapt_bn"]
    assert [path.rsplit("/", 1)[1] for path, _ in details["unreadable"]] == ["broken.png"]
    assert details["balanced_accuracy"] == pytest.approx(metrics["macro"]["recall"])
    assert result.stdout.startswith(f"lab: accuracy {100 * metrics['accuracy']:.2f}%, balanced accuracy ")
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(manifest) + 1 and rows[-1]["error"].startswith("not an image")
    report = (out / "report.md").read_text()
    assert "## Unreadable files (skipped)" in report and "broken.png" in report
    for figure in ("confusion_matrix", "enhanced", "gradcam"):
        assert f"]({figure}.png)" in report and (out / f"{figure}.png").stat().st_size > 0

    text = compare_report([run_copy])
    assert "## External validation (%)" in text
    accuracy = f"{100 * metrics['accuracy']:.2f}"
    assert f"| run | own test split | {len(manifest)} | {accuracy} |" in text
    assert f"| run | lab | {len(manifest)} | {accuracy} |" in text


def test_external_evaluation_errors_are_one_line_and_write_nothing(run_copy, tmp_path):
    extra = tmp_path / "extra"
    for folder in ("granulocyte", "monocyte", "platelet"):
        (extra / folder).mkdir(parents=True)
        (extra / folder / "a.png").write_bytes(b"not an image")
    unreadable = tmp_path / "unreadable"
    for folder in FOLDER_OF.values():
        (unreadable / folder).mkdir(parents=True)
        (unreadable / folder / "a.png").write_bytes(b"")
    for args, message in (
            (["--data-dir", extra, "--class-map", "folders"],
             "folder(s) platelet of " + str(extra) + " map to class 'platelet', which the run does not have"),
            (["--data-dir", unreadable], "no readable image in " + str(unreadable) + " (3 unreadable files"),
            (["--data-dir", extra], "class_map 'wbc3': class 'lymphocyte' needs one of the folders"),
            (["--data-dir", tmp_path / "missing"], "data directory not found"),
            (["--data-dir", unreadable, "--name", "../x"], "--name must be a plain folder name"),
            (["--adapt-bn"], "--adapt-bn need(s) --data-dir")):
        result = run_script("evaluate.py", "--workdir", run_copy, *args, "--noprogress")
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr
    assert not (run_copy / "eval" / "extra").exists() and not (run_copy / "eval" / "unreadable").exists()


def test_adapt_bn_changes_only_batch_stats_and_never_the_checkpoint(run_copy, lab_folder):
    root, _ = lab_folder
    before = checkpoint_digests(run_copy)
    result = run_script("evaluate.py", "--workdir", run_copy, "--data-dir", root, "--name", "lab_adapted",
                        "--adapt-bn", "--noprogress")
    assert result.returncode == 0, result.stderr
    assert checkpoint_digests(run_copy) == before and before
    assert json.loads((run_copy / "eval" / "lab_adapted" / "external.json").read_text())["adapt_bn"]
    assert "BatchNorm adapted" in result.stdout

    run = load_run(run_copy)
    read = image_reader(run.config.data)
    paths = sorted(root.rglob("*.png"))
    adapted = adapted_variables(run.model, run.variables, paths, read, 8)
    jax.tree.map(np.testing.assert_array_equal, adapted["params"], run.variables["params"])
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), adapted["batch_stats"],
                                           run.variables["batch_stats"]))
    assert all(changed), f"{sum(changed)} of {len(changed)} statistics changed"
    assert load_run(run_copy).variables["batch_stats"] is not adapted["batch_stats"]


def test_predict_prints_raw_and_corrected_counts_with_calibrated_probabilities(run_copy, lab_folder, tmp_path):
    root, manifest = lab_folder
    out = tmp_path / "preds.csv"
    result = run_script("predict.py", "--workdir", run_copy, "--images", root, "--out", out, "--noprogress",
                        "--resamples", "50")
    assert result.returncode == 0, result.stderr
    calibration = read_calibration(run_copy)
    assert f"Differential count of {len(manifest)} classified image(s):" in result.stdout
    assert "Corrected differential count" in result.stdout and "adjusted count (Forman 2008)" in result.stdout
    assert f"estimated from the val split, {read_calibration(run_copy).n} images (checkpoint 'best')" in result.stdout
    corrected = [line.split() for line in result.stdout.split("Corrected")[1].splitlines()
                 if line.split()[:1] and line.split()[0] in CLASSES]
    assert sum(float(parts[3].rstrip("%")) for parts in corrected) == pytest.approx(100.0, abs=0.05)
    assert f"T = {calibration.temperature:.4g}" in result.stdout

    run = load_run(run_copy)
    with open(out) as handle:
        rows = [row for row in csv.DictReader(handle) if not row["error"]]
    images = np.stack([image_reader(run.config.data)(path) for path in (row["path"] for row in rows)])
    expected = temperature_scaled(batched_logits(run.model, run.variables, images, 8), calibration.temperature)
    got = np.array([[float(row[f"prob_{c}"]) for c in CLASSES] for row in rows])
    np.testing.assert_allclose(got, expected, atol=2e-5)

    em = run_script("predict.py", "--workdir", run_copy, "--images", root, "--out", out, "--noprogress",
                    "--resamples", "20", "--correction", "em")
    assert em.returncode == 0, em.stderr
    assert "EM prior shift" in em.stdout


def test_predict_without_calibration_is_a_one_line_error(trained_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir, ignore=shutil.ignore_patterns("eval", "calibration.json",
                                                                        "heldout_predictions.npz"))
    (tmp_path / "cells").mkdir()
    result = run_script("predict.py", "--workdir", workdir, "--images", tmp_path / "cells")
    assert result.returncode == 2
    assert result.stderr == (f"error: {workdir} is not calibrated for its 'best' checkpoint: run `python evaluate.py "
                             "--workdir RUN --checkpoint best` first (and export the run again if it is an export), "
                             "or use --correction none\n")
    both = run_script("predict.py", "--workdir", workdir, "--exported", workdir, "--images", tmp_path / "cells")
    assert both.returncode == 2 and "exactly one of --workdir RUN or --exported DIR" in both.stderr


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_predict_from_an_export_matches_the_run(run_copy, lab_folder, tmp_path):
    from urnet_jax.export import export_run

    root, _ = lab_folder
    export_run(run_copy, tmp_path / "exported")
    outputs = {}
    for name, source in (("run", ["--workdir", run_copy]), ("export", ["--exported", tmp_path / "exported"])):
        out = tmp_path / f"{name}.csv"
        result = run_script("predict.py", *source, "--images", root, "--out", out, "--noprogress", "--resamples", "30")
        assert result.returncode == 0, result.stderr
        with open(out) as handle:
            outputs[name] = (result.stdout, list(csv.DictReader(handle)))
    (run_stdout, run_rows), (export_stdout, export_rows) = outputs["run"], outputs["export"]
    assert [row["predicted_label"] for row in export_rows] == [row["predicted_label"] for row in run_rows]
    for a, b in zip(run_rows, export_rows):
        if not a["error"]:
            np.testing.assert_allclose([float(a[f"prob_{c}"]) for c in CLASSES],
                                       [float(b[f"prob_{c}"]) for c in CLASSES], atol=1e-4)
    assert export_stdout.split("Corrected")[0] == run_stdout.split("Corrected")[0]  # the same raw count


def test_compare_shows_table4_with_the_papers_numbers(run_copy, tmp_path):
    metrics = json.loads((run_copy / "eval" / "metrics.json").read_text())
    config = json.loads((run_copy / "config.json").read_text())
    runs = []
    for name, enhancer in (("urnet_run", "urnet"), ("huang_run", "rsgunet"), ("net1_run", "none")):
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "metrics.json").write_text(json.dumps(metrics))
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "model": {**config["model"],
                                                                                        "enhancer": enhancer}}))
        runs.append(tmp_path / name)
    text = compare_report(runs)
    table = text.split("## Comparison methods (the paper's Table 4 layout, %)")[1]
    header = [line for line in table.splitlines() if line.startswith("|  |")][0]
    assert header == (f"|  | urnet_run (UR-Net + ResNet18) | paper: UR-Net | huang_run ({display_name('rsgunet')} + "
                      "ResNet18) | paper: Huang et al. 2018 | net1_run (none + ResNet18) |")
    accuracy = f"{100 * metrics['accuracy']:.2f}"
    assert f"| test accuracy | {accuracy} | 83.34 | {accuracy} | 81.79 | {accuracy} |" in table
    recall = f"{100 * metrics['per_class']['monocyte']['recall']:.2f}"
    assert f"| recall monocyte | {recall} | 65.90 | {recall} | n/a | {recall} |" in table


def test_tecom_external_evaluation(run_copy):
    """The shared Tecom set (another lab), when this machine has it: every readable file is counted."""
    tecom = SHARED_DATA / "external" / "tecom"
    if not tecom.is_dir():
        pytest.skip(f"external Tecom data not found at {tecom} (only present on the project's machines)")
    metrics, details = evaluate_external(run_copy, tecom, name="tecom", progress=False)
    files = [path for path in tecom.rglob("*") if path.is_file() and not path.name.startswith(".")]
    assert details["images"] + len(details["unreadable"]) == len(files)
    assert sum(map(sum, metrics["confusion_matrix"])) == details["images"]
    assert set(details["folders"]) == set(CLASSES)
    assert classification_metrics([0], [0], CLASSES)["classes"] == metrics["classes"]
