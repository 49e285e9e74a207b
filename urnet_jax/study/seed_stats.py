"""Numbers over a study's seeds: means and sample standard deviations (ddof 1) of metrics.json numbers,
differences paired by seed, and their Markdown cells in percentage points (two decimals), from pandas and
scipy (the t-interval). Inputs are fractions in [0, 1] (`mean_std`: numbers in any unit)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from urnet_jax.evaluation.report import MISSING
from urnet_jax.study import paired
from urnet_jax.study.results import TABLE3_KEYS, FinishedRun

Pick = Callable[[FinishedRun], "float | None"]


def common_classes(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """The classes of the first metrics.json that every one of them has, in its order."""
    return [name for name in metrics[0]["classes"] if all(name in m["per_class"] for m in metrics)]


def aggregate_metrics(metrics: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mean, sample standard deviation (ddof 1)) over runs of every number the Table-3 layout shows,
    each in metrics.json's shape; a std is None for fewer than two runs, a class some run lacks is left out."""
    classes = common_classes(metrics)
    numbers = pd.DataFrame([{**{(name, key): m["per_class"][name][key] for name in classes for key in TABLE3_KEYS},
                             **{("macro", key): m["macro"][key] for key in TABLE3_KEYS},
                             ("accuracy", ""): m["accuracy"]} for m in metrics], dtype=np.float64)

    def shaped(values: pd.Series) -> dict[str, Any]:
        def number(label: tuple[str, str]) -> float | None:
            return None if pd.isna(values[label]) else float(values[label])

        return {"classes": classes, "per_class": {name: {key: number((name, key)) for key in TABLE3_KEYS}
                                                  for name in classes},
                "macro": {key: number(("macro", key)) for key in TABLE3_KEYS}, "accuracy": number(("accuracy", ""))}

    return shaped(numbers.mean()), shaped(numbers.std())  # std: ddof 1, NaN (None) for one run


def paired_differences(first: Sequence[FinishedRun], second: Sequence[FinishedRun], pick: Pick) -> list[float]:
    """pick(first) - pick(second) for every seed both lists have a value for, in seed order (units of `pick`)."""
    def by_seed(runs: Sequence[FinishedRun]) -> pd.Series:
        return pd.Series({run.seed: pick(run) for run in runs}, dtype=np.float64)

    return (by_seed(first) - by_seed(second)).dropna().sort_index().tolist()


def _points(values: Sequence[float]) -> pd.Series:
    """Fractions as percentage points."""
    return 100.0 * pd.Series(values, dtype=np.float64)


def mean_std(values: Sequence[float], signed: bool = False) -> str:
    """'31.20 ± 1.07' (or '+0.98 ± 0.67' when signed): mean ± sample std (ddof 1) of numbers, in their
    own unit with two decimals; the mean alone for one value, 'n/a' for none."""
    if not values:
        return MISSING
    numbers = pd.Series(values, dtype=np.float64)
    mean = paired.signed(numbers.mean()) if signed else f"{numbers.mean():.2f}"
    return mean + (f" ± {numbers.std():.2f}" if len(numbers) > 1 else "")


def mean_std_points(values: Sequence[float], signed: bool = False) -> str:
    """'96.00 ± 1.07' (or '+0.98 ± 0.67' when signed): mean ± sample std of fractions, in percentage
    points; the mean alone for one value, 'n/a' for none."""
    return mean_std(_points(values).tolist(), signed)


def difference_cell(differences: Sequence[float]) -> str:
    """'+1.20 ± 0.80 (2/0/1)': mean ± sample std in percentage points, then seeds better/equal/worse
    ('n/a' for no differences)."""
    if not differences:
        return MISSING
    points = _points(differences)
    counts = ((points > 1e-9).sum(), (points.abs() <= 1e-9).sum(), (points < -1e-9).sum())
    return f"{mean_std_points(differences, signed=True)} ({'/'.join(map(str, counts))})"


def t_interval(differences: Sequence[float], level: float = 0.95) -> str:
    """The two-sided t-interval (n - 1 degrees of freedom) of the mean difference, in percentage points
    ('n/a' for fewer than 2)."""
    if len(differences) < 2:
        return MISSING
    points = _points(differences)
    low, high = stats.t.interval(level, len(points) - 1, loc=points.mean(), scale=stats.sem(points))
    return f"[{paired.signed(low)}, {paired.signed(high)}]"
