"""model_input (the per-image transforms every model input goes through), phase-1 targets, the severe proxy,
the training-only online augmentation, and the validation of the new data keys."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from tests.test_cell_crop import BACKGROUND, NUCLEUS, _cell
from tests.test_data_prepare import _data_config
from urnet_jax.config import base_config
from urnet_jax.data import (
    DataError,
    eval_batches,
    load_image,
    model_input,
    prepare,
    read_manifest,
    severe_proxy,
    stainfree_proxy,
    train_batches,
)
from urnet_jax.data.cell_crop import cell_crop
from urnet_jax.data.clahe import ClaheParameters, clahe
from urnet_jax.data.color import normalise_colour, to_grayscale
from urnet_jax.data.enhancement_operators import emulation_target
from urnet_jax.data.images import resize_square
from urnet_jax.data.online import OnlineAugmentation
from urnet_jax.data.stainfree import apply_variant, severe_ranges
from urnet_jax.errors import ConfigError

STAINED = _cell((90, 120), 50, 66, 12, seed=1)  # a purple nucleus in lilac cytoplasm on pink, not square


def _config(**overrides):
    data = base_config().data
    data.image_size = 48
    for key, value in overrides.items():
        setattr(data, key, value)
    return data


def test_model_input_defaults_to_a_plain_resize_at_any_size():
    out = model_input(STAINED, _config())
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, resize_square(STAINED, 48))
    assert model_input(STAINED[:30, :70], _config()).shape == (48, 48, 3)
    np.testing.assert_array_equal(model_input(STAINED, {"image_size": 48}), out)  # missing keys: defaults
    with pytest.raises(DataError, match="expects a uint8"):
        model_input(STAINED.astype(np.float32), _config())


def test_model_input_is_deterministic_and_the_composition_of_its_parts():
    config = _config(crop="cell", crop_scale=3.0, color_norm="reinhard", preprocessing="clahe",
                     clahe_clip_limit=0.02, clahe_kernel_size=8, grayscale=True)
    out = model_input(STAINED, config)
    np.testing.assert_array_equal(out, model_input(STAINED.copy(), config))
    crop = cell_crop(STAINED, 48, 3.0)
    assert not crop.used_fallback
    expected = to_grayscale(clahe(normalise_colour(crop.image, "reinhard"),
                                  ClaheParameters(kernel_size=8, clip_limit=0.02)))
    np.testing.assert_array_equal(out, expected)
    assert np.array_equal(out[..., 0], out[..., 2])
    assert not np.array_equal(out, model_input(STAINED, _config(crop="cell", crop_scale=3.0)))


def test_model_input_unknown_choice_is_a_config_error():
    with pytest.raises(ConfigError, match="data.crop must be one of none, cell"):
        model_input(STAINED, _config(crop="nucleus"))


def _nucleus_contrast(image: np.ndarray) -> float:
    """Grey-level difference between the background and the nucleus of STAINED's cell (noise averages out)."""
    nucleus = np.linalg.norm(STAINED.astype(float) - NUCLEUS, axis=-1) < 40
    background = np.linalg.norm(STAINED.astype(float) - BACKGROUND, axis=-1) < 20
    grey = image.astype(float).mean(axis=-1)
    return float(grey[background].mean() - grey[nucleus].mean())


def test_severe_proxy_lowers_contrast_more_than_the_stainfree_proxy():
    digests = [f"{seed:064x}" for seed in range(1, 9)]
    stained = _nucleus_contrast(STAINED)
    mild = np.mean([_nucleus_contrast(stainfree_proxy(STAINED, d)) for d in digests])
    severe = np.mean([_nucleus_contrast(severe_proxy(STAINED, d)) for d in digests])
    assert 0 < severe < 0.5 * mild < 0.5 * stained, (severe, mild, stained)
    assert np.mean([severe_proxy(STAINED, d).std() for d in digests]) > np.mean(
        [stainfree_proxy(STAINED, d).std() for d in digests])  # more noise and uneven light, less signal
    image = severe_proxy(STAINED, digests[0])
    assert image.dtype == np.uint8 and np.array_equal(image[..., 0], image[..., 1])
    # the strength knobs reach the degradation
    config = _config(variant="severe_proxy", severe_contrast=(0.3, 0.3))
    np.testing.assert_array_equal(apply_variant(STAINED, digests[0], config),
                                  severe_proxy(STAINED, digests[0], severe_ranges(config)))
    assert _nucleus_contrast(apply_variant(STAINED, digests[0], config)) > 2 * _nucleus_contrast(image)


@pytest.fixture(scope="module")
def prepared_pair(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The synthetic set prepared raw (no target) and as the proxy with the stained target."""
    root = tmp_path_factory.mktemp("targets")
    outs = {"raw": root / "raw", "proxy": root / "proxy"}
    prepare(_data_config("", val_fraction=0.2, train_size=0), outs["raw"])
    prepare(_data_config("", val_fraction=0.2, train_size=0, variant="stainfree_proxy", target="stained"),
            outs["proxy"])
    return outs


def test_stained_target_is_the_image_before_the_proxy(prepared_pair):
    for split in ("train", "val", "test"):
        assert ([row["sha256"] for row in read_manifest(prepared_pair["raw"], split)]
                == [row["sha256"] for row in read_manifest(prepared_pair["proxy"], split)])
        for raw, proxy in zip(eval_batches(prepared_pair["raw"], split, 4), eval_batches(prepared_pair["proxy"], split, 4),
                              strict=True):
            assert "target" not in raw  # target "image": the input is its own target, nothing stored
            assert proxy["target"].shape == proxy["image"].shape and proxy["target"].dtype == np.uint8
            np.testing.assert_array_equal(proxy["target"], raw["image"])
            rows = read_manifest(prepared_pair["proxy"], split)
            for image, valid, index in zip(proxy["image"], proxy["mask"], proxy["index"]):
                if valid:
                    source = load_image(rows[index]["path"])
                    np.testing.assert_array_equal(image, stainfree_proxy(model_input(source, _data_config("")),
                                                                         rows[index]["sha256"]))
    batch = next(train_batches(prepared_pair["proxy"], 4, seed=0, epoch=0))
    assert batch["target"].shape == (4, 32, 32, 3) and not np.array_equal(batch["target"], batch["image"])


@pytest.mark.parametrize("target", ["stained", "unsharp_mask"])
def test_targets_on_raw_images(tmp_path, target):
    prepare(_data_config("", train_size=0, target=target), tmp_path)
    batch = next(eval_batches(tmp_path, "test", 8))
    expected = batch["image"] if target == "stained" else emulation_target(batch["image"], target)
    np.testing.assert_array_equal(batch["target"][batch["mask"]], expected[batch["mask"]])


def test_online_augmentation_is_deterministic_per_seed_epoch_and_index_and_varies():
    augmentation = OnlineAugmentation.from_config(_config(online_augment=True, random_scale=(0.8, 1.25),
                                                          stain_augment=0.05, color_jitter=True))
    assert augmentation.active and not OnlineAugmentation.from_config(_config()).active
    image = resize_square(STAINED, 48)
    first, _ = augmentation.apply(image, None, seed=1, epoch=2, index=3)
    again, _ = augmentation.apply(image.copy(), None, seed=1, epoch=2, index=3)
    np.testing.assert_array_equal(first, again)
    outputs = {augmentation.apply(image, None, seed, epoch, index)[0].tobytes()
               for seed in (1, 2) for epoch in range(3) for index in range(4)}
    assert len(outputs) == 24  # every (seed, epoch, index) draws its own augmentation
    # geometric steps move the target with the image; photometric ones leave it alone
    geometric = OnlineAugmentation.from_config(_config(online_augment=True, random_scale=(0.7, 1.3)))
    for index in range(6):
        moved, target = geometric.apply(image, image, 0, 0, index)
        np.testing.assert_array_equal(moved, target)
    jittered, target = OnlineAugmentation(colour=True).apply(image, image, 0, 0, 0)
    np.testing.assert_array_equal(target, image)
    assert not np.array_equal(jittered, image)
    gray, _ = OnlineAugmentation(stain_scale=0.1, grayscale=True).apply(to_grayscale(image), None, 0, 0, 0)
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_augmented_training_batches_depend_only_on_seed_epoch_and_index(prepared_pair):
    out = prepared_pair["proxy"]
    config = _config(online_augment=True, color_jitter=True)
    plain = list(train_batches(out, 4, seed=3, epoch=1))
    augmented = list(train_batches(out, 4, seed=3, epoch=1, data_config=config))
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(plain, augmented, strict=True))
    resumed = list(train_batches(out, 4, seed=3, epoch=1, start_step=2, data_config=config))
    for a, b in zip(augmented[2:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["target"], b["target"])
    wide = next(train_batches(out, 8, seed=3, epoch=1, data_config=config))  # other batch size, same examples
    np.testing.assert_array_equal(wide["image"], np.concatenate([augmented[0]["image"], augmented[1]["image"]]))
    assert not np.array_equal(next(train_batches(out, 4, seed=3, epoch=2, data_config=config))["image"],
                              augmented[0]["image"])


@pytest.mark.parametrize("overrides, message", [
    ({"val_fraction": 0.8}, "data.val_fraction must be >= 0, with data.test_fraction"),
    ({"partition": "c"}, "data.partition must be one of all, a, b"),
    ({"target": "clahe"}, "data.target must be one of image, stained"),
    ({"variant": "severe"}, "data.variant must be one of raw, stainfree_proxy, severe_proxy"),
    ({"crop": "nucleus"}, "data.crop must be one of none, cell"),
    ({"crop_scale": 0}, "data.crop_scale must be > 0"),
    ({"preprocessing": "gamma"}, "data.preprocessing must be one of none, clahe"),
    ({"clahe_clip_limit": 2.0}, r"data.clahe_clip_limit must be in \(0, 1\]"),
    ({"color_norm": "macenko"}, "data.color_norm must be one of none, reinhard, standardise"),
    ({"grayscale": 1}, "data.grayscale must be True or False"),
    ({"random_scale": (1.2, 0.8)}, r"data.random_scale must be \(\) or \(low, high\)"),
    ({"stain_augment": -0.1}, r"data.stain_augment must be in \[0, 1\)"),
    ({"severe_contrast": (0.2,)}, "data.severe_contrast must be a"),
])
def test_bad_data_keys_are_one_line_errors(tmp_path, overrides, message):
    config = _data_config("").to_dict()
    config.update(overrides)
    with pytest.raises(DataError, match=message) as error:
        prepare(config, tmp_path)
    assert "\n" not in str(error.value)


def test_training_only_keys_do_not_rebuild_the_data_set(prepared_pair):
    config = _data_config("", val_fraction=0.2, train_size=0, online_augment=True, random_scale=(0.9, 1.1),
                          stain_augment=0.05, color_jitter=True)
    assert prepare(config, prepared_pair["raw"]).reused
