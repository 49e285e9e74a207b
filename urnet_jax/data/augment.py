"""Offline, class-balancing augmentation of the training split (never of the test split).

The variants of an original are the 8 symmetries of the square (the dihedral group): identity,
rotations by 90/180/270 degrees, horizontal and vertical flips, transpose and anti-transpose. They are
exact (no interpolation, no invented border pixels), so each original has exactly 8 distinct
variants; small-angle rotations are not used because they need interpolation and a fill for the
corners. The paper's "flips and rotations by several angles" are covered by these.

Class totals (`class_totals`): every original is kept once (real data is never dropped); then the
training set is filled up to `train_size` images in total as evenly as possible (the most balanced
allocation: t_c = clip(level, n_c, 8 n_c) for the largest level that fits), where a class can grow to at
most 8x its originals, "as far as the distinct variants of each original allow". When the
originals alone exceed train_size there is no augmentation. Within a class every original gets
floor(t_c / n_c) variants and a seeded choice of originals one more; an original's variants are the
identity first, then the other 7 in an order seeded by (seed, its sha256).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DIHEDRAL = ("identity", "rot90", "rot180", "rot270", "flip_horizontal", "flip_vertical", "transpose",
            "antitranspose")
VARIANTS_PER_ORIGINAL = len(DIHEDRAL)


def apply_augmentation(image: np.ndarray, name: str) -> np.ndarray:
    """(H, W, C) -> the named dihedral variant (H, W, C) (rotations counter-clockwise)."""
    if name == "identity":
        return image
    if name.startswith("rot"):
        return np.rot90(image, int(name[3:]) // 90)
    if name == "flip_horizontal":
        return image[:, ::-1]
    if name == "flip_vertical":
        return image[::-1]
    if name == "transpose":
        return image.transpose(1, 0, 2)
    if name == "antitranspose":
        return image[::-1, ::-1].transpose(1, 0, 2)
    raise ValueError(f"unknown augmentation {name!r}")


def class_totals(originals: Sequence[int], train_size: int) -> list[int]:
    """Training images per class, given the originals per class and the requested total (see module doc)."""
    low = np.asarray(originals, dtype=np.int64)
    high = low * VARIANTS_PER_ORIGINAL
    target = int(np.clip(train_size, low.sum(), high.sum()))

    def total(level: int) -> int:
        return int(np.clip(level, low, high).sum())

    lo, hi = 0, int(high.max())  # largest level with total(level) <= target, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= target else (lo, mid - 1)
    totals = np.clip(lo, low, high)
    at_level = np.flatnonzero((totals == lo) & (totals < high))
    totals[at_level[: target - int(totals.sum())]] += 1  # the remainder: one more each for the first classes
    return totals.tolist()


def choose_variants(sha256s: Sequence[str], total: int, seed: int, class_index: int) -> list[tuple[str, ...]]:
    """For each original of one class (given by its sha256), the names of its variants, `total` in all.

    Requires len(sha256s) <= total <= 8 len(sha256s).
    """
    num_originals = len(sha256s)
    base, extra = divmod(total, num_originals)
    counts = np.full(num_originals, base)
    counts[np.random.default_rng([seed, class_index, total]).permutation(num_originals)[:extra]] += 1
    chosen = []
    for sha256, count in zip(sha256s, counts, strict=True):
        order = np.random.default_rng([seed, int(sha256, 16)]).permutation(np.arange(1, VARIANTS_PER_ORIGINAL))
        chosen.append(tuple(DIHEDRAL[i] for i in (0, *order.tolist())[:count]))
    return chosen
