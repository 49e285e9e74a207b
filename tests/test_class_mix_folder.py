"""scripts/class_mix_folder.py: a folder with a chosen class mix drawn from one split of a published split."""

import csv
import subprocess
import sys

from PIL import Image
from tiny_run import REPO_ROOT, subprocess_env

SCRIPT = REPO_ROOT / "scripts" / "class_mix_folder.py"


def write_pbc_like(root):
    """3 neutrophils, 1 eosinophil, 3 monocytes, 2 lymphocytes; the WBCAtt layout of split files."""
    files = {"neutrophil": 3, "eosinophil": 1, "monocyte": 3, "lymphocyte": 2}
    rows = {"train": [], "val": [], "test": []}
    for folder, count in files.items():
        (root / "images" / folder).mkdir(parents=True)
        for index in range(count):
            name = f"{folder[:2]}_{index}.png"
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(root / "images" / folder / name)
            split = "train" if index == 0 else "test"
            rows[split].append(f"archive/{folder}/{name}")
    (root / "splits").mkdir()
    for split, paths in rows.items():
        (root / "splits" / f"wbcatt_{split}.csv").write_text("path\n" + "".join(p + "\n" for p in paths))


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO_ROOT)


def test_draws_the_mix_from_the_split_only(tmp_path):
    write_pbc_like(tmp_path)
    out = tmp_path / "mix"
    result = run(f"--data-dir={tmp_path / 'images'}", f"--split-dir={tmp_path / 'splits'}", "--split=test",
                 "--mix=granulocyte=2,monocyte=2", f"--out={out}")
    assert result.returncode == 0, result.stderr
    with open(out / "truth.csv") as file:
        truth = list(csv.DictReader(file))
    assert sorted(row["class"] for row in truth) == ["granulocyte", "granulocyte", "monocyte", "monocyte"]
    assert all(not row["file"].endswith("_0.png") for row in truth)  # index 0 is in the train split
    assert all((out / row["file"]).resolve().is_file() for row in truth)


def test_too_many_images_asked_for_is_one_line(tmp_path):
    write_pbc_like(tmp_path)
    result = run(f"--data-dir={tmp_path / 'images'}", f"--split-dir={tmp_path / 'splits'}",
                 "--mix=lymphocyte=5", f"--out={tmp_path / 'mix'}")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: the test split has 1 lymphocyte images, fewer than 5"
    assert not (tmp_path / "mix").exists()


def test_as_prepared_by_writes_the_images_as_the_runs_prepare_stored_them(tmp_path):
    import json

    import numpy as np

    from urnet_jax.config import base_config
    from urnet_jax.data.images import sha256_hex
    from urnet_jax.data.plan import prepared_image

    write_pbc_like(tmp_path)
    config = base_config()
    config.data.variant, config.data.image_size = "stainfree_proxy", 32
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config.to_dict()))
    out = tmp_path / "mix"
    result = run(f"--data-dir={tmp_path / 'images'}", f"--split-dir={tmp_path / 'splits'}", "--mix=monocyte=2",
                 f"--as-prepared-by={tmp_path / 'run'}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    written = sorted(out.glob("*.png"))
    assert len(written) == 2 and not any(path.is_symlink() for path in written)
    source = (tmp_path / "images" / "monocyte" / written[0].name).read_bytes()
    expected = prepared_image(source, sha256_hex(source), config.data)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(written[0]).convert("RGB")), expected)
    assert np.ptp(expected[..., 0] - expected[..., 1]) == 0  # the proxy is gray: three equal channels
