"""A figure of raw cells next to their stain-free proxy (for the README), from real image folders."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from urnet_jax.data.folders import resolve_class_folders, scan_class_files
from urnet_jax.data.images import decode_image, sha256_hex
from urnet_jax.data.prepare import validate_data_config
from urnet_jax.data.stainfree import stainfree_proxy
from urnet_jax.errors import DataError


def pick_cells(data_config, cells_per_class: int) -> list[tuple[str, np.ndarray, str]]:
    """-> [(class name, uint8 image, sha256)]: the first readable files of each class in a seeded order."""
    config = validate_data_config(data_config)
    if not config["dir"]:
        raise DataError("the examples figure needs real images: set --config.data.dir")
    class_folders = resolve_class_folders(config["dir"], config["class_map"])
    files = scan_class_files(config["dir"], class_folders)
    cells = []
    for class_index, class_name in enumerate(class_folders):
        members = [f for f in files if f.class_name == class_name]
        order = np.random.default_rng([config["seed"], class_index]).permutation(len(members))
        picked = 0
        for row in order:
            data = members[row].path.read_bytes()
            try:
                image = decode_image(data, config["image_size"])
            except DataError:
                continue
            cells.append((class_name, image, sha256_hex(data)))
            picked += 1
            if picked == cells_per_class:
                break
    return cells


def write_examples_figure(data_config, out_path: str | os.PathLike, cells_per_class: int = 2) -> pathlib.Path:
    """Writes a PNG: top row raw cells, bottom row the same cells through the stain-free proxy."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    cells = pick_cells(data_config, cells_per_class)
    figure, axes = plt.subplots(2, len(cells), figsize=(1.6 * len(cells), 3.5), squeeze=False)
    for column, (class_name, image, sha256) in enumerate(cells):
        for row, shown in enumerate((image, stainfree_proxy(image, sha256))):
            axes[row, column].imshow(shown, interpolation="nearest")
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[0, column].set_title(class_name, fontsize=9)
    axes[0, 0].set_ylabel("raw", fontsize=9)
    axes[1, 0].set_ylabel("stain-free proxy", fontsize=9)
    figure.tight_layout(pad=0.3)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=80)
    plt.close(figure)
    return out_path
