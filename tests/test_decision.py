"""The study's decision rule (urnet_jax/study/decision.py): each verdict on hand-made intervals, the claim
over data variants, bad rules as one-line errors, and the verdict the report prints for a results folder."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from urnet_jax import errors
from urnet_jax.config import base_config
from urnet_jax.study import decision, paired, report, rules, sweep
from urnet_jax.study.results import column_header

from test_paired import write_finished_run  # tests/ is on sys.path (rootdir conftest)

RULE = {"effect": ("net4", "net1"), "controls": (("net4", "clahe"),), "metric": "balanced_accuracy",
        "epoch": "selected", "margin": 1.5, "min_seeds": 5, "claim_variants": ("stainfree_proxy", "severe_proxy")}


def row(first: str, second: str, estimate: float, low: float, high: float, seeds: int = 5,
        epoch: str = "selected", per_seed: tuple[float, ...] = ()) -> paired.ComparisonRow:
    """A comparison row whose balanced-accuracy difference is `estimate` [low, high] points (each seed's:
    `per_seed`, points; by default `estimate` on every seed)."""
    per_seed = per_seed or (estimate,) * seeds
    difference = paired.PairedDifference(
        seeds=tuple(range(1, seeds + 1)),
        estimate={"accuracy": 0.0, "balanced_accuracy": estimate / 100},
        interval={"accuracy": (-1.0, 1.0), "balanced_accuracy": (low / 100, high / 100)},
        per_seed={"accuracy": (0.0,) * len(per_seed), "balanced_accuracy": tuple(v / 100 for v in per_seed)})
    return paired.ComparisonRow(first, second, epoch, difference, ())


def verdict(effect: tuple[float, float, float], control: tuple[float, float, float], **changes) -> decision.Verdict:
    rule = rules.decision_rule({**RULE, **changes})
    return decision.apply_rule(rule, [row("net4", "net1", *effect), row("net4", "clahe", *control)])


@pytest.mark.parametrize("effect, control, outcome, reason", [
    ((2.0, 0.5, 3.5), (1.0, 0.2, 1.8), decision.CONFIRMED, "every control's interval lies above 0"),
    ((1.5, 0.1, 2.9), (1.0, 0.2, 1.8), decision.CONFIRMED, "at least +1.5"),  # D exactly at the margin
    ((0.2, -1.4, 1.5), (1.0, 0.2, 1.8), decision.REFUTED, "lies within ±1.5"),
    ((2.0, 0.5, 3.5), (0.5, -0.2, 1.2), decision.UNDECIDED, "a control does as well: the interval of net4 − clahe"),
    ((1.0, 0.2, 1.8), (1.0, 0.2, 1.8), decision.UNDECIDED, "lies above 0 but its mean is below +1.5"),
    ((-2.4, -5.9, 0.5), (1.0, 0.2, 1.8), decision.UNDECIDED, "neither lies above 0 nor within ±1.5"),
    ((1.4, -0.1, 2.9), (1.0, 0.2, 1.8), decision.UNDECIDED, "neither lies above 0 nor within ±1.5"),
])
def test_each_verdict_of_the_rule(effect, control, outcome, reason):
    result = verdict(effect, control)
    assert result.outcome == outcome
    assert reason in result.reason
    assert f"net4 − net1 {paired.signed(effect[0])} [{paired.signed(effect[1])}, {paired.signed(effect[2])}]" in result.reason


def test_the_rule_waits_for_its_seeds_and_reads_only_its_epoch():
    rule = rules.decision_rule(RULE)
    few = decision.apply_rule(rule, [row("net4", "net1", 5.0, 3.0, 7.0, seeds=3), row("net4", "clahe", 5.0, 3.0, 7.0)])
    assert few.outcome == decision.NOT_APPLIED and "finished: net4 − net1 3" in few.reason
    missing = decision.apply_rule(rule, [row("net4", "net1", 5.0, 3.0, 7.0)])
    assert missing.outcome == decision.NOT_APPLIED and "net4 − clahe 0" in missing.reason
    last_only = [row("net4", "net1", 5.0, 3.0, 7.0, epoch="last"), row("net4", "clahe", 5.0, 3.0, 7.0, epoch="last")]
    assert decision.apply_rule(rule, last_only).outcome == decision.NOT_APPLIED
    on_last = rules.decision_rule({**RULE, "epoch": "last"})
    assert decision.apply_rule(on_last, last_only).outcome == decision.CONFIRMED


@pytest.mark.parametrize("effect, outcome", [
    ((-2.4, -6.9, 0.8), decision.UNDECIDED),  # not above 0: no control can make it a confirmation
    ((1.0, 0.2, 1.8), decision.UNDECIDED),  # above 0, but below the margin
    ((0.2, -1.4, 1.4), decision.REFUTED),
])
def test_an_effect_that_cannot_be_confirmed_is_decided_without_the_controls_seeds(effect, outcome):
    rule = rules.decision_rule(RULE)
    result = decision.apply_rule(rule, [row("net4", "net1", *effect), row("net4", "clahe", 5.0, 3.0, 7.0, seeds=2)])
    assert result.outcome == outcome
    assert "net4 − clahe not needed (2 of 5 seeds)" in result.reason
    without_control = decision.apply_rule(rule, [row("net4", "net1", *effect)])
    assert without_control.outcome == outcome and "net4 − clahe not needed (0 of 5 seeds)" in without_control.reason


def test_the_precision_line_says_how_many_seeds_the_margin_needs_at_the_observed_spread():
    rule = rules.decision_rule(RULE)  # margin 1.5
    # Per-seed D of -3, 0, +3 points: sd 3.0; (1.959964 * 3.0 / 1.5)^2 = 15.37 -> 16 seeds.
    rows = [row("net4", "net1", 0.0, -3.0, 3.0, seeds=3, per_seed=(-3.0, 0.0, 3.0))]
    line = decision.precision_line(rule, rows)
    assert "D per seed is −3.00 (seed 1), +0.00 (seed 2), +3.00 (seed 3)" in line
    assert "standard deviation over seeds 3.00 points" in line and "after about 16 seeds" in line
    assert decision.seeds_for_margin(3.0, 1.5) == 16 and decision.seeds_for_margin(0.1, 1.5) == 2
    assert decision.seeds_for_margin(3.0, 3.0) == 4  # half the spread per margin: a quarter of the seeds
    # The line follows the verdict, and needs two seeds of the rule's own comparison and epoch.
    lines, _ = decision.variant_lines(rule, "raw", rows)
    assert lines[2] == line
    assert decision.precision_line(rule, [row("net4", "net1", 1.0, 0.0, 2.0, seeds=1, per_seed=(1.0,))]) is None
    last = [row("net4", "net1", 0.0, -3.0, 3.0, seeds=3, epoch="last", per_seed=(-3.0, 0.0, 3.0))]
    assert decision.precision_line(rule, last) is None
    assert decision.precision_line(rule, [row("net4", "clahe", 0.0, -3.0, 3.0, 3, per_seed=(-3.0, 0.0, 3.0))]) is None


@pytest.mark.parametrize("outcomes, overall", [
    ({"stainfree_proxy": decision.REFUTED, "severe_proxy": decision.CONFIRMED}, decision.CONFIRMED),
    ({"stainfree_proxy": decision.REFUTED, "severe_proxy": decision.REFUTED}, decision.REFUTED),
    ({"stainfree_proxy": decision.REFUTED, "severe_proxy": decision.UNDECIDED}, decision.UNDECIDED),
    ({"severe_proxy": decision.REFUTED}, decision.NOT_APPLIED),  # stainfree_proxy has no verdict yet
    ({"stainfree_proxy": decision.NOT_APPLIED, "severe_proxy": decision.UNDECIDED}, decision.NOT_APPLIED),
])
def test_the_claim_over_the_data_variants(outcomes, overall):
    rule = rules.decision_rule(RULE)
    lines = decision.claim_lines(rule, {v: decision.Verdict(o, "") for v, o in outcomes.items()})
    assert f"refuted when it refutes it on all): {overall}**" in lines[0]
    assert decision.claim_lines(rules.decision_rule({**RULE, "claim_variants": ()}), {}) == []


@pytest.mark.parametrize("changes, message", [
    ({"margins": 1.0}, "unknown key\\(s\\) margins"),
    ({"effect": ("net4",)}, "needs 'effect' as \\(first, second\\)"),
    ({"effect": ("net4", "net4")}, "needs 'effect' as \\(first, second\\)"),
    ({"metric": "f1"}, "metric must be one of accuracy, balanced_accuracy"),
    ({"epoch": "best"}, "epoch must be one of selected, last"),
    ({"margin": 0}, "margin must be > 0 points"),
    ({"min_seeds": "five"}, "numbers for 'margin' and 'min_seeds'"),
])
def test_a_bad_rule_is_a_one_line_error(changes, message):
    with pytest.raises(errors.ConfigError, match=message):
        rules.decision_rule({**RULE, **changes})
    assert rules.decision_rule({}) is None and rules.decision_rule(None) is None


def test_the_study_config_checks_its_rule_against_its_models_and_comparisons():
    study = ml_collections.ConfigDict({
        "base": base_config(), "models": {"net1": {"model": {"enhancer": "none"}}, "net3": {}, "net4": {}},
        "data_variants": ("raw",), "seeds": (1,), "subset_per_class": 0})
    study.decision_rule = {**RULE, "controls": (), "claim_variants": ("raw",)}
    with pytest.raises(errors.ConfigError, match="reads comparisons missing from 'comparisons': net4 - net1"):
        sweep.check_study_config(study)  # without 'comparisons' the report's own pairs may run the other way
    study.comparisons = (("net4", "net1"),)
    sweep.check_study_config(study)
    study.decision_rule = {**RULE, "effect": ("net4", "net9"), "controls": (), "claim_variants": ()}
    with pytest.raises(errors.ConfigError, match="names model variants not in 'models': net9"):
        sweep.check_study_config(study)
    study.decision_rule = {**RULE, "controls": (), "claim_variants": ()}
    study.comparisons = (("net3", "net1"),)
    with pytest.raises(errors.ConfigError, match="reads comparisons missing from 'comparisons': net4 - net1"):
        sweep.check_study_config(study)
    study.comparisons = (("net4", "net1"),)
    study.decision_rule = {**RULE, "controls": (), "claim_variants": ("severe_proxy",)}
    with pytest.raises(errors.ConfigError, match="claim_variants must be data variants of the study"):
        sweep.check_study_config(study)


def test_the_report_prints_the_rules_verdict_from_the_predictions(tmp_path):
    """Net4 right on 90% of the images, Net1 on 70%: a +20-point effect over 3 seeds, confirmed (no controls)
    once the rule's seeds are there, not applied before; the claim reads the variant's verdict."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "study_rule"
    true = rng.integers(3, size=120)
    for seed in (1, 2, 3):
        for model, right in (("net1", 0.7), ("net4", 0.9)):
            predicted = np.where(rng.random(120) < right, true, (true + 1) % 3)
            write_finished_run(folder, f"{model}-raw-seed{seed}", true, predicted, predicted)
    rule = {**RULE, "controls": [], "min_seeds": 3, "claim_variants": ["raw"]}
    (folder / "study.json").write_text(json.dumps({"comparisons": [["net4", "net1"]], "decision_rule": rule}))
    block = report.results_block(folder)
    assert "**Decision rule on `raw`: confirmed**: Net4 − Net1 is at least +1.5 with its interval above 0" in block
    rows = paired.compare({(model, seed): folder / f"{model}-raw-seed{seed}" for model in ("net1", "net4")
                           for seed in (1, 2, 3)}, [("net4", "net1")])
    expected = decision.apply_rule(rules.decision_rule(rule), rows, column_header)
    assert f"confirmed**: {expected.reason}." in block
    assert "refuted when it refutes it on all): confirmed** (`raw` confirmed)" in block
    (folder / "study.json").write_text(json.dumps({"comparisons": [["net4", "net1"]],
                                                   "decision_rule": {**rule, "min_seeds": 4}}))
    block = report.results_block(folder)
    assert "**Decision rule on `raw`: not applied yet**: the rule needs 4 seeds per comparison; finished: Net4 − Net1 3" in block
    (folder / "study.json").write_text(json.dumps({"comparisons": [["net4", "net1"]]}))
    assert "Decision rule" not in report.results_block(folder)
