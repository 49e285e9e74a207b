"""The rules a study config writes down before its runs, as data: the decision rule of an ablation study
(`decision_rule`, applied by `decision`) and the recommendation rule of a cross-lab study
(`recommendation_rule`, applied by `recommendation`). Each is read from the config (or from the results
folder's study.json) into a frozen dataclass; a bad rule is a one-line ConfigError, raised when the study
config is checked, before any run starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from urnet_jax.errors import ConfigError
from urnet_jax.study import paired

DECISION_KEYS = frozenset({"effect", "controls", "metric", "epoch", "margin", "min_seeds", "claim_variants"})
RECOMMENDATION_KEYS = frozenset({"external", "adapted", "baseline", "own_margin", "target_gap", "min_seeds"})


@dataclasses.dataclass(frozen=True)
class DecisionRule:
    """An ablation study's decision rule (`decision`'s docstring); `margin` in percentage points."""

    effect: tuple[str, str]
    controls: tuple[tuple[str, str], ...]
    metric: str
    epoch: str
    margin: float
    min_seeds: int
    claim_variants: tuple[str, ...]

    @property
    def comparisons(self) -> tuple[tuple[str, str], ...]:
        """The effect first, then the controls."""
        return (self.effect, *self.controls)


@dataclasses.dataclass(frozen=True)
class RecommendationRule:
    """A cross-lab study's recommendation rule (`recommendation`'s docstring); margins in percentage points."""

    external: str
    adapted: str
    baseline: str
    own_margin: float
    target_gap: float
    min_seeds: int


def decision_rule(config: Mapping | None, models: Sequence[str] | None = None) -> DecisionRule | None:
    """The DecisionRule of a study config's `decision_rule` (None when absent or empty); ConfigError (one
    line) for a bad one. `models` (the study's model variants), when given, must hold every named model."""
    config = _known_keys(config, "decision_rule", DECISION_KEYS)
    if config is None:
        return None
    try:
        rule = DecisionRule(effect=_pair(config["effect"]),
                            controls=tuple(_pair(pair) for pair in config.get("controls", ())),
                            metric=str(config.get("metric", "balanced_accuracy")),
                            epoch=str(config.get("epoch", "selected")),
                            margin=float(config.get("margin", 1.5)),
                            min_seeds=int(config.get("min_seeds", 1)),
                            claim_variants=tuple(str(v) for v in config.get("claim_variants", ())))
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"study 'decision_rule' needs 'effect' as (first, second) model names, pairs in "
                          f"'controls' and numbers for 'margin' and 'min_seeds' ({error})") from None
    if rule.metric not in paired.METRICS:
        raise ConfigError(f"study 'decision_rule': metric must be one of {', '.join(paired.METRICS)}, got {rule.metric!r}")
    if rule.epoch not in paired.EVALUATION_FOLDERS:
        raise ConfigError(f"study 'decision_rule': epoch must be one of {', '.join(paired.EVALUATION_FOLDERS)}, "
                          f"got {rule.epoch!r}")
    if not (rule.margin > 0 and rule.min_seeds >= 1):
        raise ConfigError(f"study 'decision_rule': margin must be > 0 points and min_seeds >= 1, got "
                          f"{rule.margin} and {rule.min_seeds}")
    named = {name for pair in rule.comparisons for name in pair}
    if models is not None and not named <= set(models):
        raise ConfigError(f"study 'decision_rule' names model variants not in 'models': "
                          f"{', '.join(sorted(named - set(models)))}")
    return rule


def _known_keys(config: Mapping | None, name: str, keys: frozenset[str]) -> dict | None:
    """The rule `name` as a plain dict (None when absent or empty); ConfigError for a key not in `keys`."""
    if not config:
        return None
    unknown = set(config) - keys
    if unknown:
        raise ConfigError(f"study '{name}': unknown key(s) {', '.join(sorted(unknown))} "
                          f"(expected {', '.join(sorted(keys))})")
    return dict(config)


def _pair(value: Sequence[str]) -> tuple[str, str]:
    first, second = value
    if not (isinstance(first, str) and isinstance(second, str) and first != second):
        raise ValueError(f"{tuple(value)!r} is not two distinct model names")
    return first, second


def recommendation_rule(config: Mapping | None, models: Sequence[str] | None = None,
                        external_sets: Sequence[str] | None = None) -> RecommendationRule | None:
    """The RecommendationRule of a study config's `recommendation_rule` (None when absent or empty);
    ConfigError (one line) for a bad one. `models` and `external_sets`, when given, must hold what it names."""
    config = _known_keys(config, "recommendation_rule", RECOMMENDATION_KEYS)
    if config is None:
        return None
    try:
        rule = RecommendationRule(external=str(config["external"]), adapted=str(config.get("adapted", "")),
                                  baseline=str(config["baseline"]), own_margin=float(config.get("own_margin", 2.0)),
                                  target_gap=float(config.get("target_gap", 15.0)),
                                  min_seeds=int(config.get("min_seeds", 1)))
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"study 'recommendation_rule' needs 'external' and 'baseline' names and numbers for "
                          f"'own_margin', 'target_gap' and 'min_seeds' ({error})") from None
    if not (rule.own_margin >= 0 and rule.target_gap >= 0 and rule.min_seeds >= 1):
        raise ConfigError("study 'recommendation_rule': own_margin and target_gap must be >= 0 points and "
                          "min_seeds >= 1")
    if models is not None and rule.baseline not in models:
        raise ConfigError(f"study 'recommendation_rule': baseline {rule.baseline!r} is not a model variant of 'models'")
    named_sets = [rule.external] + ([rule.adapted] if rule.adapted else [])
    if external_sets is not None and not set(named_sets) <= set(external_sets):
        raise ConfigError(f"study 'recommendation_rule' names sets missing from 'external': "
                          f"{', '.join(s for s in named_sets if s not in external_sets)}")
    return rule
