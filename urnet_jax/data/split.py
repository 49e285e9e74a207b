"""Duplicates, label conflicts, the train/validation/test split and the training partitions (all made
before any augmentation).

Byte-identical files (same sha256) are grouped before splitting:
- within one class, the first file (by path) is kept and the others are skipped as
  'duplicate: same bytes as <kept path>', so identical images can never straddle the split;
- across classes, every copy is skipped as 'label conflict: ...' (the true class is unknown).
The split is stratified: in every class test_fraction * n images (rounded half up) go to the test split (at
least one when the class has two or more, and never the last one: every class keeps a training image), then
val_fraction * n (rounded half up; at least one when the fraction is above 0 and two images remain, never the
last training image) to the validation split, chosen by a permutation seeded with (seed, class index) over the
images sorted by sha256 (test takes its first positions, validation the next), so the split depends only on
the image contents, the classes and the seed, and the test split does not depend on val_fraction.

A published split (`read_split_dir`, `published_split`) replaces the drawn one: a folder holding one
`*train.csv`, one `*val.csv` and one `*test.csv` in the WBCAtt format (a column `path` =
`<archive root>/<class folder>/<file>`). A listed file is matched by its class folder (case-insensitively)
and file name; every distinct image lands in the split that lists it, files listed nowhere are skipped
('not in the split files'), and a file listed twice, or listed but absent from the data folder, is an error.

Partitions (`partition`): "a" and "b" are complementary halves of the training split, stratified by source
folder (so by class too): in each folder, the images sorted by sha256 and permuted with a generator seeded by
(seed, the folder's name), "a" takes the first ceil(n / 2). Because they depend on the source folder and not
on the class map, a 5-class run on "a" and a 3-class run on "b" of the same split never share an image.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from urnet_jax.data.folders import SourceFile
from urnet_jax.errors import DataError

SPLITS = ("train", "val", "test")
PARTITIONS = ("all", "a", "b")
NOT_LISTED = "not in the split files"


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


def _rounded(fraction: float, count: int) -> int:
    return int(fraction * count + 0.5)


def stratified_split(files: Sequence[DecodedFile], class_names: Sequence[str], test_fraction: float,
                     val_fraction: float, seed: int) -> dict[str, list[DecodedFile]]:
    """Distinct images -> {'train': [...], 'val': [...], 'test': [...]}, each sorted by (class order, path)."""
    splits: dict[str, list[DecodedFile]] = {name: [] for name in SPLITS}
    for class_index, class_name in enumerate(class_names):
        members = sorted((f for f in files if f.source.class_name == class_name), key=lambda f: f.sha256)
        count = len(members)
        num_test = min(max(_rounded(test_fraction, count), 1 if count >= 2 else 0), count - 1)
        remaining = count - num_test
        num_val = min(max(_rounded(val_fraction, count), 1 if val_fraction > 0 and remaining >= 2 else 0),
                      remaining - 1)
        permutation = np.random.default_rng([seed, class_index]).permutation(count)
        side = np.full(count, "train", dtype=object)
        side[permutation[:num_test]] = "test"
        side[permutation[num_test:num_test + num_val]] = "val"
        for member, name in zip(members, side, strict=True):
            splits[name].append(member)
    return _sorted_splits(splits, class_names)


def _sorted_splits(splits: dict[str, list[DecodedFile]], class_names: Sequence[str]) -> dict[str, list[DecodedFile]]:
    for members in splits.values():
        members.sort(key=lambda f: (class_names.index(f.source.class_name), str(f.source.path)))
    return splits


def _listing_key(folder: str, name: str) -> tuple[str, str]:
    return folder.lower(), name


def read_split_dir(split_dir: str | os.PathLike) -> dict[tuple[str, str], str]:
    """The published split in split_dir -> {(class folder lower-cased, file name): split}.

    Raises DataError (one line) for a missing folder, a missing or ambiguous split file, a file without a
    `path` column, a path without a class folder, or a file listed twice.
    """
    split_dir = pathlib.Path(split_dir).expanduser()
    if not split_dir.is_dir():
        raise DataError(f"data.split_dir not found: {split_dir}")
    listed: dict[tuple[str, str], str] = {}
    for split in SPLITS:
        matches = sorted(split_dir.glob(f"*{split}.csv"))
        if len(matches) != 1:
            raise DataError(f"data.split_dir {split_dir} needs exactly one file matching *{split}.csv, "
                            f"found {len(matches)}")
        path = matches[0]
        try:
            with open(path, newline="") as file:
                reader = csv.DictReader(file)
                if "path" not in (reader.fieldnames or ()):
                    raise DataError(f"split file {path} has no 'path' column")
                for line, row in enumerate(reader, start=2):
                    parts = pathlib.PurePosixPath((row["path"] or "").replace("\\", "/")).parts
                    if len(parts) < 2:
                        raise DataError(f"split file {path} line {line}: path {row['path']!r} is not "
                                        "<class folder>/<file>")
                    key = _listing_key(parts[-2], parts[-1])
                    if key in listed:
                        raise DataError(f"split file {path} line {line}: {parts[-2]}/{parts[-1]} is already "
                                        f"listed in the {listed[key]} split")
                    listed[key] = split
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise DataError(f"cannot read split file {path}: {error}") from None
    return listed


def published_split(files: Sequence[DecodedFile], scanned: Sequence[SourceFile], listed: Mapping[tuple[str, str], str],
                    root: str | os.PathLike, class_names: Sequence[str]) -> tuple[dict[str, list[DecodedFile]],
                                                                                    list[Skipped]]:
    """Distinct images -> (the splits of `read_split_dir`'s listing, the distinct images listed nowhere).

    `scanned` is every candidate file of the mapped classes. A listed file that is not among them must
    still exist under root (a folder the class map leaves out); otherwise DataError.
    """
    known = {_listing_key(f.source_folder, f.path.name) for f in scanned}
    root = pathlib.Path(root)
    folders = {entry.name.lower(): entry.name for entry in os.scandir(root) if entry.is_dir()}
    for folder, name in listed:
        if (folder, name) not in known and not (folder in folders and (root / folders[folder] / name).is_file()):
            raise DataError(f"data.split_dir lists {folder}/{name}, which is not in {root}")
    splits: dict[str, list[DecodedFile]] = {name: [] for name in SPLITS}
    skipped = []
    for decoded in files:
        split = listed.get(_listing_key(decoded.source.source_folder, decoded.source.path.name))
        if split is None:
            skipped.append(Skipped(str(decoded.source.path), NOT_LISTED))
        else:
            splits[split].append(decoded)
    return _sorted_splits(splits, class_names), skipped


def partition(train: Sequence[DecodedFile], part: str, seed: int) -> list[DecodedFile]:
    """The training images of partition `part` ('all', 'a' or 'b'; see the module docstring), in input order."""
    if part == "all":
        return list(train)
    by_folder: dict[str, list[DecodedFile]] = {}
    for decoded in train:
        by_folder.setdefault(decoded.source.source_folder.lower(), []).append(decoded)
    in_a: set[str] = set()
    for folder, members in by_folder.items():
        members = sorted(members, key=lambda f: f.sha256)
        folder_seed = int.from_bytes(hashlib.sha256(folder.encode()).digest()[:8], "little")
        order = np.random.default_rng([seed, folder_seed]).permutation(len(members))
        in_a.update(members[row].sha256 for row in order[: (len(members) + 1) // 2])
    return [f for f in train if (f.sha256 in in_a) == (part == "a")]
