"""The reproduction study: the paper's ablation (Net1-Net4) x data variants x seeds, trained and evaluated run
after run, and its results in the paper's Table 3 layout (mean ± std over seeds).

- `sweep`: a study config's runs (names, complete validated run configs);
- `run`: the runner (train, evaluate, skip finished runs, draw the image subset once);
- `results`: finished runs read back from a results folder;
- `report`: statistics and Markdown tables, written between markers of a document;
- `__main__`: the command line, `python -m urnet_jax.study run|report` (docs/STUDY.md, configs/study_*.py).
"""
