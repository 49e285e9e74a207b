"""Paired comparisons of a study's models from their per-image test predictions.

For two models A and B of one data variant, run with the same seeds on the same test images:
- the difference A - B in accuracy and in balanced accuracy (the mean of the per-class recalls, as
  scikit-learn's `balanced_accuracy_score`), averaged over the seeds both have finished;
- a 95% percentile interval of that difference from a two-level bootstrap: resample the seeds with
  replacement, then, within every resampled seed, resample its test images with replacement, the same
  images for both models (the comparison stays paired image by image);
- McNemar's exact test per seed: of the images exactly one of the two models gets right, is the split
  between them compatible with 50:50? (`scipy.stats.binomtest` on the discordant pairs, two-sided);
- the number of comparisons a table makes, and Holm's step-down adjustment of its p-values.

Each difference is computed at the selected checkpoint (RUN/eval/, chosen on the validation split) and at
the last epoch (RUN/eval_last/), from the `predictions_test.csv` files the evaluation writes
(`urnet_jax.evaluation.split_predictions`: one row per test image, by its manifest index). Differences
are fractions here and percentage points in the tables.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

from urnet_jax.errors import ConfigError
from urnet_jax.evaluation.report import markdown_table
from urnet_jax.evaluation.split_predictions import (SplitPredictions, predictions_file,
                                                    read_split_predictions)

# Where a study run's test predictions are, by the checkpoint they come from.
EVALUATION_FOLDERS = {"selected": "eval", "last": "eval_last"}
METRICS = ("accuracy", "balanced_accuracy")
REPLICATES = 2000
LEVEL = 0.95
BOOTSTRAP_SEED = 0  # fixed: a report regenerated from the same files gives the same intervals


@dataclasses.dataclass(frozen=True)
class PairedSeed:
    """Both models' predictions of one seed on the same N test images (class indices, shape (N,))."""

    seed: int
    true: np.ndarray
    first: np.ndarray
    second: np.ndarray
    num_classes: int


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """first - second over the seeds of a comparison (fractions): the point estimate (mean over seeds of
    the per-seed difference on every test image) and its bootstrap interval, per metric of METRICS; and
    each seed's difference, in the order of `seeds`."""

    seeds: tuple[int, ...]
    estimate: Mapping[str, float]
    interval: Mapping[str, tuple[float, float]]
    per_seed: Mapping[str, tuple[float, ...]]


@dataclasses.dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of one seed: first_only / second_only = images only that model got right."""

    seed: int
    first_only: int
    second_only: int
    pvalue: float


def pair_predictions(seed: int, first: SplitPredictions, second: SplitPredictions, where: str) -> PairedSeed:
    """The two runs' predictions aligned image by image (by manifest index); ConfigError when they are not
    of the same images, labels and classes (`where` names the pair in the message)."""
    if (first.class_names != second.class_names or len(set(first.indices.tolist())) != len(first.indices)
            or set(first.indices.tolist()) != set(second.indices.tolist())):
        raise ConfigError(f"{where}: the two runs' test predictions are not of the same images and classes")
    order = {index: position for position, index in enumerate(second.indices.tolist())}
    aligned = np.array([order[index] for index in first.indices.tolist()], np.int64)
    if not np.array_equal(first.labels, second.labels[aligned]):
        raise ConfigError(f"{where}: the two runs disagree on the true label of some test images")
    return PairedSeed(seed, first.labels, first.predicted, second.predicted[aligned], len(first.class_names))


# ----------------------------------------------------------------------------------------------------
# Statistics.


def _scores(class_totals: np.ndarray, class_hits: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and balanced accuracy from per-class image counts (..., K) and correct counts (..., K).
    Balanced accuracy averages the recalls of the classes present (as scikit-learn does)."""
    present = class_totals > 0
    recall = np.divide(class_hits, class_totals, out=np.zeros(class_hits.shape), where=present)
    return {"accuracy": class_hits.sum(-1) / class_totals.sum(-1),
            "balanced_accuracy": recall.sum(-1) / present.sum(-1)}


def _category_counts(seed: PairedSeed) -> np.ndarray:
    """(K, 2, 2) image counts by true class, first model right, second model right."""
    category = (seed.true * 2 + (seed.first == seed.true)) * 2 + (seed.second == seed.true)
    return np.bincount(category, minlength=4 * seed.num_classes).reshape(seed.num_classes, 2, 2)


def _differences(counts: np.ndarray) -> np.ndarray:
    """(..., len(METRICS)) first - second from category counts (..., K, 2, 2)."""
    totals = counts.sum((-2, -1))
    first, second = _scores(totals, counts[..., 1, :].sum(-1)), _scores(totals, counts[..., :, 1].sum(-1))
    return np.stack([first[metric] - second[metric] for metric in METRICS], axis=-1)


def seed_differences(seed: PairedSeed) -> dict[str, float]:
    """first - second on every test image of one seed, per metric of METRICS (fractions)."""
    return dict(zip(METRICS, _differences(_category_counts(seed)).tolist()))


def _resampled_differences(seed: PairedSeed, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, len(METRICS)): first - second on `count` resamples of the seed's N test images (with
    replacement, the same images for both models). Both metrics depend on an image only through its
    category (true class, which model is right), so a resample's category counts are drawn directly:
    multinomial(N, the seed's category frequencies), the same distribution as resampling the images."""
    counts = _category_counts(seed)
    size = int(counts.sum())
    drawn = rng.multinomial(size, counts.reshape(-1) / size, size=count)
    return _differences(drawn.reshape(count, *counts.shape))


def bootstrap_replicates(seeds: Sequence[PairedSeed], replicates: int = REPLICATES,
                         rng_seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(replicates, len(METRICS)) bootstrap replicates of the mean-over-seeds difference first - second.

    A replicate draws len(seeds) seeds with replacement and, for each drawn seed (each occurrence anew),
    resamples its test images with replacement; its value is the mean of those seeds' differences.
    """
    if not seeds:
        raise ValueError("a bootstrap needs at least one seed")
    rng = np.random.default_rng(rng_seed)
    drawn = rng.integers(len(seeds), size=(replicates, len(seeds)))
    totals = np.zeros((replicates, len(METRICS)))
    for position, seed in enumerate(seeds):
        replicate_of_draw = np.nonzero(drawn == position)[0]  # one entry per occurrence of this seed
        np.add.at(totals, replicate_of_draw, _resampled_differences(seed, len(replicate_of_draw), rng))
    return totals / len(seeds)


def paired_difference(seeds: Sequence[PairedSeed], replicates: int = REPLICATES, level: float = LEVEL,
                      rng_seed: int = BOOTSTRAP_SEED) -> PairedDifference:
    """The point estimate and the percentile bootstrap interval (`level`) of first - second."""
    per_seed = [seed_differences(seed) for seed in seeds]
    values = bootstrap_replicates(seeds, replicates, rng_seed)
    tail = 100 * (1 - level) / 2
    bounds = np.percentile(values, [tail, 100 - tail], axis=0)
    return PairedDifference(seeds=tuple(seed.seed for seed in seeds),
                            estimate={m: float(np.mean([d[m] for d in per_seed])) for m in METRICS},
                            interval={m: (float(bounds[0, i]), float(bounds[1, i])) for i, m in enumerate(METRICS)},
                            per_seed={m: tuple(d[m] for d in per_seed) for m in METRICS})


def mcnemar_exact(seed: PairedSeed) -> McNemar:
    """McNemar's exact two-sided test on the seed's discordant images (p = 1 when there are none)."""
    first_right, second_right = seed.first == seed.true, seed.second == seed.true
    first_only = int(np.sum(first_right & ~second_right))
    second_only = int(np.sum(second_right & ~first_right))
    discordant = first_only + second_only
    pvalue = stats.binomtest(first_only, discordant, 0.5).pvalue if discordant else 1.0
    return McNemar(seed.seed, first_only, second_only, float(pvalue))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given, capped at 1): the k-th smallest is
    multiplied by (m - k + 1), then made non-decreasing in that order."""
    values = np.asarray(pvalues, np.float64)
    order = np.argsort(values, kind="stable")
    scaled = values[order] * (len(values) - np.arange(len(values)))
    adjusted = np.empty_like(values)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def all_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair of `models` as (first, second), the first listed later in `models` (with the
    ablation's order: Net4 − Net1, not Net1 − Net4)."""
    return [(later, earlier) for earlier, later in itertools.combinations(models, 2)]


# ----------------------------------------------------------------------------------------------------
# The table of a data variant.


def signed(points: float) -> str:
    """'+1.25' or '−0.50' (a minus sign), two decimals; values that round to zero print as '+0.00', never
    '−0.00'."""
    return f"{round(points, 2) + 0.0:+.2f}".replace("-", "−")


def run_predictions(run_dir: pathlib.Path, epoch: str) -> SplitPredictions | None:
    """The test predictions of a finished run at its 'selected' or 'last' epoch, None without the file."""
    path = predictions_file(run_dir / EVALUATION_FOLDERS[epoch], "test")
    return read_split_predictions(path) if path.is_file() else None


@dataclasses.dataclass(frozen=True)
class ComparisonRow:
    """One comparison (first - second) at one epoch, with its per-seed McNemar tests."""

    first: str
    second: str
    epoch: str
    difference: PairedDifference
    tests: tuple[McNemar, ...]


def compare(run_dirs: Mapping[tuple[str, int], pathlib.Path], comparisons: Sequence[tuple[str, str]],
            replicates: int = REPLICATES) -> list[ComparisonRow]:
    """Every comparison of `comparisons` at the selected and the last epoch, over the seeds both models'
    runs have predictions for; `run_dirs` maps (model, seed) to a finished run's folder. Comparisons
    without a shared seed are left out."""
    rows = []
    for first, second in comparisons:
        seeds = sorted(seed for model, seed in run_dirs if model == first and (second, seed) in run_dirs)
        for epoch in EVALUATION_FOLDERS:
            paired = []
            for seed in seeds:
                a, b = run_predictions(run_dirs[first, seed], epoch), run_predictions(run_dirs[second, seed], epoch)
                if a is not None and b is not None:
                    paired.append(pair_predictions(seed, a, b, f"{first} - {second}, seed {seed}, {epoch} epoch"))
            if paired:
                rows.append(ComparisonRow(first, second, epoch, paired_difference(paired, replicates),
                                          tuple(mcnemar_exact(seed) for seed in paired)))
    return rows


def difference_text(row: ComparisonRow, metric: str) -> str:
    """'+1.25 [+0.10, +2.40]': the row's difference in `metric` and its interval, in percentage points."""
    low, high = row.difference.interval[metric]
    return f"{signed(100 * row.difference.estimate[metric])} [{signed(100 * low)}, {signed(100 * high)}]"


def comparison_table(rows: Sequence[ComparisonRow], header: Callable[[str], str]) -> tuple[str, str]:
    """(Markdown table, the note under it) of comparison rows; `header` spells a model name."""
    adjusted = iter(holm([test.pvalue for row in rows for test in row.tests]))
    cells = []
    for row in rows:
        tests = [(test, next(adjusted)) for test in row.tests]
        mcnemar = ", ".join(f"{test.first_only}:{test.second_only} p={test.pvalue:.3g}" for test, _ in tests)
        significant = sum(1 for _, value in tests if value < 1 - LEVEL)
        cells.append([f"{header(row.first)} − {header(row.second)}", row.epoch, str(len(row.tests)),
                      difference_text(row, "accuracy"), difference_text(row, "balanced_accuracy"),
                      mcnemar, f"{significant}/{len(tests)}"])
    table = markdown_table(["comparison", "epoch", "seeds", "accuracy, difference [95% interval]",
                            "balanced accuracy, difference [95% interval]",
                            "McNemar per seed (only first right : only second right, exact p)",
                            "seeds with Holm-adjusted p < 0.05"], cells)
    test_count = sum(len(row.tests) for row in rows)
    note = (f"Paired differences, first model minus second, in percentage points: the mean over the seeds "
            f"of each seed's difference on every test image, at the checkpoint the run kept (`selected`, "
            f"chosen on the split `train.select_on` names) and at the last epoch (`last`). The interval is a "
            f"{100 * LEVEL:.0f}% percentile bootstrap ({REPLICATES} replicates, fixed seed): seeds resampled "
            f"with replacement, then each resampled seed's test images resampled with replacement, the same "
            f"images for both models. This table makes {2 * len(rows)} interval comparisons ({len(rows)} rows "
            f"x 2 metrics); read at {100 * LEVEL:.0f}% each, about {(1 - LEVEL) * 2 * len(rows):.1f} would "
            f"exclude 0 by chance if no model differed, so a lone interval that barely excludes 0 is weak "
            f"evidence. McNemar's exact test (two-sided, on the images exactly one model got right) per seed; "
            f"its {test_count} p-values are Holm-adjusted together (family-wise error 5% over the table).")
    return table, note
