"""Metrics against scikit-learn and a hand computation, confusion-matrix orientation, the committed
results, the Table-3/Table-2 reports, Wilson intervals."""

import json
import math
import pathlib
import statistics

import numpy as np
import pytest
from sklearn import metrics as skm

from urnet_jax.differential_count import differential_count, wilson_interval
from urnet_jax.errors import ConfigError
from urnet_jax.evaluation.metrics import (classification_metrics, confusion_matrix, metrics_from_confusion,
                                          saturated_fraction)
from urnet_jax.evaluation.report import compare_report, table2, table3

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

CLASSES = ["granulocyte", "monocyte", "lymphocyte", "rare"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 200)
    # Class 3 is never predicted (precision 0 by convention) and class 2 is predicted from noise.
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))
    predictions = np.where(predictions == 3, 0, predictions)
    assert not np.any(predictions == 3)
    result = classification_metrics(labels, predictions, CLASSES)

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=range(4), zero_division=0)
    for i, name in enumerate(CLASSES):
        got = result["per_class"][name]
        np.testing.assert_allclose([got["precision"], got["recall"], got["f1"]],
                                   [precision[i], recall[i], f1[i]], rtol=1e-12, atol=1e-12)
        assert got["support"] == support[i]
    assert result["per_class"]["rare"]["precision"] == 0.0
    macro = skm.precision_recall_fscore_support(labels, predictions, labels=range(4), average="macro",
                                                zero_division=0)
    np.testing.assert_allclose([result["macro"][k] for k in ("precision", "recall", "f1")], macro[:3],
                               rtol=1e-12)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions), abs=1e-15)
    np.testing.assert_array_equal(result["confusion_matrix"],
                                  skm.confusion_matrix(labels, predictions, labels=range(4)))
    assert list(result) == ["classes", "accuracy", "per_class", "macro", "confusion_matrix"]


def hand_metrics(matrix):
    """Recall, precision and F1 (K,) and accuracy of a confusion matrix, by their definitions (0 where a
    denominator is 0; F1 = 2 P R / (P + R))."""
    matrix = np.asarray(matrix, np.float64)
    true_positives, support, predicted = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)

    def divide(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b != 0)

    recall, precision = divide(true_positives, support), divide(true_positives, predicted)
    return recall, precision, divide(2 * precision * recall, precision + recall), true_positives.sum() / matrix.sum()


def test_metrics_equal_the_hand_computation_on_a_fixed_confusion_matrix():
    # Every corner case at once: a class never predicted (3), one never present (2), ordinary ones.
    matrix = np.array([[50, 3, 0, 0], [7, 31, 5, 0], [0, 0, 0, 0], [4, 2, 9, 0]])
    result = metrics_from_confusion(matrix, CLASSES)
    recall, precision, f1, accuracy = hand_metrics(matrix)
    got = {key: [result["per_class"][name][key] for name in CLASSES] for key in ("recall", "precision", "f1")}
    np.testing.assert_allclose(got["recall"], recall, rtol=0, atol=1e-15)
    np.testing.assert_allclose(got["precision"], precision, rtol=0, atol=1e-15)
    np.testing.assert_allclose(got["f1"], f1, rtol=0, atol=1e-15)  # scikit-learn: 2 TP / (2 TP + FP + FN)
    assert got["precision"][3] == 0.0 and got["recall"][2] == 0.0 and got["f1"][2] == got["f1"][3] == 0.0
    assert [result["macro"][key] for key in ("recall", "precision", "f1")] == pytest.approx(
        [recall.mean(), precision.mean(), f1.mean()], rel=0, abs=1e-15)
    assert result["accuracy"] == accuracy == 81 / 111
    assert [result["per_class"][name]["support"] for name in CLASSES] == [53, 43, 0, 15]
    assert result["confusion_matrix"] == matrix.tolist()
    assert table3({"run": result}) == table3({"run": {**result, "per_class": {
        name: {"recall": recall[i], "precision": precision[i], "f1": f1[i]} for i, name in enumerate(CLASSES)},
        "macro": {"recall": recall.mean(), "precision": precision.mean(), "f1": f1.mean()}}})


COMMITTED_METRICS = [*sorted(REPO_ROOT.glob("results/*/*/eval/metrics.json")), REPO_ROOT / "docs/demo_eval/metrics.json"]


@pytest.mark.parametrize("path", COMMITTED_METRICS, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_committed_metrics_recompute_from_their_confusion_matrix(path):
    """Every committed metrics.json (written before the metrics used scikit-learn) is what the current code
    computes from its confusion matrix: counts and accuracy exactly, rates to the last bit or two, and
    every percentage of the reports unchanged."""
    committed = json.loads(path.read_text())
    recomputed = metrics_from_confusion(np.array(committed["confusion_matrix"]), committed["classes"])
    assert recomputed["confusion_matrix"] == committed["confusion_matrix"]
    assert recomputed["accuracy"] == committed["accuracy"]
    for name, values in committed["per_class"].items():
        assert recomputed["per_class"][name]["support"] == values["support"]
        for key in ("recall", "precision", "f1"):
            assert recomputed["per_class"][name][key] == pytest.approx(values[key], rel=0, abs=3e-16)
    assert recomputed["macro"] == pytest.approx(committed["macro"], rel=0, abs=3e-16)
    assert table3({"run": recomputed}) == table3({"run": committed})


def test_confusion_matrix_orientation_rows_are_truth():
    # Two true monocytes (1) predicted lymphocyte (2); one true granulocyte (0) predicted correctly.
    matrix = confusion_matrix([1, 1, 0], [2, 2, 0], num_classes=3)
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [0, 0, 2], [0, 0, 0]])
    result = classification_metrics([1, 1, 0], [2, 2, 0], CLASSES[:3])
    assert result["per_class"]["monocyte"]["recall"] == 0.0
    assert result["per_class"]["monocyte"]["support"] == 2
    assert result["per_class"]["lymphocyte"]["precision"] == 0.0  # predicted twice, never right
    assert result["accuracy"] == pytest.approx(1 / 3)


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="labels but"):
        confusion_matrix([0, 1], [0], num_classes=3)


def test_table3_layout_and_percentages():
    first = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], CLASSES[:3])
    second = classification_metrics([0, 1, 2, 2], [0, 1, 2, 2], CLASSES[:3])
    lines = table3({"net1": first, "net4": second}).splitlines()
    assert lines[0] == "|  | net1 | net4 |"
    row_names = [line.split("|")[1].strip() for line in lines[2:]]
    assert row_names == ["recall granulocyte", "recall monocyte", "recall lymphocyte", "recall average",
                         "precision granulocyte", "precision monocyte", "precision lymphocyte",
                         "precision average", "F1 granulocyte", "F1 monocyte", "F1 lymphocyte",
                         "F1 average", "test accuracy"]
    assert lines[2] == "| recall granulocyte | 50.00 | 100.00 |"
    assert lines[-1] == "| test accuracy | 75.00 | 100.00 |"


def test_table2_grid_and_compare(tmp_path):
    metrics = classification_metrics([0, 1, 2, 2], [0, 1, 2, 1], CLASSES[:3])
    runs = {"a": ({"model": {"enhancer": "unet", "classifier": "vgg16"}}, metrics),
            "b": ({"model": {"enhancer": "urnet", "classifier": "resnet101"}}, metrics),
            "c": ({"model": {"enhancer": "unet", "classifier": "resnet101"}}, metrics)}
    lines = table2(runs).splitlines()
    assert lines[0] == "| enhancer \\ classifier | VGG16 | ResNet101 |"
    assert lines[2] == "| UNet | 75.00 | 75.00 |"
    assert lines[3] == "| UR-Net | n/a | 75.00 |"

    import json
    for name in ("run1", "run2"):
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "run1" / "config.json").write_text(json.dumps(runs["a"][0]))
    report = compare_report([tmp_path / "run1", tmp_path / "run2"])
    assert "|  | run1 | run2 |" in report
    assert "| UNet | 75.00 |" in report
    assert "Not in Table 2 or Table 4 (no config.json): run2." in report
    with pytest.raises(ConfigError, match="not found"):
        compare_report([tmp_path / "missing"])


def closed_form_wilson(count, total, confidence=0.95):
    """The Wilson score interval by its closed form (Wilson 1927)."""
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = count / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_wilson_interval_equals_its_closed_form():
    for total in (1, 2, 7, 50, 333):
        for count in range(total + 1):
            for confidence in (0.9, 0.95, 0.99):
                assert wilson_interval(count, total, confidence) == pytest.approx(
                    closed_form_wilson(count, total, confidence), rel=0, abs=1e-14)


def test_wilson_interval_known_values_and_bounds():
    # Reference values from the closed form (Wilson 1927), e.g. 5/10 -> [0.2366, 0.7634].
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.161125, abs=1e-6)
    assert wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # Narrows as n grows, always contains p.
    widths = [np.subtract(*wilson_interval(n // 4, n)[::-1]) for n in (8, 80, 800)]
    assert widths[0] > widths[1] > widths[2] > 0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_differential_count_sums_to_100():
    rows = differential_count([0, 0, 0, 1, 2, 2, 0], CLASSES[:3])
    assert [row.count for row in rows] == [4, 1, 2]
    assert sum(row.percent for row in rows) == pytest.approx(100.0)
    for row in rows:
        assert row.ci_low <= row.percent <= row.ci_high


def test_saturated_fraction_counts_values_near_0_or_1():
    values = np.array([0.0, 0.005, 0.011, 0.5, 0.989, 0.995, 1.0, 0.3])
    assert saturated_fraction(values, margin=0.01) == pytest.approx(4 / 8)
    with pytest.raises(ValueError, match="no values"):
        saturated_fraction(np.zeros((0, 3)))
