"""A cross-lab study's recommendation rule, applied by the report to the runs' validation, own-test and external
numbers.

The rule is data in the study config (`recommendation_rule`, recorded in study.json), written before the
runs, so that the recommended model variant printed in a document is computed from the committed files:

  external:   the external set the recommendation is for (e.g. 'tecom'), a set of the study's `external`;
  adapted:    optional: the same images with test-time BatchNorm re-estimation (e.g. 'tecom_adapt_bn');
  baseline:   the model variant the others must not fall behind on their own validation split;
  own_margin: points of validation balanced accuracy (at each run's selected checkpoint) a variant may lose
              against the baseline's mean and stay eligible (e.g. 2.0);
  target_gap: the largest acceptable own-test − external balanced-accuracy gap, in points (e.g. 15.0);
  min_seeds:  seeds every model variant needs on the external set before the rule is applied.

Applied to one data variant: the recommendation is the eligible variant with the highest mean balanced
accuracy on `external` (what prediction gives without adaptation). When an eligible variant's mean on
`adapted` exceeds that by more than its own standard deviation over seeds, the recommendation becomes that
variant with --adapt-bn. The target is met when the recommendation's mean gap own-test − external (paired
by seed; on `adapted` with --adapt-bn) is at most `target_gap`. Balanced accuracy is
`external.balanced_accuracy` (the mean recall over the classes a set has images of); on the validation split
it is computed from the selected checkpoint's RUN/eval/predictions_val.csv, so no choice reads the test split
(the own-test numbers only enter the reported gap).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
from collections.abc import Mapping, Sequence

from urnet_jax.data.plan import VARIANTS
from urnet_jax.errors import ConfigError, DataError
from urnet_jax.evaluation.metrics import classification_metrics
from urnet_jax.evaluation.report import MISSING, markdown_table
from urnet_jax.evaluation.split_predictions import predictions_file, read_split_predictions
from urnet_jax.study import external as external_report
from urnet_jax.study import rules
from urnet_jax.study.results import (FinishedRun, collect_finished_runs, column_header, ordered,
                                     read_external_metrics, read_study_config)
from urnet_jax.study.rules import RecommendationRule
from urnet_jax.study.seed_stats import mean_std_points
from urnet_jax.study.sweep import ABLATION_MODELS


@dataclasses.dataclass(frozen=True)
class VariantScores:
    """One model variant's balanced accuracies (fractions), one entry per seed evaluated on the external set:
    own validation split (selected checkpoint), own test split, external set, and the adapted set (only the
    seeds that have it)."""

    model: str
    validation: tuple[float, ...]
    own: tuple[float, ...]
    external: tuple[float, ...]
    adapted: tuple[float, ...]
    adapted_gaps: tuple[float, ...]

    @property
    def gaps(self) -> tuple[float, ...]:
        return tuple(mine - theirs for mine, theirs in zip(self.own, self.external))


def validation_balanced_accuracy(run_dir: pathlib.Path) -> float:
    """A finished run's balanced accuracy (a fraction) on its validation split at the selected checkpoint, from
    RUN/eval/predictions_val.csv; ConfigError (one line) when the file is missing or damaged."""
    path = predictions_file(run_dir / "eval", "val")
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the recommendation rule's eligibility reads the validation split "
                          f"(train.select_on 'val')")
    try:
        predictions = read_split_predictions(path)
    except DataError as error:
        raise ConfigError(str(error)) from None
    return external_report.balanced_accuracy(
        classification_metrics(predictions.labels, predictions.predicted, predictions.class_names))


def collect_scores(rule: RecommendationRule, results_dir: pathlib.Path,
                   runs: Sequence[FinishedRun]) -> dict[str, VariantScores]:
    """{model: its VariantScores} over the finished `runs` of one data variant (seed order)."""
    scores = {}
    for model in sorted({run.model for run in runs}):
        validation, own, there, adapted, adapted_gaps = [], [], [], [], []
        for run in sorted((run for run in runs if run.model == model), key=lambda run: run.seed):
            metrics = read_external_metrics(results_dir / run.name, rule.external)
            if metrics is None:
                continue
            validation.append(validation_balanced_accuracy(results_dir / run.name))
            own.append(external_report.balanced_accuracy(run.metrics))
            there.append(external_report.balanced_accuracy(metrics))
            on_adapted = read_external_metrics(results_dir / run.name, rule.adapted) if rule.adapted else None
            if on_adapted is not None:
                adapted.append(external_report.balanced_accuracy(on_adapted))
                adapted_gaps.append(own[-1] - adapted[-1])
        scores[model] = VariantScores(model, tuple(validation), tuple(own), tuple(there), tuple(adapted),
                                      tuple(adapted_gaps))
    return scores


def scores_by_data_variant(rule: RecommendationRule, results_dir: pathlib.Path,
                           runs: Sequence[FinishedRun]) -> dict[str, dict[str, VariantScores]]:
    """{data variant: `collect_scores` of its finished runs}, data variants in the report's order."""
    return {variant: collect_scores(rule, results_dir, [run for run in runs if run.data_variant == variant])
            for variant in ordered([run.data_variant for run in runs], VARIANTS)}


def rule_models(study_models: Sequence[str]) -> list[str]:
    """The model variants of a study in the order the rule considers them (and the report lists them)."""
    return ordered(list(study_models), ABLATION_MODELS)


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """What the rule recommends on one data variant: the model variant, whether with --adapt-bn, the set its
    numbers are on (`rule.external`, or `rule.adapted` with --adapt-bn), its balanced accuracies there and
    its gaps own-test − there (fractions, by seed), and the eligible model variants."""

    model: str
    adapt_bn: bool
    on: str
    balanced: tuple[float, ...]
    gaps: tuple[float, ...]
    eligible: tuple[str, ...]

    def target_met(self, rule: RecommendationRule) -> bool:
        return 100 * statistics.mean(self.gaps) <= rule.target_gap


def recommend(rule: RecommendationRule, models: Sequence[str],
              scores: Mapping[str, VariantScores]) -> Recommendation | None:
    """The rule applied to the `models` of one data variant; None until each has `rule.min_seeds` seeds."""
    if any(model not in scores or len(scores[model].external) < rule.min_seeds for model in models):
        return None
    floor = statistics.mean(scores[rule.baseline].validation) - rule.own_margin / 100
    eligible = tuple(model for model in models if statistics.mean(scores[model].validation) >= floor)
    best = max(eligible, key=lambda model: statistics.mean(scores[model].external))
    best_mean = statistics.mean(scores[best].external)
    adapted = [model for model in eligible if scores[model].adapted
               and statistics.mean(scores[model].adapted) - best_mean > _std(scores[model].adapted)]
    if adapted:
        choice = max(adapted, key=lambda model: statistics.mean(scores[model].adapted))
        return Recommendation(choice, True, rule.adapted, scores[choice].adapted, scores[choice].adapted_gaps,
                              eligible)
    return Recommendation(best, False, rule.external, scores[best].external, scores[best].gaps, eligible)


def recommended(results_dir: str | os.PathLike) -> dict[str, Recommendation | None]:
    """{data variant: what the study's recommendation rule recommends (None until every model variant has its
    seeds)} from a study folder's committed files, as its report computes it; a one-line ConfigError when the
    folder's study.json has no recommendation rule."""
    results_dir = pathlib.Path(results_dir)
    study = read_study_config(results_dir)
    rule = rules.recommendation_rule(study.get("recommendation_rule") if study is not None else None)
    if rule is None:
        raise ConfigError(f"{results_dir / 'study.json'} has no recommendation_rule")
    models = rule_models(list(study["models"]))
    return {variant: recommend(rule, models, scores) for variant, scores in
            scores_by_data_variant(rule, results_dir, collect_finished_runs(results_dir)).items()}


def recommendation_lines(rule: RecommendationRule, variant: str, models: Sequence[str],
                         scores: Mapping[str, VariantScores]) -> list[str]:
    """The Markdown lines (each followed by '') of the rule on one data variant: the rule, each model
    variant's eligibility and means, and the recommendation with its target, or why it is not applied yet."""
    parts = [f"**Recommendation rule on `{variant}`** (study config `recommendation_rule`): the model variant "
             f"with the highest mean balanced accuracy on `{rule.external}` among those whose validation balanced "
             f"accuracy (selected checkpoint) is at most {rule.own_margin:g} points below "
             f"{column_header(rule.baseline)}'s mean"
             + (f"; with --adapt-bn when an eligible variant's mean on `{rule.adapted}` exceeds that by more than "
                f"its standard deviation over seeds" if rule.adapted else "")
             + f". Target: a gap own-test − `{rule.external}` of at most {rule.target_gap:g} points.", ""]
    seeds = {model: len(scores[model].external) if model in scores else 0 for model in models}
    choice = recommend(rule, models, scores)
    if choice is None:
        counts = ", ".join(f"{column_header(model)} {count}" for model, count in seeds.items())
        return parts + [f"**Not applied yet**: the rule needs {rule.min_seeds} seeds of every model variant "
                        f"evaluated on `{rule.external}`; finished: {counts}.", ""]
    rows = [[column_header(model), str(seeds[model]), mean_std_points(scores[model].validation),
             "yes" if model in choice.eligible else "no", mean_std_points(scores[model].own),
             mean_std_points(scores[model].external),
             mean_std_points(scores[model].adapted) if scores[model].adapted else MISSING] for model in models]
    parts += [markdown_table(["model", "seeds", "validation balanced accuracy", "eligible",
                              "own-test balanced accuracy", f"`{rule.external}` balanced accuracy",
                              f"`{rule.adapted}` balanced accuracy" if rule.adapted else "adapted"], rows), ""]
    name = column_header(choice.model) + (" with --adapt-bn" if choice.adapt_bn else "")
    target = "met" if choice.target_met(rule) else "not met"
    return parts + [f"**Recommended on `{variant}`: {name}**: balanced accuracy on `{choice.on}` "
                    f"{mean_std_points(choice.balanced)}%, gap own-test − `{choice.on}` "
                    f"{mean_std_points(choice.gaps, signed=True)} points: the target (at most "
                    f"{rule.target_gap:g}) is **{target}**.", ""]
