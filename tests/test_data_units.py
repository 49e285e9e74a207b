"""Unit tests of the data layer's pure parts (no TensorFlow): decoding, class maps, split, augmentation,
the stain-free proxy and the synthetic cells."""

from __future__ import annotations

import io
import itertools
import pathlib

import numpy as np
import pytest
from PIL import Image

from urnet_jax.data import augment, split
from urnet_jax.data.folders import SourceFile, resolve_class_folders, scan_class_files
from urnet_jax.data.images import decode_image, is_image_name, load_image
from urnet_jax.data.stainfree import stainfree_proxy
from urnet_jax.data.synthetic import (
    SYNTHETIC_CLASSES,
    render_cell,
    write_synthetic_folders,
)
from urnet_jax.errors import DataError


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _texture(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- decoding


def test_decode_rgb_matches_a_direct_bicubic_resize():
    image = Image.fromarray(_texture(0, 48))
    expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(decode_image(_encode(image, "PNG"), 32), expected)


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 77, (77, 77, 77)),
    ("I;16", 257 * 100, (100, 100, 100)),  # 16-bit: mapped linearly from 0..65535
    ("I;16", 65535, (255, 255, 255)),
    ("1", 1, (255, 255, 255)),
])
def test_decode_grayscale_modes_to_equal_channels(mode, value, expected):
    data = _encode(Image.new(mode, (40, 44), value), "PNG")
    assert Image.open(io.BytesIO(data)).mode == mode  # the file really has that mode
    decoded = decode_image(data, 32)
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.broadcast_to(np.array(expected, np.uint8), (32, 32, 3)))


def test_decode_sixteen_bit_keeps_relative_brightness():
    ramp = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    data = _encode(Image.fromarray(ramp), "PNG")
    decoded = decode_image(data, 40)[..., 0].astype(int)
    np.testing.assert_allclose(decoded, ramp / 257, atol=1)


def test_decode_transparency_is_composited_over_white():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, :20] = (200, 10, 10, 255)  # opaque red on the left, fully transparent black on the right
    decoded = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), 40)
    np.testing.assert_array_equal(decoded[:, :16], np.full((40, 16, 3), (200, 10, 10), np.uint8))
    np.testing.assert_array_equal(decoded[:, 24:], np.full((40, 16, 3), 255, np.uint8))
    la = decode_image(_encode(Image.new("LA", (40, 40), (30, 0)), "PNG"), 32)
    np.testing.assert_array_equal(la, np.full((32, 32, 3), 255, np.uint8))


def test_decode_palette_with_and_without_transparency():
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:, :20] = (10, 120, 240)
    rgb[:, 20:] = (250, 250, 0)
    palette = Image.fromarray(rgb).quantize(colors=4)
    assert palette.mode == "P"
    np.testing.assert_array_equal(decode_image(_encode(palette, "PNG"), 40), rgb)
    index_of_blue = palette.getpixel((0, 0))
    transparent = decode_image(_encode(palette, "PNG", transparency=index_of_blue), 40)
    np.testing.assert_array_equal(transparent[:, :16], np.full((40, 16, 3), 255, np.uint8))
    np.testing.assert_array_equal(transparent[:, 24:], rgb[:, 24:])


def test_decode_cmyk_jpeg_and_float_tiff():
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # red in CMYK
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    decoded = decode_image(data, 32)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded[..., 0].mean() > 200 and decoded[..., 1].mean() < 50
    ramp = np.linspace(-1.0, 3.0, 40 * 40, dtype=np.float32).reshape(40, 40)
    floats = decode_image(_encode(Image.fromarray(ramp, "F"), "TIFF"), 40)[..., 0]
    assert floats.min() == 0 and floats.max() == 255  # 'F' is stretched from its own min..max


def _truncated_jpeg() -> bytes:
    data = _encode(Image.fromarray(_texture(1, 64)), "JPEG", quality=90)
    return data[: len(data) // 2]


def _garbled_png() -> bytes:
    data = bytearray(_encode(Image.fromarray(_texture(2, 64)), "PNG"))
    data[100:400] = bytes(300)  # the compressed pixel data, after a valid header
    return bytes(data)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is a text file, not a picture\n" * 3, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image"),
    (_truncated_jpeg(), "corrupt or truncated image"),
    (_garbled_png(), "corrupt or truncated image"),
])
def test_decode_bad_bytes_gives_a_one_line_reason(data, reason):
    with pytest.raises(DataError, match=f"^{reason}") as error:
        decode_image(data, 32)
    assert "\n" not in str(error.value)


def test_load_image_names_the_file_in_one_line(tmp_path):
    with pytest.raises(DataError, match="cannot read .*missing.png"):
        load_image(tmp_path / "missing.png", 32)
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"zero.jpg: empty file$"):
        load_image(tmp_path / "zero.jpg", 32)


def test_image_names():
    assert is_image_name("a/B.JPG") and is_image_name("x.tiff") and is_image_name("c.png")
    assert not is_image_name(".hidden.jpg") and not is_image_name("notes.txt") and not is_image_name("jpg")


# --------------------------------------------------------------------------------------- class folders


def _make_folders(root: pathlib.Path, layout: dict[str, int]) -> None:
    """root/<folder>/img<i>.png for each folder and count (tiny distinct PNGs)."""
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(_texture(hash((folder, i)) % 2**32, 8)).save(root / folder / f"img{i}.png")


def test_class_map_wbc3_is_case_insensitive_and_merges_granulocytes(tmp_path):
    _make_folders(tmp_path, {"Neutrophil": 2, "EOSINOPHIL": 1, "monocyte": 1, "Lymphocyte": 1, "splits": 0})
    folders = resolve_class_folders(tmp_path, "wbc3")
    assert folders == {"granulocyte": ("Neutrophil", "EOSINOPHIL"), "monocyte": ("monocyte",),
                       "lymphocyte": ("Lymphocyte",)}
    files = scan_class_files(tmp_path, folders)
    assert [f.class_name for f in files].count("granulocyte") == 3
    assert {f.source_folder for f in files if f.class_name == "granulocyte"} == {"Neutrophil", "EOSINOPHIL"}


def test_class_map_folders_skips_folders_without_images(tmp_path):
    _make_folders(tmp_path, {"beta": 1, "Alpha": 2, "empty": 0, ".cache": 3})
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert resolve_class_folders(tmp_path, "folders") == {"Alpha": ("Alpha",), "beta": ("beta",)}


def test_class_map_dict(tmp_path):
    _make_folders(tmp_path, {"foo": 1, "Bar": 1, "baz": 1})
    folders = resolve_class_folders(tmp_path, {"a": ["FOO", "bar"], "b": "baz"})
    assert folders == {"a": ("foo", "Bar"), "b": ("baz",)}


def test_scan_ignores_hidden_and_non_image_files(tmp_path):
    _make_folders(tmp_path, {"a": 2, "b": 1})
    (tmp_path / "a" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "a" / "readme.txt").write_text("x")
    (tmp_path / "a" / "noextension").write_bytes(b"x")
    (tmp_path / "a" / ".thumbnails").mkdir()
    (tmp_path / "a" / ".thumbnails" / "t.png").write_bytes(b"x")
    (tmp_path / "a" / "nested").mkdir()
    (tmp_path / "a" / "nested" / "deep.JPG").write_bytes(b"x")
    files = scan_class_files(tmp_path, resolve_class_folders(tmp_path, "folders"))
    assert sorted(f.path.relative_to(tmp_path).as_posix() for f in files) == [
        "a/img0.png", "a/img1.png", "a/nested/deep.JPG", "b/img0.png"]


@pytest.mark.parametrize("layout, class_map, message", [
    ({"a": 1}, "folders", "need at least two classes, found 1"),
    ({"neutrophil": 1, "lymphocyte": 1}, "wbc3", "class 'monocyte' needs one of the folders monocyte"),
    ({"a": 1, "b": 1}, {"x": "a", "y": ["b", "c"]}, "folder 'c' of class 'y' not found"),
    ({"a": 1, "b": 1}, {"x": "a", "y": "A"}, "folder 'A' is mapped to both 'x' and 'y'"),
    ({"a": 1, "b": 1}, {"x": ["a", "b"]}, "need at least two classes, found 1"),
    ({"a": 1, "b": 1}, "classes", "class_map must be 'wbc3', 'folders' or a dict"),
])
def test_class_map_errors(tmp_path, layout, class_map, message):
    _make_folders(tmp_path, layout)
    with pytest.raises(DataError, match=message):
        resolve_class_folders(tmp_path, class_map)


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        resolve_class_folders(tmp_path / "nope", "wbc3")


# ------------------------------------------------------------------------------------------------ split


def _decoded(class_name: str, name: str, sha: str, slot: int) -> split.DecodedFile:
    source = SourceFile(pathlib.Path(f"/d/{class_name}/{name}"), class_name, class_name)
    return split.DecodedFile(source, sha, slot)


def _population(sizes: dict[str, int]) -> list[split.DecodedFile]:
    pairs = [(class_name, i) for class_name, size in sizes.items() for i in range(size)]
    return [_decoded(class_name, f"{i}.png", f"{slot:064x}", slot) for slot, (class_name, i) in enumerate(pairs)]


def test_duplicates_are_grouped_and_label_conflicts_reported():
    files = [_decoded("a", "1.png", "1" * 64, 0), _decoded("a", "0.png", "1" * 64, 1),  # duplicate within a
             _decoded("a", "2.png", "2" * 64, 2), _decoded("b", "3.png", "2" * 64, 3),  # same image in a and b
             _decoded("b", "4.png", "4" * 64, 4)]
    kept, skipped = split.resolve_duplicates(files)
    assert [f.source.path.name for f in kept] == ["0.png", "4.png"]  # the first path of a duplicate group is kept
    reasons = {pathlib.Path(s.path).name: s.reason for s in skipped}
    assert reasons["1.png"] == "duplicate: same bytes as /d/a/0.png"
    assert reasons["2.png"].startswith("label conflict") and reasons["3.png"].startswith("label conflict")
    assert "/d/a/2.png (a)" in reasons["3.png"] and "/d/b/3.png (b)" in reasons["3.png"]


def test_stratified_split_counts_and_determinism():
    files = _population({"a": 50, "b": 20, "c": 11, "d": 2, "e": 1})
    names = ("a", "b", "c", "d", "e")
    first = split.stratified_split(files, names, 0.2, val_fraction=0.0, seed=3)
    test_counts = {n: sum(f.source.class_name == n for f in first["test"]) for n in names}
    assert test_counts == {"a": 10, "b": 4, "c": 2, "d": 1, "e": 0}
    assert len(first["train"]) + len(first["test"]) == len(files) and not first["val"]
    assert not {f.sha256 for f in first["train"]} & {f.sha256 for f in first["test"]}
    assert split.stratified_split(files[::-1], names, 0.2, 0.0, seed=3) == first  # independent of the input order
    other = split.stratified_split(files, names, 0.2, 0.0, seed=4)
    assert {f.sha256 for f in other["test"]} != {f.sha256 for f in first["test"]}


# ---------------------------------------------------------------------------------------- augmentation


def test_dihedral_variants_are_the_eight_distinct_symmetries():
    image = _texture(5, 6)
    variants = {name: augment.apply_augmentation(image, name) for name in augment.DIHEDRAL}
    np.testing.assert_array_equal(variants["identity"], image)
    np.testing.assert_array_equal(variants["rot90"], np.rot90(image))
    np.testing.assert_array_equal(variants["antitranspose"], np.rot90(image, 2).transpose(1, 0, 2))
    for first, second in itertools.combinations(augment.DIHEDRAL, 2):
        assert not np.array_equal(variants[first], variants[second]), (first, second)
    symmetries = {np.rot90(flipped, k).tobytes() for flipped in (image, image[::-1]) for k in range(4)}
    assert {v.tobytes() for v in variants.values()} == symmetries


@pytest.mark.parametrize("originals, train_size, expected", [
    ([10, 2, 3], 30, [10, 10, 10]),
    ([10, 2, 3], 100, [60, 16, 24]),  # the small classes are capped at 8 variants per original
    ([10, 2, 3], 5, [10, 2, 3]),  # originals are never dropped
    ([10, 2, 3], 1000, [80, 16, 24]),
    ([3, 3, 3], 10, [4, 3, 3]),
    ([6131, 1136, 971], 10000, [6131, 1935, 1934]),  # about the PBC training split
])
def test_class_totals_balance_as_far_as_variants_allow(originals, train_size, expected):
    assert augment.class_totals(originals, train_size) == expected


def test_choose_variants():
    shas = [f"{i:064x}" for i in range(5)]
    chosen = augment.choose_variants(shas, 17, seed=0, class_index=1)
    assert sum(map(len, chosen)) == 17 and sorted(map(len, chosen)) == [3, 3, 3, 4, 4]
    assert all(names[0] == "identity" and len(set(names)) == len(names) for names in chosen)
    assert augment.choose_variants(shas, 17, seed=0, class_index=1) == chosen
    assert augment.choose_variants(shas, 17, seed=1, class_index=1) != chosen
    assert [len(v) for v in augment.choose_variants(shas, 40, seed=0, class_index=0)] == [8] * 5


# ---------------------------------------------------------------------------------------- stain-free


def test_stainfree_proxy_is_deterministic_gray_and_low_contrast():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32:] = 255  # black | white: full contrast
    proxy = stainfree_proxy(image, "ab" * 32)
    assert proxy.dtype == np.uint8 and proxy.shape == image.shape
    assert np.array_equal(proxy[..., 0], proxy[..., 1]) and np.array_equal(proxy[..., 1], proxy[..., 2])
    np.testing.assert_array_equal(stainfree_proxy(image, "ab" * 32), proxy)
    assert not np.array_equal(stainfree_proxy(image, "cd" * 32), proxy)
    gray = proxy[..., 0].astype(float) / 255
    step = gray[8:-8, 40:56].mean() - gray[8:-8, 8:24].mean()  # away from the blurred edge
    assert 0.15 * 0.8 < step < 0.35 * 1.2  # contrast 15-35 %, times the illumination (+-15 %)


def test_stainfree_proxy_of_a_stained_cell_loses_colour_and_most_contrast():
    y, x = np.mgrid[:64, :64]
    nucleus = (y - 32) ** 2 + (x - 32) ** 2 < 12**2
    image = np.where(nucleus[..., None], np.array([100, 50, 150], np.uint8), np.array([235, 225, 230], np.uint8))
    proxy = stainfree_proxy(image.astype(np.uint8), "01" * 32).astype(float)
    assert np.array_equal(proxy[..., 0], proxy[..., 2])
    luminance = image.astype(float) @ [0.299, 0.587, 0.114]
    ring = ((y - 32) ** 2 + (x - 32) ** 2 > 20**2) & ((y - 32) ** 2 + (x - 32) ** 2 < 28**2)
    core = (y - 32) ** 2 + (x - 32) ** 2 < 8**2
    raw_step = luminance[ring].mean() - luminance[core].mean()
    proxy_step = proxy[..., 0][ring].mean() - proxy[..., 0][core].mean()
    assert 0.1 * raw_step < proxy_step < 0.45 * raw_step


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_folders_are_deterministic(tmp_path):
    write_synthetic_folders(tmp_path / "a", per_class=3, image_size=40, seed=0)
    write_synthetic_folders(tmp_path / "b", per_class=3, image_size=40, seed=0)
    write_synthetic_folders(tmp_path / "c", per_class=3, image_size=40, seed=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 9 and {f.parts[0] for f in files} == set(SYNTHETIC_CLASSES)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert all((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
    image = load_image(tmp_path / "a" / files[0], 40)
    assert image.shape == (40, 40, 3)


def _cell_and_nucleus_area(image: np.ndarray) -> tuple[float, float]:
    """Fractions of the image darker than the background by > 5 (cell) and > 20 (nucleus) gray levels.

    The background (with its illumination ramp) is a plane fitted to the 4-pixel border.
    """
    gray = image.mean(axis=-1)
    size = gray.shape[0]
    y, x = np.mgrid[:size, :size]
    border = np.minimum(np.minimum(x, y), np.minimum(size - 1 - x, size - 1 - y)) < 4
    design = np.stack([np.ones(border.sum()), x[border], y[border]], axis=1)
    plane, *_ = np.linalg.lstsq(design, gray[border], rcond=None)
    darker = plane[0] + plane[1] * x + plane[2] * y - gray
    return float((darker > 5).mean()), float((darker > 20).mean())


def test_synthetic_cells_are_low_contrast_and_differ_by_class():
    for kind in SYNTHETIC_CLASSES:
        gray = render_cell(kind, 96, np.random.default_rng(1)).mean(axis=-1)
        assert gray.max() - gray.min() < 110  # low contrast: well under half of the 0..255 range
    areas = {kind: np.array([_cell_and_nucleus_area(render_cell(kind, 96, np.random.default_rng([seed, 7])))
                             for seed in range(20)]) for kind in SYNTHETIC_CLASSES}
    nucleus_share = {kind: a[:, 1] / a[:, 0] for kind, a in areas.items()}
    # lymphocytes: the nucleus fills most of the cell; granulocytes: small lobes; monocytes: a large nucleus
    others = np.concatenate([nucleus_share["granulocyte"], nucleus_share["monocyte"]])
    assert nucleus_share["lymphocyte"].min() > others.max()
    assert areas["granulocyte"][:, 1].max() < areas["monocyte"][:, 1].min()
