"""`prepare`: build (or reuse) a prepared data set in out_dir; `load_info` and `read_manifest` read it.

Layout of out_dir:
- prepared.json: the identity of the data set (the data config less its location and training-only keys,
  resolved source folders, a digest of the source file listing: relative path, size, mtime, and a digest
  of the split files of data.split_dir) and its summary; written last, so its presence means the data
  set is complete;
- manifest.csv: one row per example: split, index (record number in that split), path (absolute),
  sha256, label (class name), label_id, source_folder, augmentation;
- skipped.csv: path, reason for every candidate image file left out;
- tfds/: the tensorflow-datasets data set (see tfds_builder.py), splits 'train', 'val', 'test';
- synthetic_source/: the generated PNG folders, when config.data.dir is empty.
`prepare` reuses out_dir when prepared.json has the same identity and rebuilds otherwise (deleting only
the entries above).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping

from absl import logging as absl_logging

from urnet_jax.config import base_config
from urnet_jax.data.color import COLOUR_NORMALISATIONS
from urnet_jax.data.folders import resolve_class_folders, scan_class_files
from urnet_jax.data.online import ONLINE_KEYS
from urnet_jax.data.plan import SPLITS, TARGETS, VARIANTS
from urnet_jax.data.split import PARTITIONS, read_split_dir
from urnet_jax.data.synthetic import write_synthetic_folders
from urnet_jax.data.tf_runtime import import_tfds
from urnet_jax.data.transforms import CROPS, PREPROCESSINGS
from urnet_jax.errors import DataError

FORMAT_VERSION = 2  # bump when a code change alters what `prepare` writes, so old data sets are rebuilt
MANIFEST_COLUMNS = ("split", "index", "path", "sha256", "label", "label_id", "source_folder", "augmentation")
_OUTPUTS = ("prepared.json", "manifest.csv", "skipped.csv", "tfds", "synthetic_source", ".work")
# Not what the data set holds, so not part of its identity: where to write, whether synthetic data may stand
# in, where the split files are (their contents are), and the augmentations applied when training reads it.
_NOT_CONTENT_KEYS = ("prepared_dir", "allow_synthetic", "split_dir", *ONLINE_KEYS)


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
    """What `prepare` built: classes, examples per split and class, and the files it skipped."""

    out_dir: str
    source: str  # the image folder, or "synthetic"
    class_names: tuple[str, ...]
    image_size: int
    variant: str
    counts: dict[str, dict[str, int]]  # split ('train', 'val', 'test') -> class -> examples (train: augmented)
    train_originals: dict[str, int]  # class -> distinct training images before augmentation
    skipped: dict[str, int]  # reason (text before the first ':') -> files
    crop: str = "none"  # data.crop
    crop_fallbacks: int = 0  # with crop "cell": images in which no cell was found (centre crop used)
    reused: bool = False

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def format(self) -> str:
        """A human-readable table of per-class, per-split counts and the skipped files."""
        source = "the synthetic data set" if self.source == "synthetic" else self.source
        lines = [("reused" if self.reused else "prepared") + f" {self.out_dir} from {source} "
                 f"({self.image_size}x{self.image_size} px, variant {self.variant})"]
        width = max(len(name) for name in (*self.class_names, "total"))
        header = f"{'class':<{width}}  {'train originals':>15}  {'train':>7}  {'val':>6}  {'test':>6}"
        lines += [header, "-" * len(header)]
        rows = [(name, self.train_originals[name], *(self.counts[split][name] for split in SPLITS))
                for name in self.class_names]
        rows.append(("total", *(sum(row[i] for row in rows) for i in (1, 2, 3, 4))))
        lines += [f"{name:<{width}}  {originals:>15}  {train:>7}  {val:>6}  {test:>6}"
                  for name, originals, train, val, test in rows]
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        lines.append(f"skipped {self.num_skipped} files" + (f" ({reasons}; see skipped.csv)" if reasons else ""))
        if self.crop == "cell":
            lines.append(f"cell crop: no cell found in {self.crop_fallbacks} images (centre crop used)")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PreparedInfo:
    """What the readers need to know about a prepared data set."""

    class_names: tuple[str, ...]
    image_size: int
    num_examples: dict[str, int]  # split ('train', 'val', 'test') -> examples ('val' may be 0)
    variant: str
    target: str  # data.target: "image" (no target in the batches) or what batch["target"] holds
    tfds_dir: pathlib.Path  # the tensorflow-datasets data directory (dataset_info.json, ArrayRecord files)
    summary: PrepareSummary


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DataError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_range(value, low_bound: float) -> bool:
    """A (low, high) pair of numbers with low_bound <= low <= high."""
    return (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_number, value))
            and low_bound <= value[0] <= value[1])


def _one_of(config: dict, key: str, choices) -> None:
    _check(config[key] in choices, f"data.{key} must be one of {', '.join(choices)}, got {config[key]!r}")


def validate_data_config(data_config) -> dict:
    """`config.data` (ConfigDict or mapping) -> a plain dict with every key, checked; raises DataError."""
    values = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
    defaults = base_config().data.to_dict()
    unknown = sorted(set(values) - set(defaults))
    _check(not unknown, f"unknown config key data.{unknown[0] if unknown else ''}")
    config = {**defaults, **values}
    _check(isinstance(config["dir"], str), "data.dir must be a path (string)")
    class_map = config["class_map"]
    _check(class_map in ("wbc3", "folders") or isinstance(class_map, Mapping),
           f"data.class_map must be 'wbc3', 'folders' or a dict class -> folders, got {class_map!r}")
    if isinstance(class_map, Mapping):
        config["class_map"] = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in class_map.items()}
    _check(_is_int(config["image_size"]) and config["image_size"] >= 8, "data.image_size must be an integer >= 8")
    _check(_is_number(config["test_fraction"]) and 0 < config["test_fraction"] < 1,
           "data.test_fraction must be between 0 and 1 (exclusive)")
    _check(_is_number(config["val_fraction"]) and 0 <= config["val_fraction"] < 1
           and config["test_fraction"] + config["val_fraction"] < 1,
           "data.val_fraction must be >= 0, with data.test_fraction + data.val_fraction < 1")
    _check(isinstance(config["split_dir"], str), "data.split_dir must be a path (string)")
    _one_of(config, "partition", PARTITIONS)
    _one_of(config, "target", TARGETS)
    _one_of(config, "crop", CROPS)
    _check(_is_number(config["crop_scale"]) and config["crop_scale"] > 0, "data.crop_scale must be > 0")
    _one_of(config, "preprocessing", PREPROCESSINGS)
    _check(_is_number(config["clahe_clip_limit"]) and 0 < config["clahe_clip_limit"] <= 1,
           "data.clahe_clip_limit must be in (0, 1]")
    _check(_is_int(config["clahe_kernel_size"]) and config["clahe_kernel_size"] >= 0,
           "data.clahe_kernel_size must be an integer >= 0 (0: 1/8 of the image side)")
    _one_of(config, "color_norm", tuple(COLOUR_NORMALISATIONS))
    for key in ("grayscale", "online_augment", "color_jitter"):
        _check(isinstance(config[key], bool), f"data.{key} must be True or False")
    _check(config["random_scale"] in ((), []) or (_is_range(config["random_scale"], 0) and config["random_scale"][0] > 0),
           f"data.random_scale must be () or (low, high) with 0 < low <= high, got {config['random_scale']!r}")
    _check(_is_number(config["stain_augment"]) and 0 <= config["stain_augment"] < 1,
           "data.stain_augment must be in [0, 1) (0: off)")
    for key, low_bound in (("severe_contrast", 0), ("severe_blur_sigma", 0), ("severe_noise_std", 0)):
        _check(_is_range(config[key], low_bound), f"data.{key} must be a (low, high) pair with 0 <= low <= high")
    _check(_is_int(config["seed"]) and config["seed"] >= 0, "data.seed must be an integer >= 0")
    _check(_is_int(config["train_size"]) and config["train_size"] >= 0, "data.train_size must be an integer >= 0")
    _one_of(config, "variant", VARIANTS)
    _check(_is_int(config["synthetic_per_class"]) and config["synthetic_per_class"] >= 2,
           "data.synthetic_per_class must be an integer >= 2")
    return config


def _listing_digest(root: pathlib.Path, class_folders: Mapping) -> str:
    """sha256 of every candidate file's relative path, size and modification time."""
    digest = hashlib.sha256()
    for source in scan_class_files(root, class_folders):
        stat = source.path.stat()
        digest.update(f"{source.path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _split_files_digest(split_dir: str) -> str | None:
    """sha256 of the split files' names and contents (None without data.split_dir); DataError when unreadable."""
    if not split_dir:
        return None
    read_split_dir(split_dir)  # a bad split folder fails here, before any work
    digest = hashlib.sha256()
    for path in (next(pathlib.Path(split_dir).expanduser().glob(f"*{split}.csv")) for split in SPLITS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _read_state(out_dir: pathlib.Path) -> dict | None:
    try:
        return json.loads((out_dir / "prepared.json").read_text())
    except (OSError, ValueError):
        return None


def _summary_from_json(values: dict, reused: bool) -> PrepareSummary:
    return PrepareSummary(**{**values, "class_names": tuple(values["class_names"]), "reused": reused})


def _write_csv(path: pathlib.Path, columns, rows) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows(rows)


def _build(root: pathlib.Path, class_folders: dict, config: dict, out_dir: pathlib.Path):
    """Runs the tensorflow-datasets builder -> (its plan, its data directory)."""
    from urnet_jax.data.tfds_builder import (
        WbcFolders,  # imports TensorFlow: only when building
    )

    tfds = import_tfds()
    download_config = tfds.download.DownloadConfig(manual_dir=root,
                                                   compute_stats=tfds.download.ComputeStatsMode.SKIP)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS warns that our BuilderConfig is not a registered one
    try:
        builder = WbcFolders(data_config=config, class_folders=class_folders, data_dir=out_dir / "tfds",
                             file_format="array_record")
        with contextlib.redirect_stdout(io.StringIO()):  # tensorflow-datasets prints its own progress messages
            builder.download_and_prepare(download_dir=out_dir / ".work", download_config=download_config)
    finally:
        absl_logging.set_verbosity(verbosity)
    return builder.plan, pathlib.Path(builder.data_dir)


def prepare(data_config, out_dir: str | os.PathLike) -> PrepareSummary:
    """Builds the data set described by `config.data` in out_dir, or reuses it if already built from it.

    Writes out_dir/manifest.csv, out_dir/skipped.csv and the tensorflow-datasets files (see the module
    docstring). Raises DataError (one line) for a bad config or unusable data: missing directory, fewer
    than two classes, a class without a readable image (or without a training image in its partition),
    a class_map naming a missing folder, a bad, missing or inconsistent split file in data.split_dir or
    one listing a file that is not in data.dir. Processes
    preparing the same out_dir at once take turns (out_dir/.prepare.lock): the first builds, the rest reuse.
    """
    config = validate_data_config(data_config)
    out_dir = pathlib.Path(out_dir).expanduser().resolve()
    if config["dir"]:
        root = pathlib.Path(config["dir"]).expanduser().resolve()
        class_folders = resolve_class_folders(root, config["class_map"])
        source, listing = str(root), _listing_digest(root, class_folders)
    else:
        root, class_folders, source, listing = out_dir / "synthetic_source", None, "synthetic", None
    content_config = {key: value for key, value in config.items() if key not in _NOT_CONTENT_KEYS}
    identity = json.loads(json.dumps({  # as it reads back from prepared.json (tuples become lists)
        "format": FORMAT_VERSION, "data": {**content_config, "dir": source}, "listing": listing,
        "split_files": _split_files_digest(config["split_dir"])}))
    with exclusive_lock(out_dir / ".prepare.lock"):
        state = _read_state(out_dir)
        if state and state.get("identity") == identity and (out_dir / state.get("tfds_dir", "-")).is_dir():
            return _summary_from_json(state["summary"], reused=True)
        return _build_outputs(root, class_folders, config, source, identity, out_dir)


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive lock on the file lock_path (created if missing) for the `with` block.

    Processes that write the same directory (two study runs started side by side, say) take turns: the
    later ones wait, then find and reuse what the first built instead of deleting it under its feet. The
    OS releases the lock if its holder dies. Keep lock_path outside anything the block deletes.
    """
    lock_path = pathlib.Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_outputs(root: pathlib.Path, class_folders: dict | None, config: dict, source: str, identity: dict,
                   out_dir: pathlib.Path) -> PrepareSummary:
    """Deletes out_dir's previous outputs, builds the data set and writes manifest, skips and state."""
    for name in _OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if class_folders is None:
        write_synthetic_folders(root, config["synthetic_per_class"], config["image_size"], config["seed"])
        class_folders = resolve_class_folders(root, config["class_map"])
    try:
        plan, tfds_dir = _build(root, class_folders, config, out_dir)
    finally:
        shutil.rmtree(out_dir / ".work", ignore_errors=True)

    manifest_rows = [(split, index, e.path, e.sha256, e.class_name, e.label_id, e.source_folder, e.augmentation)
                     for split in SPLITS for index, e in enumerate(plan.examples[split])]
    _write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS, manifest_rows)
    _write_csv(out_dir / "skipped.csv", ("path", "reason"), [(s.path, s.reason) for s in plan.skipped])
    skipped: dict[str, int] = {}
    for entry in plan.skipped:
        reason = entry.reason.split(":")[0].split(" (")[0]
        skipped[reason] = skipped.get(reason, 0) + 1
    summary = PrepareSummary(
        out_dir=str(out_dir), source=source, class_names=plan.class_names, image_size=config["image_size"],
        variant=config["variant"],
        counts={split: {name: sum(e.class_name == name for e in plan.examples[split]) for name in plan.class_names}
                for split in SPLITS},
        train_originals=plan.train_originals, skipped=skipped, crop=config["crop"],
        crop_fallbacks=plan.crop_fallbacks)
    state = {"identity": identity, "tfds_dir": str(tfds_dir.relative_to(out_dir)),
             "summary": dataclasses.asdict(summary)}
    (out_dir / "prepared.json.tmp").write_text(json.dumps(state, indent=1))
    os.replace(out_dir / "prepared.json.tmp", out_dir / "prepared.json")
    return summary


def load_info(out_dir: str | os.PathLike) -> PreparedInfo:
    """Classes, image size and examples per split of the data set prepared in out_dir (DataError if none)."""
    out_dir = pathlib.Path(out_dir).expanduser().resolve()
    state = _read_state(out_dir)
    if state is None:
        raise DataError(f"no prepared data set in {out_dir} (run: python -m urnet_jax.data prepare --config ... "
                        f"--out {out_dir})")
    if state.get("identity", {}).get("format") != FORMAT_VERSION:
        raise DataError(f"the data set in {out_dir} was prepared by another version of urnet_jax.data: "
                        "run prepare again")
    summary = _summary_from_json(state["summary"], reused=True)
    return PreparedInfo(class_names=summary.class_names, image_size=summary.image_size,
                        num_examples={split: sum(summary.counts[split].values()) for split in SPLITS},
                        variant=summary.variant, target=state["identity"]["data"]["target"],
                        tfds_dir=out_dir / state["tfds_dir"], summary=summary)


def read_manifest(out_dir: str | os.PathLike, split: str) -> list[dict]:
    """The manifest rows of one split, in record order (row i = example i of eval_batches' 'index').

    Each row: split, index, path, sha256, label (class name), label_id (int), source_folder, augmentation.
    """
    _check(split in SPLITS, f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    path = pathlib.Path(out_dir).expanduser().resolve() / "manifest.csv"
    try:
        with open(path, newline="") as file:
            rows = [row for row in csv.DictReader(file) if row["split"] == split]
    except OSError:
        raise DataError(f"no manifest at {path}: prepare the data set first") from None
    return [{**row, "index": int(row["index"]), "label_id": int(row["label_id"])} for row in rows]
