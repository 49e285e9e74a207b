"""Evaluate a trained run, or compare several (see `python evaluate.py --help`).

    python evaluate.py --workdir runs/urnet [--checkpoint best|latest] [--split test] [--perturb]
    python evaluate.py --compare runs/net1 runs/net2 runs/net3 runs/net4 [--out compare.md]
"""

from urnet_jax.evaluation.commands import evaluate_main

if __name__ == "__main__":
    evaluate_main()
