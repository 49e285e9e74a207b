"""The differential count of classified cells: count and share per class, with a 95% confidence interval.

The interval of each class's share is the Wilson score interval (Wilson 1927) of a binomial proportion,
computed by scipy (`scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`): with n classified
images, k of them in the class, p = k / n and z the normal quantile (1.96 at 95%),

    centre = (p + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

It stays inside [0, 1] and is well behaved for rare classes and small counts (unlike the normal
approximation p +- z sqrt(p (1 - p) / n), which collapses to [0, 0] when k = 0). Each class's interval
is marginal (one class against the rest); it treats the predicted labels as the truth, i.e. it covers
the sampling uncertainty of the count, not the classifier's errors. Unreadable files are excluded from
n and listed separately.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import stats


def wilson_interval(count: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (fractions in [0, 1]) for `count` successes out of `total` trials.

    total = 0 gives the uninformative (0, 1). Raises ValueError unless 0 <= count <= total.
    """
    if not 0 <= count <= total:
        raise ValueError(f"need 0 <= count <= total, got count={count}, total={total}")
    if total == 0:  # scipy's binomtest needs at least one trial
        return 0.0, 1.0
    interval = stats.binomtest(count, total).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


@dataclasses.dataclass(frozen=True)
class ClassCount:
    """One row of a differential count; percentages in % of the classified images."""

    name: str
    count: int
    percent: float
    ci_low: float
    ci_high: float


def differential_count(predicted: Sequence[int] | np.ndarray, class_names: Sequence[str],
                       confidence: float = 0.95) -> list[ClassCount]:
    """Count and share (with a Wilson `confidence` interval) of every class among the `predicted` indices."""
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    counts = np.bincount(predicted, minlength=len(class_names))
    total = int(counts.sum())
    rows = []
    for name, count in zip(class_names, counts.tolist(), strict=True):
        low, high = wilson_interval(count, total, confidence)
        rows.append(ClassCount(name, count, 100.0 * count / total if total else 0.0, 100.0 * low, 100.0 * high))
    return rows


def format_differential_count(rows: Sequence[ClassCount], unreadable: Sequence[tuple[str, str]] = (),
                              confidence: float = 0.95) -> str:
    """A plain-text table of the differential count, followed by the unreadable files (if any)."""
    total = sum(row.count for row in rows)
    width = max([len("class"), len("total")] + [len(row.name) for row in rows])
    level = f"{100 * confidence:g}% CI (Wilson)"
    lines = [f"Differential count of {total} classified image(s):",
             f"{'class':<{width}}  {'count':>6}  {'percent':>8}  {level}"]
    for row in rows:
        lines.append(f"{row.name:<{width}}  {row.count:>6d}  {row.percent:>7.2f}%  "
                     f"[{row.ci_low:.2f}%, {row.ci_high:.2f}%]")
    lines.append(f"{'total':<{width}}  {total:>6d}  {100.0 if total else 0.0:>7.2f}%")
    lines.append(f"Unreadable files: {len(unreadable)}")
    lines.extend(f"  {path}: {reason}" for path, reason in unreadable)
    return "\n".join(lines)
