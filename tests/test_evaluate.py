"""Figures, perturbations and the end-to-end `evaluate.py` on a tiny trained run."""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_run import REPO_ROOT, lowered_programs, subprocess_env, tiny_config

import urnet_jax.data as data_lib
from urnet_jax.evaluation import figures
from urnet_jax.evaluation.metrics import classification_metrics
from urnet_jax.evaluation.report import compare_report
from urnet_jax.evaluation.robustness import SEVERITIES, gaussian_blur, perturb, robustness_curves
from urnet_jax.evaluation.runner import evaluate_run

CLASSES = ["granulocyte", "monocyte", "lymphocyte"]


def assert_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def fake_robustness(modes=("with_enhancer", "without_enhancer")):
    return {"num_examples": 10, "modes": list(modes), "perturbations": {
        kind: {"severity": list(levels), "units": "u",
               "accuracy": {mode: list(np.linspace(0.9, 0.4, len(levels))) for mode in modes}}
        for kind, levels in SEVERITIES.items()}}


def test_every_figure_is_a_valid_png(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((5, 32, 32, 3)).astype(np.float32)
    labels = [0, 0, 1, 2, 2]
    figures.plot_confusion_matrix([[5, 1, 0], [2, 3, 0], [0, 0, 0]], CLASSES, tmp_path / "cm.png")
    rows = [{"phase": 1, "epoch": 1, "train_loss": 0.1, "test_loss": 0.2, "train_accuracy": None,
             "test_accuracy": None, "best": True},
            *[{"phase": 2, "epoch": e, "train_loss": 1 / e, "test_loss": 1.2 / e, "train_accuracy": 0.5 + e / 10,
               "test_accuracy": 0.4 + e / 10, "best": e == 2} for e in (1, 2, 3)]]
    figures.plot_curves(rows, tmp_path / "curves.png")
    figures.plot_curves([], tmp_path / "curves_empty.png")
    figures.plot_image_pairs(images, 1 - images, labels, CLASSES, tmp_path / "enhanced.png", "urnet")
    figures.plot_image_pairs(images, None, labels, CLASSES, tmp_path / "raw_only.png")
    figures.plot_gradcam(images, images[..., 0], labels, [0, 1, 1, 2, 0], CLASSES, tmp_path / "gradcam.png")
    figures.plot_robustness(fake_robustness(), tmp_path / "robustness.png")
    for name in ("cm", "curves", "curves_empty", "enhanced", "raw_only", "gradcam", "robustness"):
        assert_png(tmp_path / f"{name}.png")


def test_perturbations_degrade_monotonically():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (2, 24, 24, 3)).astype(np.float32)
    for kind, levels in SEVERITIES.items():
        assert levels[0] == 0.0
        np.testing.assert_allclose(perturb(images, kind, 0.0, np.random.default_rng(1)), images, atol=1e-6)
        errors = [np.abs(perturb(images, kind, s, np.random.default_rng(1)) - images).mean() for s in levels]
        assert all(b > a for a, b in zip(errors, errors[1:])), (kind, errors)
        out = perturb(images, kind, levels[-1], np.random.default_rng(1))
        assert out.shape == images.shape and out.min() >= 0.0 and out.max() <= 1.0
    contrast = perturb(images, "contrast", 0.5, None)
    np.testing.assert_allclose(contrast.std(axis=(1, 2, 3)), 0.5 * images.std(axis=(1, 2, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(images, "fog", 0.1, None)


def test_gaussian_blur_matches_its_definition():
    image = np.zeros((1, 21, 21, 1), np.float32)
    image[0, 10, 10, 0] = 1.0
    blurred = gaussian_blur(image, 1.5)[0, :, :, 0]
    assert blurred.sum() == pytest.approx(1.0, rel=1e-5)  # an impulse far from the borders keeps its mass
    offsets = np.arange(-10, 11)
    profile = np.exp(-0.5 * (offsets / 1.5) ** 2)
    profile[np.abs(offsets) > 5] = 0  # truncated at 3 sigma (radius ceil(4.5) = 5)
    profile /= profile.sum()
    np.testing.assert_allclose(blurred, np.outer(profile, profile), atol=1e-7)


def test_robustness_curves_count_correct_predictions():
    labels = np.array([0, 1, 1, 0])
    batch = {"image": np.full((4, 8, 8, 3), 200, np.uint8), "label": labels,
             "mask": np.array([True, True, True, False])}
    always_one = lambda images: np.ones(len(images), np.int64)  # noqa: E731
    # Predicts label 1 while the (uint8) images stay bright on average: right on 2 of 3 when clean.
    bright_is_one = lambda images: (images.mean(axis=(1, 2, 3)) > 180).astype(np.int64)  # noqa: E731
    results = robustness_curves({"a": always_one, "b": bright_is_one}, [batch], progress=False)
    assert results["num_examples"] == 3
    brightness = results["perturbations"]["brightness"]["accuracy"]
    assert brightness["a"] == pytest.approx([2 / 3] * 6)
    assert brightness["b"][0] == pytest.approx(2 / 3) and brightness["b"][-1] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------------
# End to end on a tiny trained run.



def run_evaluate(*args):
    return subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)


@pytest.fixture(scope="module")
def evaluated(trained_run):
    result = run_evaluate("--workdir", trained_run, "--perturb", "--noprogress")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((trained_run / "eval" / "metrics.json").read_text())
    assert result.stdout == (f"test accuracy {100 * metrics['accuracy']:.2f}%, "
                             f"macro F1 {100 * metrics['macro']['f1']:.2f}% "
                             f"({sum(map(sum, metrics['confusion_matrix']))} images); "
                             f"report: {trained_run / 'eval' / 'report.md'}\n")
    return trained_run / "eval"


def read_predictions(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_consistent_metrics_and_predictions(evaluated, trained_run):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert list(metrics) == ["classes", "accuracy", "per_class", "macro", "confusion_matrix"]
    assert metrics["classes"] == CLASSES  # the synthetic data set's classes, in order
    assert all(list(values) == ["recall", "precision", "f1", "support"] for values in metrics["per_class"].values())
    assert list(metrics["macro"]) == ["recall", "precision", "f1"]

    rows = read_predictions(evaluated / "predictions.csv")
    assert list(rows[0]) == ["path", "true_label", "predicted_label", *[f"prob_{c}" for c in CLASSES], "error"]
    test_split_size = len(data_lib.read_manifest(trained_run / "data", "test"))
    assert len(rows) == sum(map(sum, metrics["confusion_matrix"])) == test_split_size
    for row in rows:
        probs = np.array([float(row[f"prob_{c}"]) for c in CLASSES])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert row["predicted_label"] == CLASSES[int(probs.argmax())] and row["error"] == ""
        assert (trained_run / "data").resolve() in pathlib.Path(row["path"]).resolve().parents
    index = {c: i for i, c in enumerate(CLASSES)}
    recomputed = classification_metrics([index[r["true_label"]] for r in rows],
                                        [index[r["predicted_label"]] for r in rows], CLASSES)
    assert recomputed == metrics

    # The 'best' checkpoint's accuracy, measured by the training loop, is what evaluation measures.
    history = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    best = [row for row in history if row["phase"] == 2 and row["best"]][-1]
    assert metrics["accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-9)


def test_evaluate_writes_report_figures_and_robustness(evaluated, trained_run):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    report = (evaluated / "report.md").read_text()
    assert f"| test accuracy | {100 * metrics['accuracy']:.2f} |" in report
    assert f"| recall monocyte | {100 * metrics['per_class']['monocyte']['recall']:.2f} |" in report
    for name in ("confusion_matrix", "curves", "enhanced", "gradcam", "robustness"):
        assert f"]({name}.png)" in report
        assert_png(evaluated / f"{name}.png")

    robustness = json.loads((evaluated / "robustness.json").read_text())
    assert robustness["modes"] == ["with_enhancer", "without_enhancer"]
    assert robustness["num_examples"] == len(data_lib.read_manifest(trained_run / "data", "test"))
    assert set(robustness["perturbations"]) == {"brightness", "contrast", "blur", "noise"}
    for curve in robustness["perturbations"].values():
        with_enhancer = curve["accuracy"]["with_enhancer"]
        assert len(with_enhancer) == len(curve["severity"]) == 6
        assert with_enhancer[0] == pytest.approx(metrics["accuracy"], abs=1e-9)  # level 0 = clean
        assert all(0.0 <= a <= 1.0 for a in with_enhancer + curve["accuracy"]["without_enhancer"])
    assert "| brightness | 5 | 0.5 |" in report

    saturation = json.loads((evaluated / "enhancer_output.json").read_text())
    assert saturation["examples"] == 9 and saturation["margin"] == 0.01  # 3 examples per class
    assert 0.0 <= saturation["output"] <= 1.0 and 0.0 <= saturation["input"] <= 1.0
    assert f"{100 * saturation['output']:.1f}% of the output values shown are within 0.01 of 0 or 1" in report


def test_saturation_tells_a_saturated_enhancer_from_a_fresh_one():
    """A fresh enhancer's sigmoid output is mostly mid-range; with a large output bias it is all ~1."""
    import jax

    from urnet_jax import train_state
    from urnet_jax.evaluation.metrics import saturated_fraction
    from urnet_jax.inference import enhanced_images

    config = tiny_config()
    size = config.data.image_size
    model = train_state.build(config, len(CLASSES))
    variables = train_state.init_variables(model, train_state.PHASE_PARTS[train_state.JOINT], size,
                                           jax.random.PRNGKey(0))
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    assert saturated_fraction(np.asarray(enhanced_images(model, variables, images))) < 0.5
    head = variables["params"]["enhancer"]["head"]
    saturated = {**variables, "params": {**variables["params"], "enhancer": {
        **variables["params"]["enhancer"], "head": {**head, "bias": head["bias"] + 50.0}}}}
    assert saturated_fraction(np.asarray(enhanced_images(model, saturated, images))) == 1.0


def test_evaluation_compiles_a_few_whole_programs(trained_run, tmp_path):
    # Predictions, the enhanced-image figure and Grad-CAM are one program each. Applied eagerly, the
    # enhancer alone lowered 150 programs; on a GPU each convolution among them is also autotuned.
    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir, ignore=shutil.ignore_patterns("eval"))
    with lowered_programs() as count:
        evaluate_run(workdir, progress=False)
    assert count() <= 10, f"evaluation lowered {count()} XLA programs"


def test_compare_writes_table3_and_table2(evaluated, trained_run, tmp_path):
    other = tmp_path / "net1"
    (other / "eval").mkdir(parents=True)
    shutil.copy(evaluated / "metrics.json", other / "eval" / "metrics.json")
    config = json.loads((trained_run / "config.json").read_text())
    config["model"]["enhancer"] = "none"
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "compare.md"
    result = run_evaluate("--compare", trained_run, other, "--out", out)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text in result.stdout
    assert f"|  | {trained_run.name} | net1 |" in text
    accuracy = f"{100 * json.loads((evaluated / 'metrics.json').read_text())['accuracy']:.2f}"
    assert f"| test accuracy | {accuracy} | {accuracy} |" in text
    assert "| enhancer \\ classifier | ResNet18 |" in text
    assert f"| UR-Net | {accuracy} |" in text and f"| none | {accuracy} |" in text
    assert text == compare_report([trained_run, other])
    unwritable = run_evaluate("--compare", trained_run, other, "--out", tmp_path / "missing" / "compare.md")
    assert unwritable.returncode == 2
    unwritable_path = tmp_path / "missing" / "compare.md"
    assert unwritable.stderr == f"error: cannot write --out {unwritable_path}: No such file or directory\n"


def test_evaluate_errors_are_one_line(tmp_path):
    result = run_evaluate("--workdir", tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'missing'} holds no training run (no config.json)\n"
    for args, message in ((["--compare", tmp_path], "metrics.json not found"),
                          (["--compare"], "--compare needs at least one evaluated run directory"),
                          ([], "exactly one of --workdir"),
                          (["--workdir", tmp_path, "--compare", tmp_path], "exactly one of --workdir"),
                          (["--workdir", tmp_path, "--checkpoint", "first"], "checkpoint must be one of"),
                          (["--workdir", tmp_path, "extra"], "unexpected argument(s): extra"),
                          (["--workdir"], "Missing value for flag --workdir"),
                          (["--workdir", tmp_path, "--examples-per-class=0"], "0 is not a positive integer"),
                          (["--workdir", tmp_path, "--no-progress"], "Unknown command line flag 'no-progress'")):
        result = run_evaluate(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["evaluate.py"], ["predict.py"], ["-m", "urnet_jax.data"]])
def test_help_is_instant(command):
    """`--help` lists the entry point's own flags without importing JAX or TensorFlow."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr  # absl's --help exits with status 1
    assert "--batch-size" in result.stdout or "--cells-per-class" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"jax", "tensorflow", "flax"}, imported & {"jax", "tensorflow", "flax"}
