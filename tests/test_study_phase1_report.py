"""The report's phase-1 (enhancer pre-training) section (urnet_jax/study/phase1.py): the kept epoch, PSNR, MSE,
saturation and min_psnr verdict of each pre-trained run, the warning naming the runs below it, the mean ± std
PSNR over seeds, and no section for a study whose rows lack the verdict, on a hand-made results folder."""

from __future__ import annotations

import json
import pathlib

import pytest

from test_study_external_report import diagonal, section, write_run  # tests/ is on sys.path (rootdir conftest)
from urnet_jax.study import report

HEADING = "Phase 1 (enhancer pre-training): `results/phase1_study`, data variant `raw`"
# (epoch, val PSNR in dB, val MSE, saturated fraction, kept as best) of each phase-1 epoch, selected on val.
NET4_EPOCHS = {1: [(1, 20.0, 0.01, 0.2, True), (2, 32.5, 0.0005623, 0.0123, True), (3, 31.0, 0.0007, 0.01, False)],
               2: [(1, 24.1234, 0.003871, 0.5, True), (2, 23.0, 0.005, 0.6, False)]}
# The unchanged input's val PSNR of each seed's rows; seed 2's rows were written before it was recorded.
INPUT_PSNR = {1: 18.456, 2: None}


def phase1_rows(epochs: list[tuple[int, float, float, float, bool]], verdict: bool,
                input_psnr: float | None = None) -> list[dict]:
    """metrics.jsonl rows of phase 1 as the trainer writes them (with the verdict on the last row when
    `verdict`), then one phase-2 row."""
    rows = [{"phase": 1, "epoch": epoch, "val_psnr": psnr, "val_mse": mse, "test_psnr": psnr - 1.0, "test_mse": 2 * mse,
             "saturated_fraction": saturated, "selected_on": "val", "best": best}
            for epoch, psnr, mse, saturated, best in epochs]
    if input_psnr is not None:
        for row in rows:
            row["val_input_psnr"] = input_psnr
    if verdict:
        kept_psnr = [row for row in rows if row["best"]][-1]["val_psnr"]
        rows[-1].update(phase1_psnr=kept_psnr, phase1_below_min_psnr=kept_psnr < 30.0)
    return [*rows, {"phase": 2, "epoch": 1, "test_accuracy": 0.9}]


def write_rows(run_dir: pathlib.Path, rows: list[dict]) -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_study(folder: pathlib.Path, verdict: bool) -> pathlib.Path:
    """net4 (pre-trained) x seeds 1, 2, seed 2 below 30 dB, and net1 (no phase 1) x seeds 1, 2."""
    for seed, epochs in NET4_EPOCHS.items():
        write_run(folder, "net4", seed, diagonal((10, 9, 7 + seed)), {})
        write_rows(folder / f"net4-raw-seed{seed}", phase1_rows(epochs, verdict, INPUT_PSNR[seed]))
        write_run(folder, "net1", seed, diagonal((9, 9, 9 - seed)), {})
        write_rows(folder / f"net1-raw-seed{seed}", [{"phase": 2, "epoch": 1, "test_accuracy": 0.8}])
    return folder


@pytest.fixture
def study(tmp_path) -> pathlib.Path:
    return make_study(tmp_path / "results" / "phase1_study", verdict=True)


def table_cells(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in text, as cells."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in lines[1:]]


def test_phase1_table_holds_the_kept_epoch_psnr_and_verdict_of_each_pretrained_run(study):
    text = section(report.results_block(study), HEADING)
    assert table_cells(text) == [["Net4", "1", "2", "val", "32.50", "18.46", "0.0005623", "1.23", "no (30 dB)"],
                                 ["Net4", "2", "1", "val", "24.12", "n/a", "0.003871", "50.00", "yes (30 dB)"]]
    # 32.5 and 24.1234 dB: mean 28.3117, sample std 8.3766 / sqrt(2) = 5.9232.
    assert "- Net4: PSNR 28.31 ± 5.92 dB over 2 seeds; 1 of 2 runs below their `pretrain.min_psnr`." in text
    assert "Net1" not in text  # no phase 1


def test_a_run_below_min_psnr_is_named_in_a_warning_first(study):
    text = section(report.results_block(study), HEADING)
    warning = text.strip().splitlines()[0]
    assert warning.startswith("**Warning: phase 1 ended below `pretrain.min_psnr` in 1 of 2 pre-trained runs")
    assert "`net4-raw-seed2` (24.12 dB < 30 dB)" in warning and "seed1" not in warning and warning.endswith("**")


def test_a_study_whose_rows_lack_the_verdict_renders_as_without_phase1(tmp_path):
    old_rows = report.results_block(make_study(tmp_path / "a" / "phase1_study", verdict=False))
    assert "Phase 1 (enhancer pre-training)" not in old_rows
    without_phase1 = make_study(tmp_path / "b" / "phase1_study", verdict=False)
    for seed in NET4_EPOCHS:
        write_rows(without_phase1 / f"net4-raw-seed{seed}", [{"phase": 2, "epoch": 1, "test_accuracy": 0.9}])
    assert old_rows == report.results_block(without_phase1)
