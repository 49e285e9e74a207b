"""Temperature scaling, expected calibration error, reliability diagrams and the stored calibration."""

import json

import numpy as np
import pytest
from scipy import special

from urnet_jax.calibration import (CALIBRATION_FILE, HeldOutPredictions, calibrate, expected_calibration_error,
                                   fit_temperature, log_probabilities, negative_log_likelihood,
                                   plot_reliability_diagrams, read_calibration, read_heldout, reliability_diagram,
                                   temperature_scaled, write_calibration, write_heldout)
from urnet_jax.errors import ConfigError, DataError

OVERCONFIDENCE = 5.0


def calibrated_model(num_examples: int, num_classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) of a perfectly calibrated model (labels drawn from softmax(logits)) and the labels."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (num_examples, num_classes))
    probabilities = special.softmax(logits, axis=1)
    labels = (rng.random((num_examples, 1)) > np.cumsum(probabilities, axis=1)).sum(axis=1)
    return logits, labels


def test_ece_of_a_hand_computed_case():
    # Confidences 0.9 (right), 0.75 (wrong), 0.7 (wrong), 0.55 (right); 5 bins of width 0.2:
    # (0.8, 1]: acc 1, conf 0.9; (0.6, 0.8]: acc 0, conf 0.725; (0.4, 0.6]: acc 1, conf 0.55.
    # ECE = 1/4 * 0.1 + 2/4 * 0.725 + 1/4 * 0.45 = 0.5
    probabilities = np.array([[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probabilities, labels, bins=5) == pytest.approx(0.5, abs=1e-12)
    diagram = reliability_diagram(probabilities, labels, bins=5)
    np.testing.assert_array_equal(diagram.counts, [0, 0, 1, 2, 1])
    np.testing.assert_allclose(diagram.accuracy[2:], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(diagram.confidence[2:], [0.55, 0.725, 0.9])
    assert np.isnan(diagram.accuracy[:2]).all() and np.isnan(diagram.confidence[:2]).all()
    np.testing.assert_allclose(diagram.edges, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_temperature_scaling_undoes_overconfidence():
    logits, labels = calibrated_model(20_000)
    overconfident = OVERCONFIDENCE * logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(OVERCONFIDENCE, rel=0.05)
    before = expected_calibration_error(temperature_scaled(overconfident), labels)
    after = expected_calibration_error(temperature_scaled(overconfident, temperature), labels)
    assert before > 0.1 and after < 0.02 and after < before / 5
    assert negative_log_likelihood(overconfident, labels, temperature) < negative_log_likelihood(overconfident, labels)
    # Log-probabilities stand in for logits: the same temperature, the same probabilities.
    log_p = log_probabilities(temperature_scaled(overconfident))
    assert fit_temperature(log_p, labels) == pytest.approx(temperature, rel=1e-4)
    np.testing.assert_allclose(temperature_scaled(log_p, temperature), temperature_scaled(overconfident, temperature),
                               atol=1e-9)


def test_fit_is_deterministic_and_leaves_a_calibrated_model_alone():
    logits, labels = calibrated_model(20_000, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)
    assert fit_temperature(logits, labels) == fit_temperature(logits, labels)


def test_calibrate_records_before_and_after_and_round_trips(tmp_path):
    logits, labels = calibrated_model(5_000)
    heldout = HeldOutPredictions("validation", "best", OVERCONFIDENCE * logits, labels)
    calibration = calibrate(heldout)
    assert (calibration.split, calibration.checkpoint, calibration.n, calibration.bins) == ("validation", "best",
                                                                                            5_000, 15)
    assert calibration.ece_after < calibration.ece_before and calibration.nll_after < calibration.nll_before
    path = write_calibration(tmp_path, calibration)
    assert path.name == CALIBRATION_FILE and json.loads(path.read_text())["temperature"] == calibration.temperature
    assert read_calibration(tmp_path) == calibration
    write_heldout(tmp_path, heldout)
    restored = read_heldout(tmp_path)
    assert (restored.split, restored.checkpoint) == ("validation", "best")
    np.testing.assert_array_equal(restored.labels, labels)
    np.testing.assert_allclose(restored.logits, heldout.logits, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CALIBRATION_FILE, "heldout_predictions.npz"]


def test_reliability_plot_writes_a_png(tmp_path):
    logits, labels = calibrated_model(2_000)
    diagrams = {"before": reliability_diagram(temperature_scaled(OVERCONFIDENCE * logits), labels),
                "after (T = 5)": reliability_diagram(temperature_scaled(logits), labels)}
    plot_reliability_diagrams(diagrams, tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_or_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="not calibrated"):
        read_calibration(tmp_path)
    with pytest.raises(ConfigError, match="no heldout_predictions.npz"):
        read_heldout(tmp_path)
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        read_calibration(tmp_path)
    with pytest.raises(DataError, match="no held-out examples"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, int))
    with pytest.raises(DataError, match="labels must lie"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ConfigError, match="bins"):
        expected_calibration_error(np.full((2, 2), 0.5), np.array([0, 1]), bins=0)
