"""Duplicates, label conflicts and the stratified train/test split (made before any augmentation).

Byte-identical files (same sha256) are grouped before splitting:
- within one class, the first file (by path) is kept and the others are skipped as
  'duplicate: same bytes as <kept path>', so identical images can never straddle the split;
- across classes, every copy is skipped as 'label conflict: ...' (the true class is unknown).
The split is stratified: in every class test_fraction * n images (rounded half up) go to the test split (at
least one when the class has two or more, and never the last one: every class keeps a training image), chosen by a
permutation seeded with (seed, class index) over the images sorted by sha256, so the split depends
only on the image contents, the classes and the seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from urnet_jax.data.folders import SourceFile


@dataclasses.dataclass(frozen=True)
class DecodedFile:
    """A readable source file: its sha256 and the row of its decoded pixels in the plan's pixel store."""

    source: SourceFile
    sha256: str
    slot: int


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def resolve_duplicates(files: Sequence[DecodedFile]) -> tuple[list[DecodedFile], list[Skipped]]:
    """-> (one file per distinct image, in slot order; skipped duplicates and label conflicts)."""
    groups: dict[str, list[DecodedFile]] = {}
    for decoded in files:
        groups.setdefault(decoded.sha256, []).append(decoded)
    kept: list[DecodedFile] = []
    skipped: list[Skipped] = []
    for group in groups.values():
        group = sorted(group, key=lambda f: str(f.source.path))
        classes = sorted({f.source.class_name for f in group})
        if len(classes) > 1:
            where = ", ".join(f"{f.source.path} ({f.source.class_name})" for f in group)
            reason = f"label conflict: identical images in {where}"
            skipped.extend(Skipped(str(f.source.path), reason) for f in group)
            continue
        kept.append(group[0])
        skipped.extend(Skipped(str(f.source.path), f"duplicate: same bytes as {group[0].source.path}")
                       for f in group[1:])
    return sorted(kept, key=lambda f: f.slot), skipped


def stratified_split(files: Sequence[DecodedFile], class_names: Sequence[str], test_fraction: float,
                     seed: int) -> dict[str, list[DecodedFile]]:
    """Distinct images -> {'train': [...], 'test': [...]}, each sorted by (class order, path)."""
    splits: dict[str, list[DecodedFile]] = {"train": [], "test": []}
    for class_index, class_name in enumerate(class_names):
        members = sorted((f for f in files if f.source.class_name == class_name), key=lambda f: f.sha256)
        count = len(members)
        num_test = min(max(int(test_fraction * count + 0.5), 1 if count >= 2 else 0), count - 1)
        permutation = np.random.default_rng([seed, class_index]).permutation(count)
        test_rows = set(permutation[:num_test].tolist())
        for row, member in enumerate(members):
            splits["test" if row in test_rows else "train"].append(member)
    for split in splits.values():
        split.sort(key=lambda f: (class_names.index(f.source.class_name), str(f.source.path)))
    return splits
