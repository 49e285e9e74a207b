"""Corrected differential counts: adjusted count, EM prior shift, bootstrap intervals, the text table."""

import numpy as np
import pytest

from urnet_jax.calibration import HeldOutPredictions
from urnet_jax.errors import ConfigError, DataError
from urnet_jax.quantification import (ADJUSTED_COUNT, EM_PRIOR_SHIFT, adjusted_count, confusion_rates,
                                      corrected_count, em_prior_shift, format_corrected_count)

CLASSES = ["granulocyte", "monocyte", "lymphocyte"]
# Class means of 2-D features: monocytes overlap both others, so the classifier misses about one in five.
MEANS = np.array([[-2.5, 0.0], [0.0, 0.0], [2.5, 0.0]])
MONOCYTE_RICH = np.array([0.2, 0.6, 0.2])


def bayes_logits(labels: np.ndarray, rng: np.random.Generator, overconfidence: float = 3.0) -> np.ndarray:
    """Logits of the Bayes classifier under equal priors for features x ~ N(MEANS[label], I), scaled by
    `overconfidence` (temperature scaling undoes it)."""
    features = MEANS[labels] + rng.normal(size=(len(labels), 2))
    return overconfidence * -0.5 * ((features[:, None, :] - MEANS[None]) ** 2).sum(axis=-1)


def synthetic(per_class: int, folder_size: int, seed: int = 0) -> tuple[np.ndarray, HeldOutPredictions, np.ndarray]:
    """(folder logits, a balanced held-out set, the folder's true proportions) for a monocyte-rich folder."""
    rng = np.random.default_rng(seed)
    heldout_labels = np.repeat(np.arange(len(CLASSES)), per_class)
    heldout = HeldOutPredictions("validation", "best", bayes_logits(heldout_labels, rng), heldout_labels)
    folder_labels = rng.choice(len(CLASSES), size=folder_size, p=MONOCYTE_RICH)
    truth = np.bincount(folder_labels, minlength=len(CLASSES)) / folder_size
    return bayes_logits(folder_labels, rng), heldout, truth


def test_adjusted_count_solves_the_confusion_system_on_the_simplex():
    rates = np.array([[0.9, 0.1, 0.0], [0.15, 0.8, 0.05], [0.0, 0.1, 0.9]])
    truth = np.array([0.25, 0.6, 0.15])
    np.testing.assert_allclose(adjusted_count(rates.T @ truth, rates), truth, atol=1e-6)
    # Predicted proportions no true mix can produce still give a point of the simplex.
    outside = adjusted_count(np.array([1.0, 0.0, 0.0]), rates)
    assert (outside >= 0).all() and outside.sum() == pytest.approx(1.0)
    assert outside[0] == pytest.approx(1.0, abs=1e-6)


def test_confusion_rates_rows_and_a_missing_class():
    rates = confusion_rates(np.array([0, 0, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 2, 2]), 3)
    np.testing.assert_allclose(rates, [[0.5, 0.5, 0], [0, 2 / 3, 1 / 3], [0, 0, 1]])
    with pytest.raises(DataError, match="no example of class 1"):
        confusion_rates(np.array([0, 2]), np.array([0, 2]), 3)


def test_em_prior_shift_is_a_fixed_point_without_shift():
    probabilities = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    priors = probabilities.mean(axis=0)  # calibrated posteriors average to their own priors
    np.testing.assert_allclose(em_prior_shift(probabilities, priors), priors, atol=1e-12)


@pytest.mark.parametrize("method", [ADJUSTED_COUNT, EM_PRIOR_SHIFT])
def test_correction_recovers_a_monocyte_rich_mix_better_than_the_raw_count(method):
    folder_logits, heldout, truth = synthetic(per_class=1_000, folder_size=3_000)
    rows = corrected_count(folder_logits, heldout, CLASSES, method=method, resamples=200)
    raw = np.array([row.raw_proportion for row in rows])
    corrected = np.array([row.corrected_proportion for row in rows])
    raw_error, corrected_error = np.abs(raw - truth).max(), np.abs(corrected - truth).max()
    assert raw_error > 0.05  # classify-and-count is visibly biased (monocytes under-counted)
    assert raw[1] < truth[1] - 0.05
    assert corrected_error < 0.03 and corrected_error < raw_error / 3
    for row, true_share in zip(rows, truth):
        low, high = row.interval
        assert low <= row.corrected_proportion <= high and low <= true_share <= high
    assert sum(row.raw_count for row in rows) == 3_000
    assert corrected.sum() == pytest.approx(1.0)


def test_bootstrap_intervals_shrink_with_more_data_and_repeat_with_the_seed():
    small = corrected_count(*synthetic(per_class=100, folder_size=300)[:2], CLASSES, resamples=300)
    large = corrected_count(*synthetic(per_class=1_000, folder_size=3_000)[:2], CLASSES, resamples=300)
    for little, big in zip(small, large):
        assert big.interval[1] - big.interval[0] < 0.6 * (little.interval[1] - little.interval[0])
    folder_logits, heldout, _ = synthetic(per_class=100, folder_size=300)
    assert corrected_count(folder_logits, heldout, CLASSES, resamples=300) == small
    assert corrected_count(folder_logits, heldout, CLASSES, resamples=300, seed=1) != small


def test_bootstrap_covers_both_sources_of_uncertainty():
    """A small held-out set widens the interval even for a large folder (classifier uncertainty)."""
    folder_logits, small_heldout, _ = synthetic(per_class=50, folder_size=3_000)
    _, large_heldout, _ = synthetic(per_class=2_000, folder_size=10)
    narrow = corrected_count(folder_logits, large_heldout, CLASSES, resamples=300)
    wide = corrected_count(folder_logits, small_heldout, CLASSES, resamples=300)
    assert all(w.interval[1] - w.interval[0] > 1.5 * (n.interval[1] - n.interval[0]) for w, n in zip(wide, narrow))


def test_format_names_the_method_the_heldout_set_and_the_interval():
    folder_logits, heldout, _ = synthetic(per_class=100, folder_size=200)
    text = format_corrected_count(corrected_count(folder_logits, heldout, CLASSES, resamples=100))
    lines = text.splitlines()
    assert lines[0] == "Corrected differential count of 200 classified image(s): adjusted count (Forman 2008),"
    assert "validation split, 300 images (checkpoint 'best')" in lines[1] and "100 resamples" in lines[1]
    assert lines[2].split() == ["class", "count", "raw", "corrected", "95%", "interval"]
    assert [line.split()[0] for line in lines[3:]] == [*CLASSES, "total"]
    assert lines[-1].split() == ["total", "200", "100.00%", "100.00%"]


def test_bad_inputs_are_one_line_errors():
    folder_logits, heldout, _ = synthetic(per_class=20, folder_size=20)
    with pytest.raises(ConfigError, match="method"):
        corrected_count(folder_logits, heldout, CLASSES, method="median")
    with pytest.raises(ConfigError, match="resamples"):
        corrected_count(folder_logits, heldout, CLASSES, resamples=0)
    with pytest.raises(DataError, match="no classified image"):
        corrected_count(folder_logits[:0], heldout, CLASSES)
    without_monocytes = HeldOutPredictions("test", "best", heldout.logits[heldout.labels != 1],
                                           heldout.labels[heldout.labels != 1])
    with pytest.raises(DataError, match="no example of monocyte"):
        corrected_count(folder_logits, without_monocytes, CLASSES)
    with pytest.raises(DataError, match="3 classes"):
        corrected_count(folder_logits[:, :2], heldout, CLASSES)
