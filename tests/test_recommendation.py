"""The cross-lab study's recommendation rule (urnet_jax/study/recommendation.py, urnet_jax/study/rules.py):
eligibility on the own validation split (never the test split), the choice on the external set, --adapt-bn
only when it beats that by more than its spread, the target, 'not applied yet', bad rules as one-line
errors, and configs/other_microscope.py against the rule applied to the committed results/cross_lab."""

from __future__ import annotations

import json
import pathlib
import runpy

import numpy as np
import pytest

from urnet_jax import cli, errors
from urnet_jax.evaluation.metrics import metrics_from_confusion
from urnet_jax.evaluation.split_predictions import predictions_file
from urnet_jax.study import recommendation, report, rules, sweep

from test_paired import CLASSES, write_finished_run, write_predictions  # tests/ is on sys.path (rootdir conftest)
from tiny_run import REPO_ROOT

PER_CLASS = 100
RULE = {"external": "tecom", "adapted": "tecom_adapt_bn", "baseline": "baseline", "own_margin": 2.0,
        "target_gap": 15.0, "min_seeds": 3}


def predictions_with_recall(recall: float) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) of PER_CLASS images per class, each class recalled at `recall` (the rest taken
    for the next class): balanced accuracy `recall`."""
    true = np.repeat(np.arange(len(CLASSES)), PER_CLASS)
    wrong = np.tile(np.arange(PER_CLASS) < round(PER_CLASS * (1 - recall)), len(CLASSES))
    return true, np.where(wrong, (true + 1) % len(CLASSES), true)


def write_external(run_dir: pathlib.Path, set_name: str, recall: float) -> None:
    true, predicted = predictions_with_recall(recall)
    confusion = np.zeros((len(CLASSES), len(CLASSES)), int)
    np.add.at(confusion, (true, predicted), 1)
    (run_dir / "eval" / set_name).mkdir(parents=True)
    (run_dir / "eval" / set_name / "metrics.json").write_text(json.dumps(metrics_from_confusion(confusion, CLASSES)))


def write_study(folder: pathlib.Path, balanced: dict[str, dict[str, list[float]]], rule=RULE) -> None:
    """Runs of each model (seeds 1..n) with the given balanced accuracies: {model: {'own': [...], 'val': [...],
    'tecom': [...], 'tecom_adapt_bn': [...]}} ('val' left out: as 'own'; an external set left out: no
    evaluation on it)."""
    for model, sets in balanced.items():
        for seed, own in enumerate(sets["own"], start=1):
            name = f"{model}-raw-seed{seed}"
            true, predicted = predictions_with_recall(own)
            write_finished_run(folder, name, true, predicted, predicted)
            true, predicted = predictions_with_recall(sets.get("val", sets["own"])[seed - 1])
            write_predictions(predictions_file(folder / name / "eval", "val"), np.arange(len(true)), true, predicted)
            for set_name in ("tecom", "tecom_adapt_bn"):
                if set_name in sets and seed <= len(sets[set_name]):
                    write_external(folder / name, set_name, sets[set_name][seed - 1])
    external = {"tecom": {"data_dir": "tecom", "class_map": "wbc3"},
                "tecom_adapt_bn": {"data_dir": "tecom", "class_map": "wbc3", "adapt_bn": True}}
    (folder / "study.json").write_text(json.dumps({"models": {model: {} for model in balanced},
                                                   "external": external, "recommendation_rule": rule}))


def recommendation_text(block: str) -> str:
    return next(line for line in block.splitlines() if line.startswith(("**Recommended", "**Not applied")))


def test_the_best_eligible_variant_on_the_external_set_is_recommended(tmp_path):
    """groupnorm is best on Tecom but 4 points behind the baseline on its own test split: not eligible; crop
    (1 point behind) is; adaptation of the baseline does not beat crop by more than its spread."""
    write_study(tmp_path / "study", {
        "baseline": {"own": [0.98, 0.98, 0.98], "tecom": [0.45, 0.46, 0.44], "tecom_adapt_bn": [0.55, 0.70, 0.62]},
        "crop": {"own": [0.97, 0.97, 0.97], "tecom": [0.60, 0.61, 0.59]},
        "groupnorm": {"own": [0.94, 0.94, 0.94], "tecom": [0.80, 0.80, 0.80]}})
    block = report.results_block(tmp_path / "study")
    assert "| Groupnorm | 3 | 94.00 ± 0.00 | no | 94.00 ± 0.00 | 80.00 ± 0.00 | n/a |" in block
    assert "| Crop | 3 | 97.00 ± 0.00 | yes | 97.00 ± 0.00 | 60.00 ± 1.00 | n/a |" in block
    assert recommendation_text(block) == (
        "**Recommended on `raw`: Crop**: balanced accuracy on `tecom` 60.00 ± 1.00%, gap own-test − `tecom` "
        "+37.00 ± 1.00 points: the target (at most 15) is **not met**.")


def test_eligibility_reads_the_validation_split_not_the_test_split(tmp_path):
    """groupnorm is 4 points behind the baseline on the test split but 1 behind on validation: eligible and
    recommended; crop is level on test but 3 behind on validation: not eligible."""
    write_study(tmp_path / "study", {
        "baseline": {"own": [0.98, 0.98, 0.98], "val": [0.97, 0.97, 0.97], "tecom": [0.45, 0.46, 0.44]},
        "crop": {"own": [0.98, 0.98, 0.98], "val": [0.94, 0.94, 0.94], "tecom": [0.90, 0.90, 0.90]},
        "groupnorm": {"own": [0.94, 0.94, 0.94], "val": [0.96, 0.96, 0.96], "tecom": [0.80, 0.80, 0.80]}})
    block = report.results_block(tmp_path / "study")
    assert "| Crop | 3 | 94.00 ± 0.00 | no | 98.00 ± 0.00 | 90.00 ± 0.00 | n/a |" in block
    assert "| Groupnorm | 3 | 96.00 ± 0.00 | yes | 94.00 ± 0.00 | 80.00 ± 0.00 | n/a |" in block
    assert recommendation_text(block).startswith("**Recommended on `raw`: Groupnorm**: balanced accuracy on `tecom` "
                                                 "80.00 ± 0.00%, gap own-test − `tecom` +14.00 ± 0.00 points")


def test_a_run_without_validation_predictions_is_a_one_line_error(tmp_path):
    write_study(tmp_path / "study", {"baseline": {"own": [0.98], "tecom": [0.45]}})
    predictions_file(tmp_path / "study" / "baseline-raw-seed1" / "eval", "val").unlink()
    with pytest.raises(errors.ConfigError, match="predictions_val.csv is missing: the recommendation rule's "
                                                 "eligibility reads the validation split"):
        report.results_block(tmp_path / "study")


def test_adaptation_is_recommended_when_it_beats_the_choice_by_more_than_its_spread(tmp_path):
    write_study(tmp_path / "study", {
        "baseline": {"own": [0.98, 0.98, 0.98], "tecom": [0.45, 0.46, 0.44], "tecom_adapt_bn": [0.86, 0.85, 0.87]},
        "crop": {"own": [0.97, 0.97, 0.97], "tecom": [0.60, 0.61, 0.59]}})
    assert recommendation_text(report.results_block(tmp_path / "study")) == (
        "**Recommended on `raw`: Baseline with --adapt-bn**: balanced accuracy on `tecom_adapt_bn` 86.00 ± 1.00%, "
        "gap own-test − `tecom_adapt_bn` +12.00 ± 1.00 points: the target (at most 15) is **met**.")
    choice = recommendation.recommended(tmp_path / "study")["raw"]  # what configs read: the report's decision
    assert (choice.model, choice.adapt_bn, choice.on) == ("baseline", True, "tecom_adapt_bn")
    assert choice.target_met(rules.recommendation_rule(RULE)) and choice.eligible == ("baseline", "crop")


def test_the_rule_waits_for_every_variants_seeds(tmp_path):
    write_study(tmp_path / "study", {"baseline": {"own": [0.98, 0.98, 0.98], "tecom": [0.45, 0.46, 0.44]},
                                     "crop": {"own": [0.97, 0.97], "tecom": [0.60, 0.61]},
                                     "stain": {"own": [0.97], "tecom": []}})
    assert recommendation_text(report.results_block(tmp_path / "study")) == (
        "**Not applied yet**: the rule needs 3 seeds of every model variant evaluated on `tecom`; finished: "
        "Baseline 3, Crop 2, Stain 0.")
    assert recommendation.recommended(tmp_path / "study") == {"raw": None}
    (tmp_path / "study" / "study.json").write_text(json.dumps({"models": {"baseline": {}}}))
    assert "Recommend" not in report.results_block(tmp_path / "study")
    with pytest.raises(errors.ConfigError, match="study.json has no recommendation_rule"):
        recommendation.recommended(tmp_path / "study")


@pytest.mark.parametrize("changes, message", [
    ({"externals": "tecom"}, "unknown key\\(s\\) externals"),
    ({"external": None, "baseline": None}, None),
    ({"own_margin": -1}, "own_margin and target_gap must be >= 0"),
    ({"min_seeds": "three"}, "numbers for 'own_margin', 'target_gap' and 'min_seeds'"),
    ({"baseline": "net9"}, "baseline 'net9' is not a model variant"),
    ({"adapted": "tecom_bn"}, "names sets missing from 'external': tecom_bn"),
])
def test_a_bad_recommendation_rule_is_a_one_line_error(changes, message):
    config = {key: value for key, value in {**RULE, **changes}.items() if value is not None}
    message = message or "needs 'external' and 'baseline' names"
    with pytest.raises(errors.ConfigError, match=message):
        rules.recommendation_rule(config, models=["baseline", "crop"], external_sets=["tecom", "tecom_adapt_bn"])
    assert rules.recommendation_rule({}) is None


def test_the_cross_lab_config_writes_down_the_documented_rule():
    study = cli.load_config_file(str(REPO_ROOT / "configs" / "cross_lab.py"))
    sweep.check_study_config(study)
    rule = rules.recommendation_rule(study.recommendation_rule, list(study.models), list(study.external))
    assert (rule.external, rule.adapted, rule.baseline) == ("tecom", "tecom_adapt_bn", "baseline")
    assert (rule.own_margin, rule.target_gap, rule.min_seeds) == (2.0, 15.0, len(study.seeds))


def test_the_other_microscope_config_is_what_the_cross_lab_rule_recommends():
    """configs/other_microscope.py names the variant (and --adapt-bn) the rule picks from the committed
    results/cross_lab, and is the cross-lab base config with exactly that variant's changes."""
    choice = recommendation.recommended(REPO_ROOT / "results" / "cross_lab")["raw"]
    assert choice is not None, "results/cross_lab lacks seeds the rule needs"
    recommended = runpy.run_path(str(REPO_ROOT / "configs" / "other_microscope.py"))
    assert (recommended["RECOMMENDED"], recommended["ADAPT_BN"]) == (choice.model, choice.adapt_bn)
    study = cli.load_config_file(str(REPO_ROOT / "configs" / "cross_lab.py"))
    config = cli.load_config_file(str(REPO_ROOT / "configs" / "other_microscope.py"))
    assert config.to_dict() == sweep.with_overrides(study.base, study.models[choice.model]).to_dict()
