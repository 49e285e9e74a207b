"""Input-pipeline throughput: images/s of ready training batches (uint8, 200x200, batch 32).

Prepares (or reuses) a data set under --out: a subset of the real PBC images (--per_folder files of
each class folder, linked, not copied) when ../shared/data/pbc exists, else the synthetic data set;
then times `train_batches` over whole epochs after a warm-up and prints the machine and the number.

  python bench/input_pipeline.py [--out prepared/bench_input_pipeline] [--per_folder 600] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/ is not a package)

from urnet_jax.config import base_config  # noqa: E402
from urnet_jax.data import load_info, prepare, train_batches  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PBC = REPO_ROOT.parent / "shared" / "data" / "pbc"
PBC_FOLDERS = ("neutrophil", "eosinophil", "basophil", "monocyte", "lymphocyte")


def _link_subset(source: pathlib.Path, target: pathlib.Path, per_folder: int) -> None:
    """target/<folder>/<file> -> the first per_folder files (by name) of each source/<folder>."""
    for folder in PBC_FOLDERS:
        (target / folder).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / folder).iterdir())[:per_folder]:
            link = target / folder / path.name
            if not link.exists():
                link.symlink_to(path)


def _machine() -> str:
    cpu = common.cpu_description()
    return (f"{platform.node()}: {cpu['model']} ({' '.join(cpu['vector_extensions'])}), {os.cpu_count()} logical "
            f"cores, Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "prepared" / "bench_input_pipeline"))
    parser.add_argument("--per_folder", type=int, default=600, help="PBC files per class folder")
    parser.add_argument("--train_size", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup_batches", type=int, default=5)
    args = parser.parse_args()

    out = pathlib.Path(args.out)
    data = base_config().data
    data.image_size = 200
    data.train_size = args.train_size
    if PBC.is_dir():
        _link_subset(PBC, out / "pbc_subset", args.per_folder)
        data.dir = str(out / "pbc_subset")
    started = time.perf_counter()
    summary = prepare(data, out / "prepared")
    print(summary.format())
    print(f"prepare: {time.perf_counter() - started:.1f} s ({'reused' if summary.reused else 'built'})")

    info = load_info(out / "prepared")
    images, seconds = 0, 0.0
    for epoch in range(args.epochs):
        batches = train_batches(out / "prepared", args.batch_size, seed=0, epoch=epoch)
        for _ in range(args.warmup_batches):
            next(batches)
        started = time.perf_counter()
        for batch in batches:
            images += batch["image"].shape[0]
        seconds += time.perf_counter() - started
    print(f"machine: {_machine()}")
    print(f"train_batches: {images / seconds:.0f} images/s of ready {info.image_size}x{info.image_size} uint8 "
          f"batches of {args.batch_size} ({images} images over {args.epochs} epochs after "
          f"{args.warmup_batches} warm-up batches each)")


if __name__ == "__main__":
    main()
