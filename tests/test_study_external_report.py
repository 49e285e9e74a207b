"""The report's tables of a study's external image sets (urnet_jax/study/external.py): means and standard
deviations over seeds beside the own test split, the paired balanced-accuracy gap, runs without an external
evaluation, and --check, on a hand-made results folder with hand-computed numbers."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from urnet_jax.config import base_config
from urnet_jax.evaluation.metrics import metrics_from_confusion
from urnet_jax.study import __main__ as study_cli, report

CLASSES = ["granulocyte", "monocyte", "lymphocyte"]
EXTERNAL = {"tecom": {"data_dir": "data/tecom", "class_map": "wbc3"},
            "tecom_adapt_bn": {"data_dir": "data/tecom", "class_map": "wbc3", "adapt_bn": True,
                               "models": ["baseline"]}}


def metrics_of(rows: list[list[int]]) -> dict:
    """metrics.json of a confusion matrix (rows: true class, in CLASSES order)."""
    return metrics_from_confusion(np.asarray(rows), CLASSES)


def diagonal(correct: tuple[int, int, int], images: int = 10) -> dict:
    """metrics.json of `images` images per class, `correct[i]` of class i right, the others called class i+1."""
    rows = np.zeros((3, 3), int)
    for index, right in enumerate(correct):
        rows[index, index], rows[index, (index + 1) % 3] = right, images - right
    return metrics_of(rows.tolist())


def write_run(results: pathlib.Path, model: str, seed: int, own: dict, external: dict[str, dict]) -> None:
    """A finished run `<model>-raw-seed<seed>` with its own test metrics and {set name: metrics} on external sets."""
    config = base_config()
    config.seed, config.data.variant = seed, "raw"
    run = results / f"{model}-raw-seed{seed}"
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    (run / "metrics.jsonl").write_text("")
    (run / "eval" / "metrics.json").write_text(json.dumps(own))
    for name, metrics in external.items():
        (run / "eval" / name).mkdir()
        (run / "eval" / name / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def cross_lab(tmp_path) -> pathlib.Path:
    """baseline x seeds 1, 2 and crop x seeds 1, 2 on `tecom`; crop seed 2 not evaluated on it; `tecom_adapt_bn`
    (baseline only) evaluated for baseline seed 1 alone."""
    folder = tmp_path / "results" / "cross_lab"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"external": EXTERNAL, "seeds": [1, 2]}))
    write_run(folder, "baseline", 1, diagonal((10, 9, 8)),
              {"tecom": diagonal((9, 5, 1)), "tecom_adapt_bn": diagonal((9, 7, 5))})
    write_run(folder, "baseline", 2, diagonal((10, 8, 9)), {"tecom": diagonal((8, 3, 1))})
    # Tecom of crop seed 1: no lymphocyte image (20 granulocytes, 16 right; 10 monocytes, 4 right).
    write_run(folder, "crop", 1, diagonal((10, 10, 10)), {"tecom": metrics_of([[16, 4, 0], [3, 4, 3], [0, 0, 0]])})
    write_run(folder, "crop", 2, diagonal((9, 9, 9)), {})
    return folder


def section(block: str, heading: str) -> str:
    """The text of the section `#### ... heading` of a generated block (up to the next heading or the end marker)."""
    return block.split(heading, 1)[1].split("####")[0].split("<!-- results:end")[0]


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """{first cell: {column header: cell}} of the first Markdown table in text."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header, *rows = [[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in lines]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def test_external_table_holds_means_stds_and_the_paired_gap(cross_lab):
    block = report.results_block(cross_lab)
    tecom = section(block, "on the external set `tecom`, data variant `raw`")
    rows = table_rows(tecom)
    assert list(rows) == ["Baseline", "Crop"]
    baseline, crop = rows["Baseline"], rows["Crop"]
    # Own test: accuracy and balanced accuracy 90% on both seeds; Tecom: 15/30 and 12/30 images, recalls
    # (90, 50, 10) and (80, 30, 10)%; gaps 40 and 50 points.
    assert baseline["seeds"] == "2"
    assert baseline["accuracy, own test"] == "90.00 ± 0.00" and baseline["accuracy, tecom"] == "45.00 ± 7.07"
    assert baseline["balanced accuracy, own test"] == "90.00 ± 0.00"
    assert baseline["balanced accuracy, tecom"] == "45.00 ± 7.07"
    assert baseline["gap: balanced accuracy, own test − tecom"] == "+45.00 ± 7.07"
    for name, own, on_tecom in (("granulocyte", "100.00 ± 0.00", "85.00 ± 7.07"),
                                ("monocyte", "85.00 ± 7.07", "40.00 ± 14.14"),
                                ("lymphocyte", "85.00 ± 7.07", "10.00 ± 0.00")):
        assert (baseline[f"recall {name}, own test"], baseline[f"recall {name}, tecom"]) == (own, on_tecom), name
    # Crop: seed 1 alone (seed 2 has no Tecom evaluation), so no ±; balanced accuracy over the two classes
    # Tecom has images of: (80 + 40) / 2 = 60%, accuracy 20/30.
    assert crop["seeds"] == "1"
    assert crop["accuracy, own test"] == "100.00" and crop["accuracy, tecom"] == "66.67"
    assert crop["balanced accuracy, own test"] == "100.00" and crop["balanced accuracy, tecom"] == "60.00"
    assert crop["gap: balanced accuracy, own test − tecom"] == "+40.00"
    assert crop["recall monocyte, tecom"] == "40.00" and crop["recall lymphocyte, tecom"] == "n/a"
    assert "over the seeds (1, 2)" in tecom


def test_runs_without_an_external_evaluation_are_counted(cross_lab):
    block = report.results_block(cross_lab)
    tecom = section(block, "on the external set `tecom`, data variant `raw`")
    assert "Finished runs without a `tecom` evaluation (no eval/tecom/metrics.json), left out: 1 (crop-raw-seed2)." \
        in tecom
    # tecom_adapt_bn applies to the baseline only: crop's runs are not missing from it.
    adapted = section(block, "on the external set `tecom_adapt_bn`, data variant `raw`")
    assert list(table_rows(adapted)) == ["Baseline"] and table_rows(adapted)["Baseline"]["seeds"] == "1"
    assert "left out: 1 (baseline-raw-seed2)." in adapted
    assert "BatchNorm statistics re-estimated on its images" in adapted and "model variants: `baseline`." in adapted
    assert block.index("external set `tecom`,") < block.index("external set `tecom_adapt_bn`,")


def test_a_study_without_finished_runs_says_so_for_each_external_set(tmp_path):
    folder = tmp_path / "cross_lab"
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps({"external": EXTERNAL}))
    block = report.results_block(folder)
    for name in EXTERNAL:
        assert "No finished runs in `results/cross_lab` yet." in section(block, f"on the external set `{name}`")
    assert "|" not in block


def test_check_detects_a_stale_external_table(cross_lab, tmp_path, capsys):
    document = tmp_path / "CROSS_LAB.md"
    document.write_text("# Cross-lab\n\n<!-- results:begin cross_lab -->\n<!-- results:end cross_lab -->\n")
    arguments = ["study", "report", str(cross_lab), "--out", str(document)]
    assert study_cli.main(arguments) == 0
    assert study_cli.main([*arguments, "--check"]) == 0
    # A new Tecom evaluation (crop seed 2) makes the written tables stale.
    (cross_lab / "crop-raw-seed2" / "eval" / "tecom").mkdir()
    (cross_lab / "crop-raw-seed2" / "eval" / "tecom" / "metrics.json").write_text(json.dumps(diagonal((7, 7, 7))))
    capsys.readouterr()
    assert study_cli.main([*arguments, "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert study_cli.main(arguments) == 0
    assert study_cli.main([*arguments, "--check"]) == 0
    assert "left out" not in section(document.read_text(), "on the external set `tecom`, data variant `raw`")
