"""Differential count of a folder of cell images with a trained run (see `python predict.py --help`).

    python predict.py --workdir runs/urnet --images path/to/cells [--out preds.csv] [--checkpoint best]
"""

from urnet_jax.evaluation.commands import predict_main

if __name__ == "__main__":
    predict_main()
