"""The train / validation / test split (drawn and published), the training partitions, and the WBCAtt split
of the real PBC images."""

from __future__ import annotations

import collections
import csv
import hashlib
import pathlib

import numpy as np
import pytest

from tests.test_data_prepare import _cell_image, _data_config, _read_csv, _write
from urnet_jax.data import DataError, prepare, read_manifest
from urnet_jax.data.folders import SourceFile, resolve_class_folders, scan_class_files
from urnet_jax.data.split import (
    DecodedFile,
    partition,
    published_split,
    read_split_dir,
    stratified_split,
)

CLASSES = ("granulocyte", "monocyte", "lymphocyte")


def _decoded(counts: dict[tuple[str, str], int]) -> list[DecodedFile]:
    """Fake distinct images: counts[(class, folder)] files each, with distinct sha256s."""
    files = []
    for (class_name, folder), count in counts.items():
        for i in range(count):
            path = pathlib.Path("/images") / folder / f"{folder}_{i}.png"
            files.append(DecodedFile(SourceFile(path, class_name, folder),
                                     hashlib.sha256(str(path).encode()).hexdigest(), len(files)))
    return files


FILES = _decoded({("granulocyte", "neutrophil"): 30, ("granulocyte", "eosinophil"): 20, ("monocyte", "monocyte"): 21,
                  ("lymphocyte", "lymphocyte"): 3})


def _paths(files) -> set[str]:
    return {str(f.source.path) for f in files}


def test_three_way_split_is_stratified_disjoint_and_covers_every_image():
    splits = stratified_split(FILES, CLASSES, test_fraction=0.2, val_fraction=0.1, seed=3)
    assert set(splits) == {"train", "val", "test"}
    sides = [_paths(splits[name]) for name in ("train", "val", "test")]
    assert sum(map(len, sides)) == len(FILES) and set.union(*sides) == _paths(FILES)
    counts = {name: collections.Counter(f.source.class_name for f in splits[name]) for name in splits}
    # rounded half up; a class of 3 keeps one image in each split
    assert counts["test"] == {"granulocyte": 10, "monocyte": 4, "lymphocyte": 1}
    assert counts["val"] == {"granulocyte": 5, "monocyte": 2, "lymphocyte": 1}
    assert counts["train"] == {"granulocyte": 35, "monocyte": 15, "lymphocyte": 1}
    again = stratified_split(list(reversed(FILES)), CLASSES, 0.2, 0.1, 3)
    assert all(_paths(again[name]) == _paths(splits[name]) for name in splits)
    other_seed = stratified_split(FILES, CLASSES, 0.2, 0.1, 4)
    assert _paths(other_seed["val"]) != _paths(splits["val"])
    # the test split does not depend on the validation fraction; without one, 'val' is empty
    no_val = stratified_split(FILES, CLASSES, 0.2, 0.0, 3)
    assert _paths(no_val["test"]) == _paths(splits["test"]) and not no_val["val"]


def test_partitions_are_complementary_stratified_halves_independent_of_the_class_map():
    train = stratified_split(FILES, CLASSES, 0.2, 0.1, 0)["train"]
    half_a, half_b = partition(train, "a", seed=7), partition(train, "b", seed=7)
    assert not _paths(half_a) & _paths(half_b) and _paths(half_a) | _paths(half_b) == _paths(train)
    assert partition(train, "all", seed=7) == train
    for folder in ("neutrophil", "eosinophil", "monocyte", "lymphocyte"):
        in_a, in_b = (sum(f.source.source_folder == folder for f in half) for half in (half_a, half_b))
        assert in_a - in_b in (0, 1), folder  # each source folder (so each class) halved
    assert _paths(partition(train, "a", seed=8)) != _paths(half_a)
    # a 5-class map (one class per folder) partitions the same images: no image is in both stages
    per_folder = [DecodedFile(SourceFile(f.source.path, f.source.source_folder, f.source.source_folder), f.sha256,
                              f.slot) for f in train]
    assert _paths(partition(per_folder, "a", seed=7)) == _paths(half_a)


def _tree(root: pathlib.Path, per_folder: int = 8) -> None:
    for folder_index, folder in enumerate(("neutrophil", "monocyte", "lymphocyte")):
        for i in range(per_folder):
            _write(root / folder / f"{folder}_{i}.png", _cell_image(100 * folder_index + i))


def _write_split_dir(split_dir: pathlib.Path, listing: dict[str, list[str]], prefix: str = "ARCHIVE") -> None:
    """WBCAtt-style CSVs: img_name, label, path = <prefix>/<folder>/<file>."""
    split_dir.mkdir(parents=True, exist_ok=True)
    for split, paths in listing.items():
        with open(split_dir / f"wbcatt_{split}.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["img_name", "label", "path"])
            writer.writerows([pathlib.PurePath(p).name, p.split("/")[0].title(), f"{prefix}/{p}"] for p in paths)


LISTING = {"train": [f"{f}/{f}_{i}.png" for f in ("neutrophil", "monocyte", "lymphocyte") for i in range(4)],
           "val": ["neutrophil/neutrophil_4.png", "monocyte/monocyte_4.png", "lymphocyte/lymphocyte_4.png"],
           "test": [f"{f}/{f}_{i}.png" for f in ("neutrophil", "monocyte", "lymphocyte") for i in (5, 6)]}


def test_prepare_honours_a_published_split_exactly(tmp_path):
    _tree(tmp_path / "src")
    _write_split_dir(tmp_path / "splits", LISTING)
    summary = prepare(_data_config(tmp_path / "src", split_dir=str(tmp_path / "splits"), train_size=0), tmp_path / "out")
    for split, paths in LISTING.items():
        rows = read_manifest(tmp_path / "out", split)
        assert sorted(row["path"] for row in rows) == sorted(str(tmp_path / "src" / p) for p in paths)
    skipped = {row["path"]: row["reason"] for row in _read_csv(tmp_path / "out" / "skipped.csv")}
    assert skipped == {str(tmp_path / "src" / f / f"{f}_7.png"): "not in the split files"
                       for f in ("neutrophil", "monocyte", "lymphocyte")}
    assert summary.counts["val"] == {"granulocyte": 1, "monocyte": 1, "lymphocyte": 1}
    assert "val" in summary.format().splitlines()[1].split()
    # the split files' contents are part of the data set's identity, their location is not
    moved = tmp_path / "moved"
    (tmp_path / "splits").rename(moved)
    assert prepare(_data_config(tmp_path / "src", split_dir=str(moved), train_size=0), tmp_path / "out").reused
    _write_split_dir(moved, {**LISTING, "val": LISTING["val"][:2]})
    assert not prepare(_data_config(tmp_path / "src", split_dir=str(moved), train_size=0), tmp_path / "out").reused


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "wbcatt_val.csv").unlink(), "needs exactly one file matching *val.csv, found 0"),
    (lambda d: (d / "other_val.csv").write_text("path\n"), "needs exactly one file matching *val.csv, found 2"),
    (lambda d: (d / "wbcatt_test.csv").write_text("img_name,label\nx.png,Monocyte\n"), "has no 'path' column"),
    (lambda d: _write_split_dir(d, {"val": ["monocyte/nowhere.png"]}), "lists monocyte/nowhere.png, which is not in"),
    (lambda d: _write_split_dir(d, {"val": LISTING["test"][:1]}), "is already listed in the"),
    (lambda d: (d / "wbcatt_val.csv").write_text("path\nno_folder.png\n"), "is not <class folder>/<file>"),
    (lambda d: [p.unlink() for p in d.iterdir()] and d.rmdir(), "data.split_dir not found"),
])
def test_bad_split_files_are_one_line_errors(tmp_path, change, message):
    _tree(tmp_path / "src")
    _write_split_dir(tmp_path / "splits", LISTING)
    change(tmp_path / "splits")
    with pytest.raises(DataError, match=message.replace("*", r"\*")) as error:
        prepare(_data_config(tmp_path / "src", split_dir=str(tmp_path / "splits")), tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "prepared.json").exists()


def test_prepared_three_way_split_has_no_leak_even_with_duplicates(tmp_path):
    """Byte-identical copies are grouped before splitting: no image (and no copy of one) in two splits."""
    for folder in ("a", "b"):
        for i in range(10):
            data = _write(tmp_path / "src" / folder / f"{i}.png", _cell_image(hash((folder, i)) % 2**31))
            (tmp_path / "src" / folder / f"{i}_copy.png").write_bytes(data)
    summary = prepare(_data_config(tmp_path / "src", class_map="folders", test_fraction=0.2, val_fraction=0.2,
                                   train_size=0), tmp_path / "out")
    assert summary.skipped == {"duplicate": 20}
    assert summary.counts == {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}}
    sides: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        rows = read_manifest(tmp_path / "out", split)
        assert [row["index"] for row in rows] == list(range(len(rows)))
        for row in rows:
            sides.setdefault(row["sha256"], set()).add(split)
    assert len(sides) == 20 and all(len(s) == 1 for s in sides.values())


def test_prepared_partitions_split_only_the_training_images(tmp_path):
    _tree(tmp_path / "src", per_folder=12)
    manifests = {}
    for part in ("all", "a", "b"):
        prepare(_data_config(tmp_path / "src", val_fraction=0.2, partition=part, train_size=0), tmp_path / part)
        manifests[part] = {split: {row["path"] for row in read_manifest(tmp_path / part, split)}
                           for split in ("train", "val", "test")}
    assert manifests["a"]["train"].isdisjoint(manifests["b"]["train"])
    assert manifests["a"]["train"] | manifests["b"]["train"] == manifests["all"]["train"]
    for split in ("val", "test"):
        assert manifests["a"][split] == manifests["b"][split] == manifests["all"][split]
    sizes = [collections.Counter(pathlib.Path(p).parent.name for p in manifests[part]["train"]) for part in "ab"]
    assert all(abs(sizes[0][folder] - sizes[1][folder]) <= 1 for folder in sizes[0])


def test_wbcatt_split_of_the_real_pbc_images(pbc_dir):
    """The published WBCAtt split, matched against every PBC file (6169 / 1030 / 3099, nothing missing)."""
    listed = read_split_dir(pbc_dir / "splits")
    assert collections.Counter(listed.values()) == {"train": 6169, "val": 1030, "test": 3099}
    class_folders = resolve_class_folders(pbc_dir, "folders")
    scanned = scan_class_files(pbc_dir, class_folders)
    distinct = [DecodedFile(f, hashlib.sha256(str(f.path).encode()).hexdigest(), slot)
                for slot, f in enumerate(scanned)]
    splits, not_listed = published_split(distinct, scanned, listed, pbc_dir, tuple(class_folders))
    assert {name: len(files) for name, files in splits.items()} == {"train": 6169, "val": 1030, "test": 3099}
    assert len(not_listed) == len(scanned) - 10298  # every image of this PBC copy is listed
    for name, files in splits.items():
        assert all(listed[(f.source.source_folder.lower(), f.source.path.name)] == name for f in files)


def test_wbcatt_split_honoured_by_prepare_on_real_pbc_images(pbc_dir, tmp_path):
    """A real-image subset (5 listed files per split and folder) through prepare, with its split files."""
    listed = read_split_dir(pbc_dir / "splits")
    class_folders = resolve_class_folders(pbc_dir, "folders")
    chosen: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for folder in class_folders:
        names = sorted(p.name for p in (pbc_dir / folder).iterdir())
        for split in chosen:
            chosen[split] += [f"{folder}/{n}" for n in [n for n in names if listed.get((folder, n)) == split][:5]]
        for name in [p.split("/")[1] for split in chosen for p in chosen[split] if p.startswith(f"{folder}/")]:
            (tmp_path / "pbc" / folder).mkdir(parents=True, exist_ok=True)
            (tmp_path / "pbc" / folder / name).symlink_to(pbc_dir / folder / name)
    _write_split_dir(tmp_path / "splits", chosen, prefix="PBC_dataset_normal_DIB")
    summary = prepare(_data_config(tmp_path / "pbc", image_size=48, train_size=0,
                                   split_dir=str(tmp_path / "splits")), tmp_path / "out")
    for split, paths in chosen.items():
        assert sorted(row["path"] for row in read_manifest(tmp_path / "out", split)) == sorted(
            str(tmp_path / "pbc" / p) for p in paths), split
    assert summary.skipped == {}
    assert summary.counts["val"] == {"granulocyte": 15, "monocyte": 5, "lymphocyte": 5}
    assert np.asarray([summary.counts["test"][c] for c in CLASSES]).tolist() == [15, 5, 5]
