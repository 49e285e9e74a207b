"""The cell-centred crop on synthetic cells (scales, positions, lobes, two cells, blank) and on real images."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from urnet_jax.data import cell_crop
from urnet_jax.data.images import is_image_name
from urnet_jax.errors import DataError

BACKGROUND = (235, 215, 200)  # pinkish, like a stained smear's background
CYTOPLASM = (205, 180, 215)  # lilac
NUCLEUS = (95, 55, 150)  # dark purple
DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _draw(shape, discs, seed=0):
    """uint8 image of `shape` (rows, cols) with discs (row, col, radius, colour) drawn in order, plus noise."""
    rows, cols = np.mgrid[: shape[0], : shape[1]] + 0.5
    image = np.empty((*shape, 3), np.float64)
    image[...] = BACKGROUND
    for row, col, radius, colour in discs:
        image[np.hypot(rows - row, cols - col) <= radius] = colour
    noise = np.random.default_rng(seed).normal(0, 4, image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def _cell(shape, row, col, nucleus_radius, seed=0):
    return _draw(shape, [(row, col, 1.6 * nucleus_radius, CYTOPLASM), (row, col, nucleus_radius, NUCLEUS)], seed)


def _nucleus_centre_and_diameter(image):
    """Centroid (row, col) and equivalent diameter of the nucleus-coloured pixels of a uint8 image."""
    mask = np.linalg.norm(image.astype(np.float64) - NUCLEUS, axis=-1) < 40
    rows, cols = np.nonzero(mask)
    return rows.mean() + 0.5, cols.mean() + 0.5, np.sqrt(4 * mask.sum() / np.pi)


@pytest.mark.parametrize(("shape", "row", "col", "radius"), [
    ((200, 240), 100.0, 120.0, 12.0),
    ((200, 240), 70.3, 150.8, 25.0),
    ((200, 240), 120.0, 90.0, 40.0),
    ((120, 120), 55.0, 64.0, 30.0),  # the cell filling the frame: the crop reaches past it
    ((363, 360), 190.0, 170.0, 33.0),
])
def test_crop_is_centred_on_the_nucleus_at_a_fixed_relative_scale(shape, row, col, radius):
    image = _cell(shape, row, col, radius)
    location = cell_crop.locate_cell(image)
    assert location is not None
    assert abs(location.centre_row - row) < 1.5 and abs(location.centre_col - col) < 1.5
    assert location.diameter == pytest.approx(2 * radius, rel=0.06)

    crop = cell_crop.cell_crop(image, 96)
    assert not crop.used_fallback and crop.image.shape == (96, 96, 3) and crop.image.dtype == np.uint8
    crop_row, crop_col, crop_diameter = _nucleus_centre_and_diameter(crop.image)
    assert abs(crop_row - 48) < 2 and abs(crop_col - 48) < 2
    assert crop_diameter == pytest.approx(96 / cell_crop.CROP_SCALE, rel=0.08)


def test_the_crop_scale_sets_the_nucleus_size_in_the_crop():
    image = _cell((200, 200), 100, 100, 20)
    wide = _nucleus_centre_and_diameter(cell_crop.cell_crop(image, 96, scale=4.0).image)[2]
    tight = _nucleus_centre_and_diameter(cell_crop.cell_crop(image, 96, scale=2.0).image)[2]
    assert wide == pytest.approx(24, rel=0.1) and tight == pytest.approx(48, rel=0.08)


def test_a_lobed_nucleus_is_measured_as_a_whole():
    lobes = [(100 + 11 * np.sin(a), 110 + 11 * np.cos(a), 8, NUCLEUS) for a in (0.3, 2.4, 4.5)]
    image = _draw((200, 220), [(100, 110, 30, CYTOPLASM), *lobes])
    location = cell_crop.locate_cell(image)
    centre = np.mean([lobe[:2] for lobe in lobes], axis=0)
    assert abs(location.centre_row - centre[0]) < 2 and abs(location.centre_col - centre[1]) < 2
    assert location.diameter > 30  # the hull of all three lobes, not one lobe (16)


def test_of_two_cells_the_central_one_is_cropped():
    central = [(100, 100, 32, CYTOPLASM), (100, 100, 20, NUCLEUS)]
    bigger_at_the_edge = [(40, 170, 36, CYTOPLASM), (40, 170, 24, NUCLEUS)]
    location = cell_crop.locate_cell(_draw((200, 200), central + bigger_at_the_edge))
    assert abs(location.centre_row - 100) < 1.5 and abs(location.centre_col - 100) < 1.5


@pytest.mark.parametrize("image", [
    np.full((150, 200, 3), 200, np.uint8),
    _draw((150, 200), []),  # background and noise only
], ids=["constant", "noise"])
def test_fallback_is_the_centre_crop_of_the_frame(image):
    crop = cell_crop.cell_crop(image, 64)
    assert crop.used_fallback and crop.location is None
    expected = cell_crop.resample_window(image, 75, 100, 150, 150, (64, 64))
    np.testing.assert_array_equal(crop.image, expected)


def test_wrong_input_is_a_data_error():
    with pytest.raises(DataError):
        cell_crop.cell_crop(np.zeros((50, 50), np.uint8), 32)


def test_random_scale_is_seeded_and_zooms_about_the_centre():
    image = _cell((128, 128), 64, 64, 16)
    first = cell_crop.random_scale(image, np.random.default_rng(7), 0.7, 1.5)
    again = cell_crop.random_scale(image, np.random.default_rng(7), 0.7, 1.5)
    other = cell_crop.random_scale(image, np.random.default_rng(8), 0.7, 1.5)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == image.shape and first.dtype == np.uint8
    zoomed = cell_crop.random_scale(image, np.random.default_rng(0), 2.0, 2.0)
    row, col, diameter = _nucleus_centre_and_diameter(zoomed)
    assert abs(row - 64) < 1.5 and abs(col - 64) < 1.5 and diameter == pytest.approx(64, rel=0.06)


@pytest.mark.parametrize("folder", ["pbc", "external/tecom"])
def test_a_cell_is_found_in_real_images(folder):
    root = DATA / folder
    if not root.is_dir():
        pytest.skip(f"{root} is absent (the shared data sets are not on this machine)")
    paths = sorted(p for p in root.glob("*/*") if is_image_name(p))[::50][:12]
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        crop = cell_crop.cell_crop(image, 96)
        assert not crop.used_fallback, path.name
        # The crop's centre is nucleus: darker and bluer than the crop's border.
        centre, border = crop.image[40:56, 40:56].reshape(-1, 3), cell_crop.border_colour(crop.image)
        assert centre[:, 2].astype(int).mean() - centre[:, 1].mean() > border[2] - border[1], path.name
