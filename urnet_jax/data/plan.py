"""From a class-per-folder directory to the list of examples of each split (what the builder writes).

Steps: scan the class folders; read, hash and decode every candidate once (threads; Pillow, hashlib
and numpy release the GIL), storing the resized pixels, already in the requested variant, in a
disk-backed array; skip unreadable files with a reason; resolve duplicates and label conflicts; split
(stratified, before augmentation); plan the balancing augmentation of the training split.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import tqdm

from urnet_jax.data import augment, split
from urnet_jax.errors import DataError
from urnet_jax.data.folders import SourceFile, scan_class_files
from urnet_jax.data.images import decode_image, sha256_hex
from urnet_jax.data.stainfree import stainfree_proxy

SPLITS = ("train", "test")
VARIANTS = ("raw", "stainfree_proxy")


@dataclasses.dataclass(frozen=True)
class Example:
    """One example of a split: a source file, its class, and the augmentation applied to it."""

    path: str
    sha256: str
    class_name: str
    label_id: int
    source_folder: str
    augmentation: str
    slot: int  # row of the decoded original in Plan.pixels


@dataclasses.dataclass
class Plan:
    class_names: tuple[str, ...]
    examples: dict[str, list[Example]]  # split -> examples, in record order
    skipped: list[split.Skipped]
    train_originals: dict[str, int]  # class -> distinct training images before augmentation
    pixels: np.ndarray  # (num candidate files, S, S, 3) uint8, the decoded originals in the variant


def _decode_into(pixels: np.ndarray, slot: int, source: SourceFile, image_size: int,
                 variant: str) -> tuple[str | None, str | None]:
    """Decodes one file into pixels[slot] -> (sha256, None), or (None, skip reason)."""
    try:
        data = source.path.read_bytes()
    except OSError as error:
        return None, f"unreadable file ({error.strerror or error})"
    digest = sha256_hex(data)
    try:
        image = decode_image(data, image_size)
    except DataError as error:
        return None, str(error)
    pixels[slot] = stainfree_proxy(image, digest) if variant == "stainfree_proxy" else image
    return digest, None


def _decode_all(files: Sequence[SourceFile], image_size: int, variant: str,
                work_dir: pathlib.Path) -> tuple[np.ndarray, list[split.DecodedFile], list[split.Skipped]]:
    work_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.lib.format.open_memmap(work_dir / "originals.npy", mode="w+", dtype=np.uint8,
                                       shape=(max(len(files), 1), image_size, image_size, 3))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(tqdm.tqdm(
            pool.map(lambda item: _decode_into(pixels, item[0], item[1], image_size, variant), enumerate(files)),
            total=len(files), desc="decoding images", unit=" images", disable=None, leave=False))
    decoded, skipped = [], []
    for slot, (source, (digest, reason)) in enumerate(zip(files, results, strict=True)):
        if reason is None:
            decoded.append(split.DecodedFile(source=source, sha256=digest, slot=slot))
        else:
            skipped.append(split.Skipped(str(source.path), reason))
    return pixels, decoded, skipped


def build_plan(root: str | os.PathLike, class_folders: Mapping[str, Sequence[str]], data_config: Mapping,
               work_dir: str | os.PathLike) -> Plan:
    """The examples of every split for a validated data config (see urnet_jax.data.prepare)."""
    class_names = tuple(class_folders)
    files = scan_class_files(root, class_folders)
    pixels, decoded, skipped = _decode_all(files, data_config["image_size"], data_config["variant"],
                                           pathlib.Path(work_dir))
    distinct, not_distinct = split.resolve_duplicates(decoded)
    skipped += not_distinct
    for class_name in class_names:
        if not any(f.source.class_name == class_name for f in distinct):
            found = sum(f.class_name == class_name for f in files)
            raise DataError(f"class '{class_name}' has no readable image (folders "
                            f"{', '.join(class_folders[class_name])}: {found} image files, all skipped)")
    splits = split.stratified_split(distinct, class_names, data_config["test_fraction"], data_config["seed"])

    def example(decoded_file: split.DecodedFile, augmentation: str) -> Example:
        source = decoded_file.source
        return Example(path=str(source.path), sha256=decoded_file.sha256, class_name=source.class_name,
                       label_id=class_names.index(source.class_name), source_folder=source.source_folder,
                       augmentation=augmentation, slot=decoded_file.slot)

    by_class = [[f for f in splits["train"] if f.source.class_name == name] for name in class_names]
    totals = augment.class_totals([len(members) for members in by_class], data_config["train_size"])
    train = []
    for class_index, (members, total) in enumerate(zip(by_class, totals, strict=True)):
        variants = augment.choose_variants([f.sha256 for f in members], total, data_config["seed"], class_index)
        train.extend(example(f, name) for f, names in zip(members, variants, strict=True) for name in names)
    return Plan(class_names=class_names,
                examples={"train": train, "test": [example(f, "identity") for f in splits["test"]]},
                skipped=sorted(skipped, key=lambda s: s.path),
                train_originals={name: len(members) for name, members in zip(class_names, by_class)},
                pixels=pixels)
