"""Colour augmentation (seeded), per-image colour normalisation, grayscale."""

import numpy as np
import pytest
from skimage.color import rgb2lab

from urnet_jax.data import color
from urnet_jax.errors import ConfigError, DataError


def _cell_image(seed=0, size=96):
    """A smooth synthetic stained cell: pinkish background, lilac cytoplasm, purple nucleus, noise."""
    rows, cols = np.mgrid[:size, :size] + 0.5
    radius = np.hypot(rows - size / 2, cols - size / 2)
    image = np.empty((size, size, 3))
    image[...] = (235, 215, 200)
    image[radius < size * 0.3] = (205, 180, 215)
    image[radius < size * 0.18] = (95, 55, 150)
    noise = np.random.default_rng(seed).normal(0, 6, image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def _tint(image, gains):
    return np.clip(np.round(image * np.asarray(gains)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("augment", [color.hed_jitter, color.colour_jitter], ids=["hed", "colour"])
def test_augmentation_is_deterministic_per_seed(augment):
    image = _cell_image()
    first = augment(image, np.random.default_rng(3))
    np.testing.assert_array_equal(first, augment(image, np.random.default_rng(3)))
    assert not np.array_equal(first, augment(image, np.random.default_rng(4)))
    assert not np.array_equal(first, image)
    assert first.shape == image.shape and first.dtype == np.uint8


def test_zero_strength_changes_nothing():
    image = _cell_image()
    unchanged = color.colour_jitter(image, np.random.default_rng(0), brightness=0, contrast=0, hue=0, gamma=0)
    np.testing.assert_array_equal(unchanged, image)
    round_trip = color.hed_jitter(image, np.random.default_rng(0), scale=0, shift=0)
    assert np.abs(round_trip.astype(int) - image).max() <= 1  # the stain transform and back


def test_hed_jitter_strength_grows_with_scale():
    image = _cell_image()
    light = [np.abs(color.hed_jitter(image, np.random.default_rng(s), 0.05, 0).astype(int) - image).mean()
             for s in range(5)]
    strong = [np.abs(color.hed_jitter(image, np.random.default_rng(s), 0.3, 0).astype(int) - image).mean()
              for s in range(5)]
    assert np.mean(strong) > 3 * np.mean(light) > 0


def test_grayscale_has_three_equal_channels_of_bt601_luma():
    image = _cell_image()
    gray = color.to_grayscale(image)
    assert gray.shape == image.shape and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray[..., 0] - luma).max() <= 1


@pytest.mark.parametrize("method", ["reinhard", "standardise"])
def test_normalisation_maps_differently_tinted_copies_close_together(method):
    image = _cell_image()
    warm, cold = _tint(image, (1.0, 0.85, 0.6)), _tint(image, (0.75, 0.8, 1.0))
    before = np.abs(warm.astype(int) - cold).mean()
    after = np.abs(color.normalise_colour(warm, method).astype(int) - color.normalise_colour(cold, method)).mean()
    assert after < 0.2 * before, (before, after)


def test_reinhard_output_has_the_target_lab_statistics():
    normalised = color.reinhard_normalise(_tint(_cell_image(), (0.9, 1.0, 0.7)))
    lab = rgb2lab(normalised).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(0), color.LAB_TARGET_MEAN, atol=2.0)
    np.testing.assert_allclose(lab.std(0), color.LAB_TARGET_STD, rtol=0.1)


def test_normalisation_none_unknown_and_bad_input():
    image = _cell_image()
    assert color.normalise_colour(image, "none") is image
    with pytest.raises(ConfigError):
        color.normalise_colour(image, "macenko")
    with pytest.raises(DataError):
        color.reinhard_normalise(image.astype(np.float32))
