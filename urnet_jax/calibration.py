"""Calibrated class probabilities: temperature scaling, expected calibration error, reliability diagrams.

Temperature scaling (Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks", ICML
2017) divides every logit by one scalar T > 0 fitted on held-out data by minimising the negative
log-likelihood; the predicted class (the argmax) does not change, only the confidence. T > 1 softens an
over-confident model.

The expected calibration error (Guo et al. 2017, eq. 3) groups the n held-out predictions by their
confidence (the largest probability) into M equal-width bins B_m = ((m - 1) / M, m / M] and averages the
gap between accuracy and mean confidence, weighted by the bin's share:

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|

Softmax is invariant to adding a constant to every logit of a row, so log-probabilities can stand in for
logits everywhere here (`log_probabilities`).

The held-out predictions a calibration is fitted on, and the fitted calibration, are stored in the run's
directory (`heldout_predictions.npz`, `calibration.json`), where prediction and export read them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first.
import numpy as np  # noqa: E402
from scipy import optimize, special  # noqa: E402

from urnet_jax.errors import ConfigError, DataError  # noqa: E402

CALIBRATION_FILE = "calibration.json"
HELDOUT_FILE = "heldout_predictions.npz"
DEFAULT_BINS = 15
# The search interval of the temperature: wide enough for any trained network (Guo et al. report T in
# about [1, 4]); the bounded search is deterministic.
TEMPERATURE_RANGE = (0.05, 20.0)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """log p (N, K) float64, with zeros clipped to the smallest float32 (softmax underflow): usable as
    logits, since softmax(log p / T) = softmax(z / T) for p = softmax(z)."""
    return np.log(np.maximum(np.asarray(probabilities, np.float64), np.finfo(np.float32).tiny))


def temperature_scaled(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) (N, K) float64 for logits (N, K)."""
    return special.softmax(np.asarray(logits, np.float64) / temperature, axis=-1)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / T)[label] (nats) over N examples; logits (N, K), labels (N,) int."""
    scaled = np.asarray(logits, np.float64) / temperature
    labels = np.asarray(labels, np.int64)
    picked = scaled[np.arange(len(labels)), labels]
    return float(np.mean(special.logsumexp(scaled, axis=-1) - picked))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising `negative_log_likelihood(logits, labels, T)` within TEMPERATURE_RANGE.

    The NLL is convex in 1 / T, hence unimodal in log T: a bounded scalar search (Brent) over log T
    finds the minimum deterministically. logits (N, K) with N >= 1, labels (N,) int.
    """
    logits, labels = _checked(logits, labels)
    result = optimize.minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
        bounds=tuple(math.log(t) for t in TEMPERATURE_RANGE), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


@dataclasses.dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin statistics of confidence against accuracy; bins of equal width over [0, 1].

    edges (M + 1,); counts (M,) int; accuracy and confidence (M,) in [0, 1], NaN for empty bins.
    """

    edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def expected_calibration_error(self) -> float:
        """sum over non-empty bins of |B_m| / n * |acc - conf| (0 for no examples)."""
        total = self.counts.sum()
        if total == 0:
            return 0.0
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(self.counts[filled] / total * gaps))


def reliability_diagram(probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS
                        ) -> ReliabilityDiagram:
    """Bins the N predictions (probabilities (N, K), labels (N,) int) by confidence into `bins` equal-width
    bins ((m - 1) / M, m / M]."""
    if not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"the number of calibration bins must be an integer >= 1, got {bins!r}")
    probabilities, labels = _checked(probabilities, labels, allow_empty=True)
    confidence = probabilities.max(axis=-1)
    correct = (probabilities.argmax(axis=-1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
    return ReliabilityDiagram(np.linspace(0.0, 1.0, bins + 1), counts, accuracy, mean_confidence)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """ECE (Guo et al. 2017) of probabilities (N, K) for labels (N,) with `bins` equal-width bins, in [0, 1]."""
    return reliability_diagram(probabilities, labels, bins).expected_calibration_error


def plot_reliability_diagrams(diagrams: Mapping[str, ReliabilityDiagram], path: str | pathlib.Path) -> None:
    """One panel per diagram (titled by its key, e.g. "before" / "after"): accuracy per confidence bin
    against the diagonal of perfect calibration, with the bin's share of the examples; writes a PNG."""
    figure, axes = plt.subplots(1, len(diagrams), figsize=(4.2 * len(diagrams), 4.4), squeeze=False,
                                layout="constrained")
    for axis, (title, diagram) in zip(axes[0], diagrams.items()):
        width = np.diff(diagram.edges)
        left = diagram.edges[:-1]
        filled = diagram.counts > 0
        axis.bar(left[filled], diagram.accuracy[filled], width=width[filled], align="edge",
                 edgecolor="black", color="tab:blue", label="accuracy")
        axis.bar(left[filled], (diagram.confidence - diagram.accuracy)[filled], bottom=diagram.accuracy[filled],
                 width=width[filled], align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
        axis.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        share = diagram.counts / max(diagram.counts.sum(), 1)
        axis.step(diagram.edges, np.append(share, share[-1]), where="post", color="grey", linewidth=1,
                  label="share of examples")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence (largest probability)")
        axis.set_ylabel("accuracy")
        axis.set_title(f"{title}: ECE {100 * diagram.expected_calibration_error:.2f}%")
        axis.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


@dataclasses.dataclass(frozen=True)
class HeldOutPredictions:
    """A held-out split's logits (N, K) and true labels (N,), with the split's name and the checkpoint
    ('best' or 'latest') that produced them."""

    split: str
    checkpoint: str
    logits: np.ndarray
    labels: np.ndarray

    def describe(self) -> str:
        """E.g. "validation split, 1712 images (checkpoint 'best')"."""
        return f"{self.split} split, {len(self.labels)} images (checkpoint {self.checkpoint!r})"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it did on the held-out split it was fitted on (ECE in [0, 1], NLL
    in nats per image)."""

    temperature: float
    split: str
    checkpoint: str
    n: int
    bins: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float


def calibrate(heldout: HeldOutPredictions, bins: int = DEFAULT_BINS) -> Calibration:
    """Fits the temperature on `heldout` and measures ECE and NLL before (T = 1) and after."""
    temperature = fit_temperature(heldout.logits, heldout.labels)
    return Calibration(
        temperature=temperature, split=heldout.split, checkpoint=heldout.checkpoint, n=len(heldout.labels),
        bins=bins,
        ece_before=expected_calibration_error(temperature_scaled(heldout.logits), heldout.labels, bins),
        ece_after=expected_calibration_error(temperature_scaled(heldout.logits, temperature), heldout.labels, bins),
        nll_before=negative_log_likelihood(heldout.logits, heldout.labels),
        nll_after=negative_log_likelihood(heldout.logits, heldout.labels, temperature))


def write_calibration(workdir: str | pathlib.Path, calibration: Calibration) -> pathlib.Path:
    """Writes `calibration` to <workdir>/calibration.json (atomically); returns the path."""
    path = pathlib.Path(workdir) / CALIBRATION_FILE
    _write_atomically(path, lambda handle: handle.write(
        json.dumps(dataclasses.asdict(calibration), indent=2).encode() + b"\n"))
    return path


def read_calibration(workdir: str | pathlib.Path) -> Calibration:
    """The calibration stored in <workdir>/calibration.json; ConfigError (one line) when there is none."""
    path = pathlib.Path(workdir) / CALIBRATION_FILE
    if not path.is_file():
        raise ConfigError(f"{workdir} has no {CALIBRATION_FILE}: the run is not calibrated (evaluate it first)")
    try:
        return Calibration(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path} is damaged: {error}") from None


def write_heldout(workdir: str | pathlib.Path, heldout: HeldOutPredictions) -> pathlib.Path:
    """Writes `heldout` to <workdir>/heldout_predictions.npz (atomically); returns the path."""
    path = pathlib.Path(workdir) / HELDOUT_FILE
    _write_atomically(path, lambda handle: np.savez(
        handle, split=heldout.split, checkpoint=heldout.checkpoint,
        logits=np.asarray(heldout.logits, np.float32), labels=np.asarray(heldout.labels, np.int64)))
    return path


def read_heldout(workdir: str | pathlib.Path) -> HeldOutPredictions:
    """The held-out predictions stored in the run's directory; ConfigError (one line) when there are none."""
    path = pathlib.Path(workdir) / HELDOUT_FILE
    if not path.is_file():
        raise ConfigError(f"{workdir} has no {HELDOUT_FILE}: no held-out predictions to correct the count "
                          "with (evaluate the run first)")
    try:
        with np.load(path) as stored:
            return HeldOutPredictions(split=str(stored["split"]), checkpoint=str(stored["checkpoint"]),
                                      logits=stored["logits"], labels=stored["labels"])
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"{path} is damaged: {' '.join(str(error).split())}") from None


def _write_atomically(path: pathlib.Path, write: Callable[[BinaryIO], Any]) -> None:
    """Calls write(binary handle) on a temporary file next to `path`, then renames it to `path`."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        os.chmod(temporary, 0o644)  # mkstemp's files are private to the user
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _checked(scores: np.ndarray, labels: np.ndarray, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.int64)
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise DataError(f"need scores (N, K) and labels (N,), got shapes {scores.shape} and {labels.shape}")
    if not allow_empty and len(labels) == 0:
        raise DataError("no held-out examples to calibrate on")
    if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise DataError(f"labels must lie in [0, {scores.shape[1]}), got [{labels.min()}, {labels.max()}]")
    return scores, labels
