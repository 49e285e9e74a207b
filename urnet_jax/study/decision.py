"""A study's decision rule, applied by the report to the paired comparisons of each data variant.

The rule is data in the study config (`decision_rule`, recorded in the results folder's study.json), written
before the runs, so that the verdict printed in a document is computed from the committed files and cannot
drift from them:

  effect:         (first, second): the comparison the rule is about, e.g. ('net4', 'net1');
  controls:       ((first, second), ...): comparisons whose intervals must lie above 0 for a confirmation,
                  e.g. (('net4', 'conv_frontend'), ('net4', 'clahe'));
  metric:         'balanced_accuracy' or 'accuracy' (paired.METRICS);
  epoch:          'selected' or 'last' (paired.EVALUATION_FOLDERS);
  margin:         the smallest effect that matters, in percentage points (e.g. 1.5);
  min_seeds:      seeds every comparison of the rule needs before the rule is applied;
  claim_variants: the data variants on which the paper's claim is tested (e.g. the two proxies): the claim is
                  confirmed when the rule confirms it on any of them, refuted when it refutes it on all.

Per data variant, with D the effect's mean paired difference and I its 95% bootstrap interval (points):
confirmed when D >= margin, I lies above 0 and every control's interval lies above 0; refuted at this
scale when I lies within [-margin, +margin]; undecided otherwise; not applied while the effect has fewer
than min_seeds seeds. The controls only gate a confirmation: once the effect has its seeds and cannot be
confirmed (D < margin or I not above 0), its interval alone gives the verdict, whatever the controls' runs
still to come would show; while it could be confirmed, the rule waits for every control's seeds.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence

from urnet_jax.study import paired
from urnet_jax.study.rules import DecisionRule

CONFIRMED = "confirmed"
REFUTED = "refuted at this scale"
UNDECIDED = "undecided"
NOT_APPLIED = "not applied yet"
Z_95 = 1.959964  # the standard normal's 97.5% quantile


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The rule's outcome on one data variant and the sentence that explains it."""

    outcome: str
    reason: str


def apply_rule(rule: DecisionRule, rows: Sequence[paired.ComparisonRow],
               header: Callable[[str], str] = str) -> Verdict:
    """The rule's verdict on one data variant's comparison rows (paired.compare); `header` spells a model."""
    by_pair = {(row.first, row.second): row for row in rows if row.epoch == rule.epoch}

    def name(pair: tuple[str, str]) -> str:
        return f"{header(pair[0])} − {header(pair[1])}"

    seeds = {pair: len(by_pair[pair].difference.seeds) if pair in by_pair else 0 for pair in rule.comparisons}
    short = [pair for pair in rule.comparisons if seeds[pair] < rule.min_seeds]

    def not_applied() -> Verdict:
        counts = ", ".join(f"{name(pair)} {seeds[pair]}" for pair in short)
        return Verdict(NOT_APPLIED, f"the rule needs {rule.min_seeds} seeds per comparison; finished: {counts}")

    if rule.effect in short:
        return not_applied()
    effect = by_pair[rule.effect]
    estimate = 100 * effect.difference.estimate[rule.metric]
    low, high = (100 * bound for bound in effect.difference.interval[rule.metric])
    could_confirm = estimate >= rule.margin and low > 0
    if short and could_confirm:  # only the controls can still stop a confirmation
        return not_applied()
    controls_above = {pair: 100 * by_pair[pair].difference.interval[rule.metric][0] > 0
                      for pair in rule.controls if pair not in short}
    numbers = "; ".join(f"{name(pair)} {paired.difference_text(by_pair[pair], rule.metric)}"
                        for pair in rule.comparisons if pair not in short)
    if short:  # the effect alone settles the verdict: the controls only gate a confirmation
        numbers += "; " + ", ".join(f"{name(pair)} not needed ({seeds[pair]} of {rule.min_seeds} seeds)"
                                    for pair in short)
    if could_confirm and all(controls_above.values()):
        outcome = CONFIRMED
        why = f"{name(rule.effect)} is at least +{rule.margin:g} with its interval above 0"
        if rule.controls:
            why += ", and every control's interval lies above 0"
    elif -rule.margin <= low and high <= rule.margin:
        outcome = REFUTED
        why = f"the interval of {name(rule.effect)} lies within ±{rule.margin:g}"
    else:
        outcome = UNDECIDED
        if low > 0 and estimate >= rule.margin:
            failing = ", ".join(name(pair) for pair, above in controls_above.items() if not above)
            why = f"a control does as well: the interval of {failing} does not lie above 0"
        elif low > 0:
            why = f"the interval of {name(rule.effect)} lies above 0 but its mean is below +{rule.margin:g}"
        else:
            why = (f"the interval of {name(rule.effect)} neither lies above 0 nor within ±{rule.margin:g}")
    return Verdict(outcome, f"{why} ({numbers})")


def describe(rule: DecisionRule, header: Callable[[str], str] = str) -> str:
    """One sentence stating the rule with its settings."""
    first, second = (header(model) for model in rule.effect)
    controls = ", ".join(f"{header(a)} − {header(b)}" for a, b in rule.controls)
    metric = rule.metric.replace("_", " ")
    return (f"Decision rule (study config `decision_rule`): D = {first} − {second} in {metric} at the "
            f"{rule.epoch} epoch, I its 95% bootstrap interval, in points; confirmed when D ≥ +{rule.margin:g}, "
            f"I above 0" + (f" and the intervals of {controls} above 0" if controls else "")
            + f"; refuted at this scale when I lies within ±{rule.margin:g}; undecided otherwise; applied once "
            f"{first} − {second} has {rule.min_seeds} seeds"
            + (", and, for a confirmation, every control too." if controls else "."))


def seeds_for_margin(seed_std: float, margin: float) -> int:
    """Seeds after which an interval of the mean over seeds, mean ± 1.96 * seed_std / sqrt(n) (the
    normal approximation the bootstrap over seeds approaches), is no wider than ±margin (both in points)."""
    return max(2, math.ceil((Z_95 * seed_std / margin) ** 2))


def precision_line(rule: DecisionRule, rows: Sequence[paired.ComparisonRow]) -> str | None:
    """A sentence on what the rule's effect can resolve at its observed seed-to-seed spread (None with fewer
    than 2 seeds): each seed's D, their standard deviation, and the seeds the interval needs to narrow to
    ±margin (below that count it is expected to be too wide to refute, or to confirm an effect as small as
    the margin)."""
    effect = next((row for row in rows if (row.first, row.second) == rule.effect and row.epoch == rule.epoch), None)
    if effect is None or len(effect.difference.seeds) < 2:
        return None
    values = [100 * value for value in effect.difference.per_seed[rule.metric]]
    spread = statistics.stdev(values)
    listed = ", ".join(f"{paired.signed(value)} (seed {seed})" for seed, value in zip(effect.difference.seeds, values))
    needed = seeds_for_margin(spread, rule.margin)
    return (f"Precision: D per seed is {listed}; standard deviation over seeds {spread:.2f} points. At that spread "
            f"the interval narrows to ±{rule.margin:g} after about {needed} seeds "
            f"(n ≥ (1.96 × sd / {rule.margin:g})²); with fewer it is expected to be too wide to say \"{REFUTED}\", "
            f"or to confirm an effect as small as +{rule.margin:g}, unless later seeds spread less.")


def variant_lines(rule: DecisionRule, variant: str, rows: Sequence[paired.ComparisonRow],
                  header: Callable[[str], str] = str) -> tuple[list[str], Verdict]:
    """The Markdown lines of the rule's verdict on one data variant (and the precision its seeds give), and
    the verdict."""
    verdict = apply_rule(rule, rows, header)
    lines = [f"**Decision rule on `{variant}`: {verdict.outcome}**: {verdict.reason}.", ""]
    precision = precision_line(rule, rows)
    return lines + ([precision, ""] if precision else []), verdict


def claim_lines(rule: DecisionRule, verdicts: Mapping[str, Verdict]) -> list[str]:
    """The claim's overall outcome over `rule.claim_variants` (no lines when the rule names none)."""
    if not rule.claim_variants:
        return []
    outcomes = {variant: verdicts[variant].outcome if variant in verdicts else NOT_APPLIED
                for variant in rule.claim_variants}
    if CONFIRMED in outcomes.values():
        overall = CONFIRMED
    elif all(outcome == REFUTED for outcome in outcomes.values()):
        overall = REFUTED
    elif NOT_APPLIED in outcomes.values():
        overall = NOT_APPLIED
    else:
        overall = UNDECIDED
    listed = ", ".join(f"`{variant}` {outcome}" for variant, outcome in outcomes.items())
    return [f"**The claim (confirmed when the rule confirms it on any of {', '.join(f'`{v}`' for v in outcomes)}, "
            f"refuted when it refutes it on all): {overall}** ({listed}).", ""]
