"""From a class-per-folder directory to the list of examples of each split (what the builder writes).

Steps: scan the class folders; read, hash and decode every candidate once (threads; Pillow, hashlib
and numpy release the GIL), storing its pixels as the model sees them (framed, in the requested variant,
finished: see urnet_jax.data.transforms) -- and, when data.target is not "image", its phase-1 target --
in disk-backed arrays; skip unreadable files with a reason; resolve duplicates and label conflicts; split
into train / val / test (drawn and stratified, or the published split of data.split_dir), before
augmentation; keep the training partition (data.partition); plan the balancing augmentation of the
training split.
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
from urnet_jax.data.enhancement_operators import OPERATORS, emulation_target
from urnet_jax.data.folders import SourceFile, scan_class_files
from urnet_jax.data.images import decode_image, sha256_hex
from urnet_jax.data.split import SPLITS
from urnet_jax.data.stainfree import VARIANTS, apply_variant
from urnet_jax.data.transforms import Framed, finish, frame
from urnet_jax.errors import DataError

TARGETS = ("image", "stained", *OPERATORS)

__all__ = ["SPLITS", "TARGETS", "VARIANTS", "Example", "Plan", "build_plan"]


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
    pixels: np.ndarray  # (num candidate files, S, S, 3) uint8, the decoded originals as the model sees them
    targets: np.ndarray | None  # same shape: their phase-1 targets; None when data.target is "image"
    crop_fallbacks: int  # examples' originals whose cell crop fell back to a centre crop


def prepared_image(data: bytes, digest: str, data_config: Mapping) -> tuple[np.ndarray, Framed]:
    """Encoded image bytes (sha256 `digest`) -> (the uint8 (S, S, 3) image as `prepare` stores it: framed,
    through the variant's imaging condition, finished; the framed image before the variant)."""
    framed = frame(decode_image(data), data_config)
    return finish(apply_variant(framed.image, digest, data_config), data_config), framed


def _decode_into(store: tuple[np.ndarray, np.ndarray | None, np.ndarray], slot: int, source: SourceFile,
                 data_config: Mapping) -> tuple[str | None, str | None]:
    """Decodes one file into the stores' row `slot` -> (sha256, None), or (None, skip reason)."""
    pixels, targets, fallbacks = store
    try:
        data = source.path.read_bytes()
    except OSError as error:
        return None, f"unreadable file ({error.strerror or error})"
    digest = sha256_hex(data)
    try:
        pixels[slot], framed = prepared_image(data, digest, data_config)
    except DataError as error:
        return None, str(error)
    fallbacks[slot] = framed.used_fallback
    target = data_config["target"]
    if target == "stained":
        targets[slot] = finish(framed.image, data_config)
    elif target != "image":
        targets[slot] = emulation_target(pixels[slot], target)
    return digest, None


def _decode_all(files: Sequence[SourceFile], data_config: Mapping, work_dir: pathlib.Path
                ) -> tuple[tuple[np.ndarray, np.ndarray | None, np.ndarray], list[split.DecodedFile],
                           list[split.Skipped]]:
    work_dir.mkdir(parents=True, exist_ok=True)
    size = data_config["image_size"]
    shape = (max(len(files), 1), size, size, 3)
    pixels = np.lib.format.open_memmap(work_dir / "originals.npy", mode="w+", dtype=np.uint8, shape=shape)
    targets = (None if data_config["target"] == "image" else
               np.lib.format.open_memmap(work_dir / "targets.npy", mode="w+", dtype=np.uint8, shape=shape))
    store = (pixels, targets, np.zeros(shape[0], bool))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(tqdm.tqdm(
            pool.map(lambda item: _decode_into(store, item[0], item[1], data_config), enumerate(files)),
            total=len(files), desc="decoding images", unit=" images", disable=None, leave=False))
    decoded, skipped = [], []
    for slot, (source, (digest, reason)) in enumerate(zip(files, results, strict=True)):
        if reason is None:
            decoded.append(split.DecodedFile(source=source, sha256=digest, slot=slot))
        else:
            skipped.append(split.Skipped(str(source.path), reason))
    return store, decoded, skipped


def _split(distinct: Sequence[split.DecodedFile], files: Sequence[SourceFile], root: str | os.PathLike,
           class_names: Sequence[str], data_config: Mapping) -> tuple[dict[str, list[split.DecodedFile]],
                                                                      list[split.Skipped]]:
    """The drawn or published split, with the training split reduced to data.partition."""
    if data_config["split_dir"]:
        splits, not_listed = split.published_split(distinct, files, split.read_split_dir(data_config["split_dir"]),
                                                   root, class_names)
    else:
        splits, not_listed = split.stratified_split(distinct, class_names, data_config["test_fraction"],
                                                    data_config["val_fraction"], data_config["seed"]), []
    splits["train"] = split.partition(splits["train"], data_config["partition"], data_config["seed"])
    for class_name in class_names:
        if not any(f.source.class_name == class_name for f in splits["train"]):
            where = "" if data_config["partition"] == "all" else f" in partition {data_config['partition']!r}"
            raise DataError(f"class '{class_name}' has no training image{where}")
    return splits, not_listed


def build_plan(root: str | os.PathLike, class_folders: Mapping[str, Sequence[str]], data_config: Mapping,
               work_dir: str | os.PathLike) -> Plan:
    """The examples of every split for a validated data config (see urnet_jax.data.prepare)."""
    class_names = tuple(class_folders)
    files = scan_class_files(root, class_folders)
    store, decoded, skipped = _decode_all(files, data_config, pathlib.Path(work_dir))
    distinct, not_distinct = split.resolve_duplicates(decoded)
    skipped += not_distinct
    for class_name in class_names:
        if not any(f.source.class_name == class_name for f in distinct):
            found = sum(f.class_name == class_name for f in files)
            raise DataError(f"class '{class_name}' has no readable image (folders "
                            f"{', '.join(class_folders[class_name])}: {found} image files, all skipped)")
    splits, not_listed = _split(distinct, files, root, class_names, data_config)
    skipped += not_listed

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
    pixels, targets, fallbacks = store
    used_slots = [f.slot for members in splits.values() for f in members]
    return Plan(class_names=class_names,
                examples={"train": train, **{name: [example(f, "identity") for f in splits[name]]
                                             for name in ("val", "test")}},
                skipped=sorted(skipped, key=lambda s: s.path),
                train_originals={name: len(members) for name, members in zip(class_names, by_class)},
                pixels=pixels, targets=targets, crop_fallbacks=int(fallbacks[used_slots].sum()))
