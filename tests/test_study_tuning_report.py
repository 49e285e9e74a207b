"""The report of a tuning study (`report: 'validation'`): validation numbers at the selected and the last
epoch per candidate, the settings that tell the candidates apart, the choice against a target range, and
no test number anywhere."""

from __future__ import annotations

import json
import pathlib

import pytest

from urnet_jax.config import base_config
from urnet_jax.evaluation.metrics import metrics_from_confusion
from urnet_jax.study import report, tuning

CLASSES = ["granulocyte", "monocyte", "lymphocyte"]
TEST_ACCURACY = 0.123456  # a test number no line of the report may show (12.35 in percent)


def write_candidate(folder: pathlib.Path, model: str, seed: int, contrast: tuple[float, float],
                    epochs: list[tuple[float, float, bool]]) -> None:
    """A finished run of a tuning study: phase-2 rows (val accuracy, val balanced accuracy, best) per epoch."""
    run = folder / f"{model}-severe_proxy-seed{seed}"
    config = base_config()
    config.seed, config.data.variant, config.data.severe_contrast = seed, "severe_proxy", contrast
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    rows = [{"phase": 2, "epoch": epoch, "best": best, "val_accuracy": accuracy, "val_balanced_accuracy": balanced,
             "test_accuracy": TEST_ACCURACY, "test_balanced_accuracy": TEST_ACCURACY}
            for epoch, (accuracy, balanced, best) in enumerate(epochs, start=1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = metrics_from_confusion([[5, 90, 5], [40, 50, 10], [30, 30, 40]], CLASSES)  # test accuracy far off
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def tuning_folder(tmp_path) -> pathlib.Path:
    folder = tmp_path / "results" / "severe_tuning"
    write_candidate(folder, "milder", 1, (0.1, 0.2), [(0.90, 0.84, True), (0.93, 0.88, True), (0.91, 0.86, False)])
    write_candidate(folder, "default", 1, (0.05, 0.12), [(0.80, 0.60, True), (0.85, 0.72, True), (0.84, 0.70, False)])
    write_candidate(folder, "default", 2, (0.05, 0.12), [(0.86, 0.68, True), (0.82, 0.62, False), (0.81, 0.60, False)])
    write_candidate(folder, "harsher", 1, (0.02, 0.05), [(0.75, 0.33, True), (0.75, 0.40, True), (0.76, 0.41, True)])
    (folder / "study.json").write_text(json.dumps({"report": "validation", "target_range": [65.0, 75.0]}))
    return folder


def rows_of(block: str) -> dict[str, list[str]]:
    lines = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| candidate")]
    return {cells[0]: cells[1:] for cells in (line[2:-2].split(" | ") for line in lines)}


def test_the_tuning_report_shows_validation_at_the_selected_and_last_epoch_and_chooses_in_range(tuning_folder):
    block = report.results_block(tuning_folder)
    rows = rows_of(block)
    header = next(line for line in block.splitlines() if line.startswith("| candidate"))
    assert "data.severe_contrast" in header and "model.enhancer" not in header  # only what tells them apart
    # default: seed 1 selects epoch 2 (72), seed 2 epoch 1 (68): mean 70.00, sample std 2.83; last: 70 and 60.
    assert rows["default"] == ["(0.05, 0.12)", "2", "85.50 ± 0.71", "70.00 ± 2.83", "82.50 ± 2.12", "65.00 ± 7.07"]
    assert rows["milder"][1:] == ["1", "93.00", "88.00", "91.00", "86.00"]
    assert rows["harsher"][2:4] == ["76.00", "41.00"]
    assert "Chosen: **default** (mean 70.00)" in block
    assert "12.35" not in block and "Table 3" not in block and "test accuracy" not in block


def test_choose_picks_the_candidate_nearest_the_middle_of_the_range_or_none():
    assert tuning.choose({"a": 66.0, "b": 71.0, "c": 80.0}, (65, 75)) == "b"
    assert tuning.choose({"a": 60.0, "c": 80.0}, (65, 75)) is None


def test_a_tuning_study_without_a_candidate_in_range_says_so(tuning_folder):
    (tuning_folder / "study.json").write_text(json.dumps({"report": "validation", "target_range": [95.0, 99.0]}))
    assert "No candidate lies inside the range yet." in report.results_block(tuning_folder)


def test_choose_with_the_highest_rule_picks_the_highest_inside_the_range():
    assert tuning.choose({"a": 23.6, "b": 30.5, "c": 32.5}, (30, 100), "highest") == "c"
    assert tuning.choose({"a": 23.6, "b": 130.0}, (30, 100), "highest") is None


def write_phase1_candidate(folder: pathlib.Path, model: str, seed: int, lr: float,
                           epochs: list[tuple[float, float, bool]], selected_on: str = "val") -> None:
    """A finished phase-1-only run: phase-1 rows (PSNR and MSE on `selected_on`, best) and eval/phase1.json."""
    run = folder / f"{model}-raw-seed{seed}"
    config = base_config()
    config.seed, config.train.epochs, config.pretrain.optimizer.lr = seed, 0, lr
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    rows = [{"phase": 1, "epoch": epoch, "best": best, "selected_on": selected_on, f"{selected_on}_psnr": psnr,
             f"{selected_on}_mse": mse, "phase1_psnr": psnr, "phase1_below_min_psnr": psnr < 30}
            for epoch, (psnr, mse, best) in enumerate(epochs, start=1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / "eval" / "phase1.json").write_text(json.dumps([row for row in rows if row["best"]][-1]))


def test_a_phase1_tuning_report_shows_the_kept_validation_psnr_and_chooses_the_highest(tmp_path):
    folder = tmp_path / "results" / "phase1_tuning"
    write_phase1_candidate(folder, "slow", 1, 2e-3, [(20.0, 0.01, True), (23.5, 0.0045, True)])
    write_phase1_candidate(folder, "fast", 1, 2e-2, [(31.0, 0.0008, True), (30.0, 0.001, False)])
    write_phase1_candidate(folder, "fast", 2, 2e-2, [(33.0, 0.0005, True), (34.0, 0.0004, True)])
    write_phase1_candidate(folder, "on_test", 1, 1e-2, [(40.0, 0.0001, True)], selected_on="test")
    (folder / "study.json").write_text(json.dumps({"report": "validation", "tuning_metric": "phase1_psnr",
                                                   "target_range": [30.0, 100.0], "target_rule": "highest"}))
    block = report.results_block(folder)
    rows = rows_of(block)
    # fast: kept epochs 1 (31.0) and 2 (34.0): mean 32.50, sample std 2.12; MSE per seed.
    assert rows["fast"] == ["0.02", "2", "32.50 ± 2.12", "0.0008 / 0.0004"]
    assert rows["slow"] == ["0.002", "1", "23.50", "0.0045"]
    assert rows["on_test"] == ["0.01", "1", "n/a", "n/a"]  # kept on test: never a validation number
    assert "Chosen: **fast** (mean 32.50)." in block and "val accuracy" not in block and "40.00" not in block
