"""Builds a folder of cell images with a chosen class mix from one split of a published split, for checking
a differential count against a known truth (e.g. a monocyte-rich sample from PBC's test split).

    python scripts/class_mix_folder.py --data-dir ../shared/data/pbc --split-dir ../shared/data/pbc/splits \
        --split test --mix granulocyte=150,monocyte=200,lymphocyte=150 --seed 0 --out /tmp/monocyte_rich

The folder gets one symbolic link per chosen image (flat: the class is not visible to `predict.py`) and
`truth.csv` (file, class). With `--as-prepared-by RUN`, each image is instead written (PNG) as that run's
`prepare` stored its images: framed at its size and through its imaging condition (e.g. the stain-free
proxy), so a run trained on a degraded variant is counted on images degraded the same way; classes are the paper's three (`wbc3`: neutrophil, eosinophil and basophil
make granulocyte). Images are drawn without replacement with a seeded generator; a class with fewer
images than asked for is a one-line error.
"""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
from absl import app, flags
from PIL import Image

from urnet_jax import cli, config as config_lib
from urnet_jax.data.images import sha256_hex
from urnet_jax.data.plan import prepared_image
from urnet_jax.data.folders import WBC3
from urnet_jax.data.split import read_split_dir
from urnet_jax.errors import ConfigError

_DATA_DIR = flags.DEFINE_string("data-dir", None, "class-per-folder image root (e.g. ../shared/data/pbc)")
_SPLIT_DIR = flags.DEFINE_string("split-dir", None, "folder with the published *train/*val/*test.csv files")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "the split the images come from")
_MIX = flags.DEFINE_string("mix", None, "images per class, e.g. granulocyte=150,monocyte=200,lymphocyte=150")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the draw")
_OUT = flags.DEFINE_string("out", None, "folder to create (must not exist)")
_AS_PREPARED_BY = flags.DEFINE_string("as-prepared-by", None,
                                      "a training run's workdir: write the images as its data were prepared")

FOLDER_TO_CLASS = {folder: name for name, folders in WBC3.items() for folder in folders}


def parse_mix(text: str) -> dict[str, int]:
    """'granulocyte=150,monocyte=200' -> {'granulocyte': 150, 'monocyte': 200}; ConfigError when malformed."""
    mix = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        if name.strip() not in WBC3 or not count.strip().isdigit():
            raise ConfigError(f"--mix item {item!r} is not CLASS=COUNT with CLASS one of {', '.join(WBC3)}")
        mix[name.strip()] = int(count)
    return mix


def draw(data_dir: pathlib.Path, listed: dict[tuple[str, str], str], split: str, mix: dict[str, int],
         seed: int) -> list[tuple[pathlib.Path, str]]:
    """(image path, class) pairs: mix[class] images of each class drawn from `split`, in a seeded order."""
    by_class: dict[str, list[pathlib.Path]] = {name: [] for name in mix}
    for folder in sorted(path for path in data_dir.iterdir() if path.is_dir()):
        name = FOLDER_TO_CLASS.get(folder.name.lower())
        if name not in by_class:
            continue
        by_class[name] += [path for path in sorted(folder.iterdir())
                           if listed.get((folder.name.lower(), path.name)) == split]
    rng = np.random.default_rng(seed)
    chosen = []
    for name, count in mix.items():
        if count > len(by_class[name]):
            raise ConfigError(f"the {split} split has {len(by_class[name])} {name} images, fewer than {count}")
        picks = rng.choice(len(by_class[name]), size=count, replace=False)
        chosen += [(by_class[name][index], name) for index in sorted(picks)]
    return chosen


def main(argv: list[str]) -> None:
    with cli.one_line_errors():
        cli.reject_positional_args(argv)
        for holder in (_DATA_DIR, _SPLIT_DIR, _MIX, _OUT):
            if holder.value is None:
                raise ConfigError(f"--{holder.name} is required")
        out = pathlib.Path(_OUT.value)
        if out.exists():
            raise ConfigError(f"--out {out} already exists")
        chosen = draw(pathlib.Path(_DATA_DIR.value).resolve(), read_split_dir(_SPLIT_DIR.value), _SPLIT.value,
                      parse_mix(_MIX.value), _SEED.value)
        data_config = None
        if _AS_PREPARED_BY.value:
            config_file = pathlib.Path(_AS_PREPARED_BY.value) / "config.json"
            if not config_file.is_file():
                raise ConfigError(f"--as-prepared-by {_AS_PREPARED_BY.value} holds no training run (no config.json)")
            data_config = config_lib.saved_config(json.loads(config_file.read_text())).data
        out.mkdir(parents=True)
        with open(out / "truth.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["file", "class"])
            for path, name in chosen:
                if data_config is None:
                    file_name = path.name
                    (out / file_name).symlink_to(path)
                else:
                    file_name = f"{path.stem}.png"
                    data = path.read_bytes()
                    Image.fromarray(prepared_image(data, sha256_hex(data), data_config)[0]).save(out / file_name)
                writer.writerow([file_name, name])
        counts = ", ".join(f"{name} {sum(1 for _, label in chosen if label == name)}" for name in WBC3)
        how = "written (as prepared) into" if data_config is not None else "linked into"
        print(f"{len(chosen)} images ({counts}) {how} {out}; truth in {out / 'truth.csv'}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
