"""Corrected class proportions of a new folder: the differential count adjusted for the classifier's errors.

Counting predicted labels ("classify and count") is biased whenever the classifier errs: with 80% monocyte
recall, a monocyte-rich folder is under-counted in monocytes. When the folder differs from the training
data only in its class mix (prior shift: p(x | y) unchanged), held-out predictions with known labels
identify the bias, and two estimators remove it:

- Adjusted count (Forman, "Quantifying counts and costs via classification", Data Min. Knowl. Disc.
  2008): with C[i, j] = P(predicted j | true i) estimated on the held-out set, the folder's predicted
  proportions are q = C^T p for its true proportions p. p is the least-squares solution of C^T p = q on
  the probability simplex (non-negative least squares, the sum-to-one constraint added as a heavily
  weighted equation, then renormalised).
- EM prior shift (Saerens, Latinne and Decaestecker, "Adjusting the outputs of a classifier to new a
  priori probabilities", Neural Computation 2002): with calibrated posteriors p_s(y | x) under the
  held-out priors pi_s, iterate pi <- mean_x of p_s(y | x) pi(y) / pi_s(y), renormalised per x, to the
  maximum-likelihood priors pi of the folder. Posteriors are temperature-scaled (`urnet_jax.calibration`),
  the temperature fitted on the held-out set.

Intervals: percentile bootstrap over both sources of uncertainty. Each resample draws the folder's images
with replacement (sampling uncertainty of the count) and the held-out images with replacement within each
true class (uncertainty of the confusion matrix, or of the temperature; the held-out class sizes are
fixed by the split's design, and every class keeps its examples), and re-runs the whole estimator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from scipy import optimize

from urnet_jax.calibration import HeldOutPredictions, fit_temperature, temperature_scaled
from urnet_jax.errors import ConfigError, DataError

ADJUSTED_COUNT = "adjusted_count"
EM_PRIOR_SHIFT = "em"
METHOD_NAMES = {ADJUSTED_COUNT: "adjusted count (Forman 2008)",
                EM_PRIOR_SHIFT: "EM prior shift on temperature-scaled probabilities (Saerens et al. 2002)"}
DEFAULT_RESAMPLES = 1000
_SUM_TO_ONE_WEIGHT = 1e3  # weight of the sum-to-one equation in the adjusted count's least squares


@dataclasses.dataclass(frozen=True)
class ClassProportion:
    """One class of a corrected differential count; proportions are fractions in [0, 1].

    interval: the `confidence` percentile bootstrap interval of the corrected proportion (`resamples`
    resamples); method: the estimator's name; heldout: the held-out set the correction comes from.
    """

    name: str
    raw_count: int
    raw_proportion: float
    corrected_proportion: float
    interval: tuple[float, float]
    confidence: float
    resamples: int
    method: str
    heldout: str


def confusion_rates(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """C (K, K) with C[i, j] = the fraction of true class i predicted as j; every row sums to 1.

    Raises DataError naming the first class index without any example.
    """
    counts = np.bincount(np.asarray(labels) * num_classes + np.asarray(predicted),
                         minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    support = counts.sum(axis=1, keepdims=True)
    if (support == 0).any():
        raise DataError(f"the held-out set has no example of class {int(np.argmin(support[:, 0]))}")
    return counts / support


def adjusted_count(predicted_proportions: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """True proportions p (K,) on the simplex minimising |C^T p - q| for predicted proportions q (K,) and
    confusion rates C (K, K) (`confusion_rates`)."""
    num_classes = len(predicted_proportions)
    system = np.vstack([rates.T, np.full((1, num_classes), _SUM_TO_ONE_WEIGHT)])
    target = np.append(predicted_proportions, _SUM_TO_ONE_WEIGHT)
    proportions, _ = optimize.nnls(system, target)
    return proportions / proportions.sum()


def em_prior_shift(probabilities: np.ndarray, heldout_priors: np.ndarray, tolerance: float = 1e-8,
                   max_iterations: int = 10_000) -> np.ndarray:
    """The folder's class priors (K,) by EM (Saerens et al. 2002) from calibrated posteriors (N, K) that
    hold under `heldout_priors` (K,), all > 0; stops when no prior moves by more than `tolerance`."""
    probabilities = np.asarray(probabilities, np.float64)
    priors = np.asarray(heldout_priors, np.float64)
    for _ in range(max_iterations):
        weighted = probabilities * (priors / heldout_priors)
        updated = (weighted / weighted.sum(axis=1, keepdims=True)).mean(axis=0)
        converged = np.max(np.abs(updated - priors)) < tolerance
        priors = updated
        if converged:
            break
    return priors


def _estimator(method: str, folder_logits: np.ndarray, heldout: HeldOutPredictions
               ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """estimate(folder indices, held-out indices) -> corrected proportions (K,) for `method`."""
    num_classes = folder_logits.shape[1]
    folder_predicted = folder_logits.argmax(axis=1)
    heldout_predicted = heldout.logits.argmax(axis=1)

    def by_adjusted_count(folder: np.ndarray, held: np.ndarray) -> np.ndarray:
        predicted_proportions = np.bincount(folder_predicted[folder], minlength=num_classes) / len(folder)
        return adjusted_count(predicted_proportions,
                              confusion_rates(heldout.labels[held], heldout_predicted[held], num_classes))

    def by_em(folder: np.ndarray, held: np.ndarray) -> np.ndarray:
        labels = heldout.labels[held]
        temperature = fit_temperature(heldout.logits[held], labels)
        priors = np.bincount(labels, minlength=num_classes) / len(labels)
        return em_prior_shift(temperature_scaled(folder_logits[folder], temperature), priors)

    return {ADJUSTED_COUNT: by_adjusted_count, EM_PRIOR_SHIFT: by_em}[method]


def corrected_count(folder_logits: np.ndarray, heldout: HeldOutPredictions, class_names: Sequence[str],
                    method: str = ADJUSTED_COUNT, resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                    seed: int = 0) -> list[ClassProportion]:
    """Raw and corrected proportion of every class among a folder's images, with bootstrap intervals.

    folder_logits: (N, K) logits (or log-probabilities) of the folder's N classified images; heldout: the
    held-out split's logits and labels the correction is estimated from; method: ADJUSTED_COUNT or
    EM_PRIOR_SHIFT. The same `seed` gives the same intervals.
    """
    if method not in METHOD_NAMES:
        raise ConfigError(f"the correction method must be one of {', '.join(METHOD_NAMES)}, got {method!r}")
    if not isinstance(resamples, int) or resamples < 1:
        raise ConfigError(f"the number of bootstrap resamples must be an integer >= 1, got {resamples!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"the interval's confidence must be in (0, 1), got {confidence!r}")
    folder_logits = np.asarray(folder_logits, np.float64)
    num_classes = len(class_names)
    if folder_logits.ndim != 2 or folder_logits.shape[1] != num_classes or heldout.logits.shape[1] != num_classes:
        raise DataError(f"need logits of {num_classes} classes, got folder {folder_logits.shape} and held-out "
                        f"{heldout.logits.shape}")
    if len(folder_logits) == 0:
        raise DataError("no classified image to count")
    labels = np.asarray(heldout.labels, np.int64)
    missing = [name for index, name in enumerate(class_names) if not np.any(labels == index)]
    if missing:
        raise DataError(f"the held-out set ({heldout.describe()}) has no example of {', '.join(missing)}")

    estimate = _estimator(method, folder_logits, heldout)
    corrected = estimate(np.arange(len(folder_logits)), np.arange(len(labels)))
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == index) for index in range(num_classes)]
    resampled = np.empty((resamples, num_classes))
    for row in resampled:
        folder = rng.integers(0, len(folder_logits), len(folder_logits))
        held = np.concatenate([indices[rng.integers(0, len(indices), len(indices))] for indices in members])
        row[:] = estimate(folder, held)
    tail = 100 * (1 - confidence) / 2
    lows, highs = np.percentile(resampled, [tail, 100 - tail], axis=0)

    raw_counts = np.bincount(folder_logits.argmax(axis=1), minlength=num_classes)
    return [ClassProportion(name=name, raw_count=int(raw_counts[index]),
                            raw_proportion=float(raw_counts[index] / len(folder_logits)),
                            corrected_proportion=float(corrected[index]),
                            interval=(float(lows[index]), float(highs[index])), confidence=confidence,
                            resamples=resamples, method=METHOD_NAMES[method], heldout=heldout.describe())
            for index, name in enumerate(class_names)]


def format_corrected_count(rows: Sequence[ClassProportion]) -> str:
    """A plain-text table of `corrected_count`'s rows: raw count and share, corrected share, interval."""
    total = sum(row.raw_count for row in rows)
    first = rows[0]
    level = f"{100 * first.confidence:g}% interval"
    width = max([len("class"), len("total")] + [len(row.name) for row in rows])
    lines = [f"Corrected differential count of {total} classified image(s): {first.method},",
             f"estimated from the {first.heldout}; {level}s by bootstrap ({first.resamples} resamples of the "
             "folder and of the held-out set):",
             f"{'class':<{width}}  {'count':>6}  {'raw':>7}  {'corrected':>9}  {level}"]
    for row in rows:
        low, high = row.interval
        lines.append(f"{row.name:<{width}}  {row.raw_count:>6d}  {100 * row.raw_proportion:>6.2f}%  "
                     f"{100 * row.corrected_proportion:>8.2f}%  [{100 * low:.2f}%, {100 * high:.2f}%]")
    lines.append(f"{'total':<{width}}  {total:>6d}  {100.0:>6.2f}%  {100.0:>8.2f}%")
    return "\n".join(lines)
