"""End-to-end tests of the data layer: prepare (TFDS builder, manifest, skips, split, augmentation,
variants, reuse), the training/evaluation readers, the command line and a real PBC subset."""

from __future__ import annotations

import collections
import csv
import io
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from urnet_jax.config import base_config
from urnet_jax.data import (
    DataError,
    eval_batches,
    load_image,
    load_info,
    prepare,
    read_manifest,
    stainfree_proxy,
    steps_per_epoch,
    train_batches,
)
from urnet_jax.data.augment import apply_augmentation, class_totals
from urnet_jax.data.prepare import exclusive_lock

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO_ROOT / "configs" / "urnet.py")
SIZE = 32


def _cell_image(seed: int, size: int = 44) -> Image.Image:
    """A distinct small picture: a smooth random colour field (so JPEG and resizing behave normally)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def _write(path: pathlib.Path, image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _make_tree(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """A wbc3-style tree with good images of several modes plus every kind of bad file; returns the bad ones."""
    counts = {"neutrophil": 9, "eosinophil": 5, "monocyte": 6, "lymphocyte": 8}
    seed = 0
    for folder, count in counts.items():
        for i in range(count):
            seed += 1
            image = _cell_image(seed)
            if i == 1:
                _write(root / folder / f"{folder}_{i}.jpg", image, "JPEG")
            elif i == 2:
                _write(root / folder / f"{folder}_{i}.png", image.convert("L"))
            elif i == 3:
                _write(root / folder / f"{folder}_{i}.png", image.convert("RGBA"))
            elif i == 4:
                _write(root / folder / f"{folder}_{i}.png", image.quantize(16))
            else:
                _write(root / folder / f"{folder}_{i}.png", image)
    bad = {"empty": root / "neutrophil" / "empty.jpg", "text": root / "monocyte" / "notes.png",
           "truncated": root / "lymphocyte" / "cut.jpg", "duplicate": root / "neutrophil" / "zz_copy.png",
           "conflict_a": root / "eosinophil" / "same.png", "conflict_b": root / "monocyte" / "same.png"}
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("not an image at all")
    jpeg = _write(root / "scratch" / "full.jpg", _cell_image(999, 64), "JPEG")
    bad["truncated"].write_bytes(jpeg[: len(jpeg) // 2])
    bad["duplicate"].write_bytes((root / "neutrophil" / "neutrophil_0.png").read_bytes())
    _write(bad["conflict_a"], _cell_image(1234))
    _write(bad["conflict_b"], _cell_image(1234))
    (root / "lymphocyte" / "readme.txt").write_text("ignored")
    (root / "lymphocyte" / ".hidden.png").write_bytes(b"ignored")
    (root / "lymphocyte" / "noextension").write_bytes(b"ignored")
    return bad


def _data_config(data_dir: pathlib.Path | str = "", **overrides):
    data = base_config().data
    data.dir = str(data_dir)
    data.image_size = SIZE
    data.train_size = 100
    data.test_fraction = 0.25
    data.val_fraction = 0.0  # the three-way split has its own tests (test_data_splits.py)
    data.synthetic_per_class = 8
    for key, value in overrides.items():
        setattr(data, key, value)
    return data


def _read_csv(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[pathlib.Path, dict[str, pathlib.Path]]:
    root = tmp_path_factory.mktemp("tree")
    return root, _make_tree(root)


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(_data_config(tree[0]), out)
    return out


def test_prepare_reports_every_bad_file_and_ignores_non_images(tree, prepared):
    root, bad = tree
    info = load_info(prepared)
    assert info.class_names == ("granulocyte", "monocyte", "lymphocyte") and info.image_size == SIZE
    assert info.summary.skipped == {"empty file": 1, "not an image": 1, "corrupt or truncated image": 1,
                                    "duplicate": 1, "label conflict": 2}
    skipped = {row["path"]: row["reason"] for row in _read_csv(prepared / "skipped.csv")}
    assert skipped[str(bad["empty"])] == "empty file"
    assert skipped[str(bad["text"])].startswith("not an image")
    assert skipped[str(bad["truncated"])].startswith("corrupt or truncated image")
    assert skipped[str(bad["duplicate"])] == f"duplicate: same bytes as {root / 'neutrophil' / 'neutrophil_0.png'}"
    assert skipped[str(bad["conflict_a"])].startswith("label conflict")
    assert skipped[str(bad["conflict_b"])].startswith("label conflict")
    assert len(skipped) == 6
    manifest = _read_csv(prepared / "manifest.csv")
    listed = {row["path"] for row in manifest} | set(skipped)
    assert not any(name in path for path in listed for name in ("readme.txt", ".hidden", "noextension", "scratch"))
    assert {row["path"] for row in manifest} | set(skipped) == {
        str(p) for p in root.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg")
        and not p.name.startswith(".") and p.parent.name != "scratch"}


def test_prepare_split_is_stratified_leak_free_and_only_train_is_augmented(prepared):
    manifest = _read_csv(prepared / "manifest.csv")
    assert list(manifest[0]) == ["split", "index", "path", "sha256", "label", "label_id", "source_folder",
                                 "augmentation"]
    train = [row for row in manifest if row["split"] == "train"]
    test = [row for row in manifest if row["split"] == "test"]
    assert {row["augmentation"] for row in test} == {"identity"}
    assert not {row["sha256"] for row in train} & {row["sha256"] for row in test}
    originals = collections.Counter(row["label"] for row in train if row["augmentation"] == "identity")
    # readable distinct images without conflicts: 14 granulocytes, 6 monocytes, 8 lymphocytes; 25 % to test
    assert originals + collections.Counter(row["label"] for row in test) == {
        "granulocyte": 14, "monocyte": 6, "lymphocyte": 8}
    assert collections.Counter(row["label"] for row in test) == {"granulocyte": 4, "monocyte": 2, "lymphocyte": 2}
    totals = collections.Counter(row["label"] for row in train)
    assert [totals[c] for c in ("granulocyte", "monocyte", "lymphocyte")] == class_totals([10, 4, 6], 100) == [
        34, 32, 34]
    assert len({(row["sha256"], row["augmentation"]) for row in train}) == len(train)  # distinct variants
    assert [int(row["index"]) for row in train] == list(range(len(train)))
    assert load_info(prepared).num_examples == {"train": 100, "val": 0, "test": 8}


def test_records_hold_the_decoded_images_in_manifest_order(prepared):
    rows = read_manifest(prepared, "test")
    seen = []
    for batch in eval_batches(prepared, "test", batch_size=4):
        for image, label, valid, index in zip(batch["image"], batch["label"], batch["mask"], batch["index"]):
            if valid:
                row = rows[index]
                np.testing.assert_array_equal(image, load_image(row["path"], SIZE))
                assert label == row["label_id"]
                seen.append(int(index))
    assert seen == list(range(len(rows)))
    train_rows = read_manifest(prepared, "train")
    batch = next(train_batches(prepared, batch_size=10, seed=0, epoch=0))
    order = np.random.default_rng([0, 0]).permutation(len(train_rows))[:10]
    for image, label, index in zip(batch["image"], batch["label"], order):
        row = train_rows[index]
        expected = apply_augmentation(load_image(row["path"], SIZE), row["augmentation"])
        np.testing.assert_array_equal(image, expected)
        assert label == row["label_id"]


def test_prepare_is_deterministic_reuses_and_rebuilds(tree, prepared, tmp_path):
    root, _ = tree
    again = prepare(_data_config(root), prepared)
    assert again.reused and again.counts == load_info(prepared).summary.counts
    fresh = tmp_path / "fresh"
    assert not prepare(_data_config(root), fresh).reused
    assert (fresh / "manifest.csv").read_bytes() == (prepared / "manifest.csv").read_bytes()
    reseeded = prepare(_data_config(root, seed=1), fresh)
    assert not reseeded.reused
    test_paths = lambda out: {row["path"] for row in read_manifest(out, "test")}  # noqa: E731
    assert test_paths(fresh) != test_paths(prepared)
    _write(root / "lymphocyte" / "new.png", _cell_image(4321))  # a new source file: rebuild
    try:
        assert not prepare(_data_config(root, seed=1), fresh).reused
        assert load_info(fresh).summary.train_originals["lymphocyte"] == reseeded.train_originals["lymphocyte"] + 1
    finally:
        (root / "lymphocyte" / "new.png").unlink()


def test_prepare_waits_while_another_process_prepares_then_reuses(tree, prepared):
    """Two preparations of one directory take turns: the second blocks on the lock, then reuses."""
    results = {}
    waiting = threading.Thread(target=lambda: results.update(summary=prepare(_data_config(tree[0]), prepared)))
    with exclusive_lock(prepared / ".prepare.lock"):  # another process preparing
        waiting.start()
        waiting.join(timeout=2.0)
        assert waiting.is_alive() and not results
    waiting.join(timeout=120)
    assert results["summary"].reused


def test_reading_batches_does_not_import_tensorflow(prepared):
    """Training and evaluation read without TensorFlow (absent on the GPU machines, and never near the GPU)."""
    code = ("import sys; from urnet_jax.data import eval_batches, train_batches; "
            f"batch = next(train_batches({str(prepared)!r}, batch_size=4, seed=0, epoch=0)); "
            f"rows = sum(int(b['mask'].sum()) for b in eval_batches({str(prepared)!r}, 'test', batch_size=4)); "
            "print(batch['image'].shape[0], rows > 0, 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["4", "True", "False"], result.stderr[-2000:]


def test_prepare_without_tensorflow_writes_the_same_records(tree, prepared, tmp_path):
    """Where TensorFlow is not installed (the GPU machines), prepare still works and writes the same data."""
    hide_tensorflow = ("import importlib.machinery as m; find = m.PathFinder.find_spec; "
                       "m.PathFinder.find_spec = staticmethod(lambda name, path=None, target=None: None "
                       "if name.split('.')[0] == 'tensorflow' else find(name, path, target)); ")
    code = hide_tensorflow + (
        "import sys, tests.test_data_prepare as t; from urnet_jax.data import prepare; "
        f"prepare(t._data_config({str(tree[0])!r}), {str(tmp_path)!r}); print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
    for split in ("train", "test"):
        assert read_manifest(tmp_path, split) == read_manifest(prepared, split)
        for with_tf, without_tf in zip(eval_batches(prepared, split, 8), eval_batches(tmp_path, split, 8), strict=True):
            np.testing.assert_array_equal(with_tf["image"], without_tf["image"])
            np.testing.assert_array_equal(with_tf["label"], without_tf["label"])


def test_dict_class_map_assigned_in_a_config(tree, tmp_path):
    config = _data_config(tree[0])
    config.class_map = {"mononuclear": ["Monocyte", "LYMPHOCYTE"], "granulocyte": ["neutrophil", "eosinophil"]}
    summary = prepare(config, tmp_path)
    assert summary.class_names == ("mononuclear", "granulocyte")  # the dict's order
    assert summary.train_originals == {"mononuclear": 10, "granulocyte": 10}
    assert {row["source_folder"] for row in read_manifest(tmp_path, "test")} <= {
        "monocyte", "lymphocyte", "neutrophil", "eosinophil"}


def test_duplicates_never_straddle_the_split(tmp_path):
    for folder in ("a", "b"):
        for i in range(6):
            data = _write(tmp_path / "src" / folder / f"{i}.png", _cell_image(hash((folder, i)) % 2**31))
            for copy in range(2):
                (tmp_path / "src" / folder / f"{i}_copy{copy}.png").write_bytes(data)
    for seed in range(4):
        out = tmp_path / f"out{seed}"
        summary = prepare(_data_config(tmp_path / "src", class_map="folders", seed=seed, test_fraction=0.5), out)
        assert summary.skipped == {"duplicate": 24}
        assert summary.counts["test"] == {"a": 3, "b": 3}
        sides = {}
        for split in ("train", "test"):
            for row in read_manifest(out, split):
                sides.setdefault(row["sha256"], set()).add(split)
        assert len(sides) == 12 and all(len(s) == 1 for s in sides.values())


def test_stainfree_proxy_variant_is_gray_and_matches_the_documented_function(tree, tmp_path):
    out = tmp_path / "proxy"
    prepare(_data_config(tree[0], variant="stainfree_proxy", train_size=0), out)
    assert load_info(out).variant == "stainfree_proxy"
    for split in ("train", "test"):
        rows = read_manifest(out, split)
        for batch in eval_batches(out, split, batch_size=8):
            for image, valid, index in zip(batch["image"], batch["mask"], batch["index"]):
                if valid:
                    row = rows[index]
                    assert np.array_equal(image[..., 0], image[..., 1])
                    expected = stainfree_proxy(load_image(row["path"], SIZE), row["sha256"])
                    np.testing.assert_array_equal(image, apply_augmentation(expected, row["augmentation"]))


def test_synthetic_data_set_when_no_dir_is_given(tmp_path):
    summary = prepare(_data_config("", train_size=60), tmp_path)
    assert summary.source == "synthetic"
    assert summary.class_names == ("granulocyte", "monocyte", "lymphocyte")
    assert summary.counts == {"train": {"granulocyte": 20, "monocyte": 20, "lymphocyte": 20},
                              "val": {"granulocyte": 0, "monocyte": 0, "lymphocyte": 0},
                              "test": {"granulocyte": 2, "monocyte": 2, "lymphocyte": 2}}
    source = str(tmp_path / "synthetic_source")
    assert all(row["path"].startswith(source) for row in read_manifest(tmp_path, "test"))
    assert prepare(_data_config("", train_size=60), tmp_path).reused


@pytest.mark.parametrize("layout, overrides, message", [
    ({"a": 3, "b": 0}, {"class_map": "folders"}, "need at least two classes"),
    ({"a": 3, "b": 2}, {"class_map": {"x": "a", "y": "c"}}, "folder 'c' of class 'y' not found"),
    ({"a": 3, "b": -2}, {"class_map": "folders"}, "class 'b' has no readable image"),
    ({"a": 3, "b": 2}, {"class_map": "folders", "colour": "red"}, "unknown config key data.colour"),
    ({"a": 3, "b": 2}, {"class_map": "folders", "variant": "stained"}, "data.variant must be one of"),
    ({"a": 3, "b": 2}, {"class_map": "folders", "test_fraction": 1.0}, "data.test_fraction must be"),
])
def test_prepare_errors_are_one_line(tmp_path, layout, overrides, message):
    for folder, count in layout.items():
        (tmp_path / "src" / folder).mkdir(parents=True)
        for i in range(abs(count)):
            path = tmp_path / "src" / folder / f"{i}.png"
            path.write_bytes(b"broken") if count < 0 else _write(path, _cell_image(i + 10 * len(folder)))
    config = _data_config(tmp_path / "src").to_dict()
    config.update(overrides)
    with pytest.raises(DataError, match=message) as error:
        prepare(config, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "prepared.json").exists()


def test_missing_directory_and_unprepared_output(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        prepare(_data_config(tmp_path / "nowhere"), tmp_path / "out")
    with pytest.raises(DataError, match="no prepared data set"):
        load_info(tmp_path / "out")


# ------------------------------------------------------------------------------------------- readers


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("synthetic")
    prepare(_data_config("", synthetic_per_class=10, train_size=70), out)
    return out


def _labels_and_images(batches) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(batch["label"], batch["image"]) for batch in batches]


def test_train_batches_are_deterministic_shuffled_per_epoch_and_resumable(synthetic):
    assert steps_per_epoch(synthetic, 8) == 70 // 8
    epoch = list(train_batches(synthetic, 8, seed=5, epoch=2))
    assert len(epoch) == 8
    assert all(b["image"].shape == (8, SIZE, SIZE, 3) and b["image"].dtype == np.uint8 for b in epoch)
    assert all(b["label"].dtype == np.int32 for b in epoch)
    again = list(train_batches(synthetic, 8, seed=5, epoch=2))
    assert all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
               for a, b in zip(epoch, again, strict=True))
    resumed = list(train_batches(synthetic, 8, seed=5, epoch=2, start_step=5))
    assert len(resumed) == 3
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(epoch[5:], resumed, strict=True))
    other_epoch = next(train_batches(synthetic, 8, seed=5, epoch=3))
    other_seed = next(train_batches(synthetic, 8, seed=6, epoch=2))
    assert not np.array_equal(other_epoch["image"], epoch[0]["image"])
    assert not np.array_equal(other_seed["image"], epoch[0]["image"])
    images = np.concatenate([b["image"] for b in epoch]).reshape(64, -1)
    assert len(np.unique(images, axis=0)) == 64  # no example twice in an epoch


def test_process_shards_partition_the_global_batch(synthetic):
    whole = list(train_batches(synthetic, 12, seed=1, epoch=0))
    shards = [list(train_batches(synthetic, 12, seed=1, epoch=0, start_step=1, process_index=p, process_count=3))
              for p in range(3)]
    for step, parts in enumerate(zip(*shards, strict=True), start=1):
        assert all(part["image"].shape[0] == 4 for part in parts)
        np.testing.assert_array_equal(np.concatenate([part["image"] for part in parts]), whole[step]["image"])
        np.testing.assert_array_equal(np.concatenate([part["label"] for part in parts]), whole[step]["label"])


def test_eval_batches_pad_and_cover_every_example_once(synthetic):
    rows = read_manifest(synthetic, "test")
    assert len(rows) == 9
    single = list(eval_batches(synthetic, "test", batch_size=4))
    assert [b["mask"].tolist() for b in single] == [[True] * 4, [True] * 4, [True, False, False, False]]
    assert single[2]["index"].tolist() == [8, -1, -1, -1]
    assert not single[2]["image"][1:].any() and single[2]["image"].shape == (4, SIZE, SIZE, 3)
    assert [b["label"][b["mask"]].tolist() for b in single] == [[r["label_id"] for r in rows[i:i + 4]]
                                                                 for i in (0, 4, 8)]
    sharded = [list(eval_batches(synthetic, "test", batch_size=4, process_index=p, process_count=2))
               for p in (0, 1)]
    assert all(len(shard) == 3 and all(b["image"].shape[0] == 2 for b in shard) for shard in sharded)
    indices = [int(i) for shard in sharded for b in shard for i, m in zip(b["index"], b["mask"]) if m]
    assert sorted(indices) == list(range(9))


@pytest.mark.parametrize("call, message", [
    (lambda out: train_batches(out, 9, 0, 0, process_count=2), "multiple of the process count"),
    (lambda out: train_batches(out, 8, 0, 0, start_step=9), "start_step 9 is not in"),
    (lambda out: train_batches(out, 8, 0, 0, process_index=1), "process_index 1 is not in"),
    (lambda out: steps_per_epoch(out, 71), "batch size 71 must be between 1 and the 70"),
    (lambda out: eval_batches(out, "validation", 4), "unknown split 'validation'"),
])
def test_reader_errors(synthetic, call, message):
    with pytest.raises(DataError, match=message):
        call(synthetic)


# ---------------------------------------------------------------------------------------- command line


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "urnet_jax.data", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_prepare_prints_counts_and_skips(tree, tmp_path):
    result = _run_cli("prepare", "--config", CONFIG, f"--config.data.dir={tree[0]}", "--config.data.image_size=32",
                      "--config.data.train_size=50", "--config.data.test_fraction=0.25", "--config.data.val_fraction=0",
                      "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"prepared {tmp_path} from {tree[0]} (32x32 px, variant raw)")
    assert lines[1].split() == ["class", "train", "originals", "train", "val", "test"]
    assert any(line.split() == ["granulocyte", "10", "17", "0", "4"] for line in lines), result.stdout
    assert any(line.split() == ["total", "20", "50", "0", "8"] for line in lines), result.stdout
    assert ("skipped 6 files (1 corrupt or truncated image, 1 duplicate, 1 empty file, 2 label conflict, "
            "1 not an image; see skipped.csv)") in lines
    assert (tmp_path / "manifest.csv").is_file() and (tmp_path / "skipped.csv").is_file()
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--config.data.dir={missing}"], "error: data directory not found: {missing}"),
    (["--config.data.colour=red"], "error: unknown config key 'data.colour'"),
    (["--config.data.image_size=big"], "error: flag --config.data.image_size=big"),
    (["--config.data.class_map=folders", "--config.data.dir={only_one}"], "error: need at least two classes"),
    (["--config.data.dir={tree}", "--config.data.class_map=unknown"], "error: data.class_map must be"),
    (["--config.data.dir={no_readable}"], "error: class 'lymphocyte' has no readable image"),
    (["--cells_per_class=1"], "error: Unknown command line flag 'cells_per_class'"),
])
def test_cli_errors_are_one_line(tree, tmp_path, extra, message):
    """Config, flag and data problems: one `error:` line, exit status 2."""
    _write(tmp_path / "only_one" / "a" / "x.png", _cell_image(1))
    for folder in ("neutrophil", "monocyte", "lymphocyte"):
        (tmp_path / "no_readable" / folder).mkdir(parents=True)
        (tmp_path / "no_readable" / folder / "x.jpg").write_bytes(b"" if folder == "lymphocyte" else b"x")
        if folder != "lymphocyte":
            _write(tmp_path / "no_readable" / folder / "y.png", _cell_image(len(folder)))
    paths = {"only_one": tmp_path / "only_one", "tree": tree[0], "no_readable": tmp_path / "no_readable",
             "missing": tmp_path / "missing"}
    result = _run_cli("prepare", "--config", CONFIG, *[arg.format(**paths) for arg in extra], "--out",
                      tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith(message.format(**paths)) and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("args, message", [
    (["prepare", "--out", "{tmp}"], "error: --config is required"),
    (["--config", CONFIG, "--out", "{tmp}"], "error: expected one command, prepare or examples (got none)"),
    (["prepare", "--config", "{tmp}/no_config.py", "--out", "{tmp}"],
     "error: config file '{tmp}/no_config.py' not found"),
    (["examples", "--config", CONFIG], "error: --out FIGURE.png is required"),
    (["prepare", "--config", CONFIG, "--out"], "error: Missing value for flag --out"),
])
def test_cli_usage_errors(tmp_path, args, message):
    result = _run_cli(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.returncode == 2
    assert result.stderr.startswith(message.format(tmp=tmp_path)) and result.stderr.count("\n") == 1, result.stderr


def test_cli_examples_figure(tree, tmp_path):
    figure = tmp_path / "figure" / "proxy.png"
    result = _run_cli("examples", "--config", CONFIG, f"--config.data.dir={tree[0]}", "--config.data.image_size=48",
                      "--cells-per-class=1", "--out", figure)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {figure}"
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.width > image.height > 100


# ---------------------------------------------------------------------------------------------- real data


def test_real_pbc_subset(pbc_dir, tmp_path):
    """~20 real PBC files per folder (linked), prepared at 64 px with the wbc3 class map."""
    for folder in ("neutrophil", "eosinophil", "basophil", "monocyte", "lymphocyte"):
        (tmp_path / "pbc" / folder).mkdir(parents=True)
        for path in sorted((pbc_dir / folder).iterdir())[:20]:
            (tmp_path / "pbc" / folder / path.name).symlink_to(path)
    summary = prepare(_data_config(tmp_path / "pbc", image_size=64, train_size=200, test_fraction=0.2),
                      tmp_path / "out")
    assert summary.class_names == ("granulocyte", "monocyte", "lymphocyte")
    assert summary.num_skipped == 0
    assert summary.counts["test"] == {"granulocyte": 12, "monocyte": 4, "lymphocyte": 4}
    assert summary.train_originals == {"granulocyte": 48, "monocyte": 16, "lymphocyte": 16}
    assert summary.counts["train"] == {"granulocyte": 67, "monocyte": 67, "lymphocyte": 66}
    rows = read_manifest(tmp_path / "out", "test")
    batch = next(eval_batches(tmp_path / "out", "test", batch_size=20))
    assert batch["mask"].all() and batch["image"].shape == (20, 64, 64, 3)
    np.testing.assert_array_equal(batch["image"][7], load_image(rows[7]["path"], 64))
    assert batch["image"].std() > 20  # real stained cells: colourful, not blank
