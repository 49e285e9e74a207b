"""Trains UR-Net (or any enhancer x classifier pair) with the paper's two-phase schedule.

    python train.py --config configs/urnet.py --config.data.dir=FOLDER [--workdir DIR] [--config.KEY=VALUE ...]
    python train.py --config configs/demo.py   (a tiny model on synthetic cells: minutes on a CPU)

The default workdir is runs/<config file name>. Running the same command again resumes the run.
"""

from __future__ import annotations

from absl import app, flags, logging

from urnet_jax import cli, host_memory, sharding

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config file name>)")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "call jax.distributed.initialize() (also enabled by URNET_MULTIHOST=1 or JAX_COORDINATOR_ADDRESS)")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")


def main(argv: list[str]) -> None:
    from urnet_jax import config as config_lib, steps, trainer  # here: keeps --help instant

    logging.set_verbosity(logging.WARNING)
    with cli.one_line_errors():
        cli.reject_positional_args(argv)
        config = cli.config_value(_CONFIG)
        if __name__ == "__main__":  # run as a script: the restart runs its command again
            host_memory.restart_with_host_memory_settings(config.conv_backend)
        sharding.initialize_distributed(_MULTIHOST.value)
        config_lib.validate(config)
        workdir = _WORKDIR.value or f"runs/{cli.config_path(_CONFIG).stem}"
        history = trainer.train_and_evaluate(config, workdir, show_progress=_PROGRESS.value)
        if sharding.is_main_process():
            block_cache = host_memory.block_cache_stats()
            if block_cache is not None:
                print(host_memory.describe_block_cache(block_cache))
            elif missing := host_memory.why_block_cache_missing(config.conv_backend):
                print(f"no block cache ({missing}; it would keep the step's large blocks mapped)")
            kept = [row for row in history if row["phase"] == steps.JOINT and row["best"]]
            if kept:
                best, split = kept[-1], kept[-1]["selected_on"]
                print(f"kept phase 2 epoch {best['epoch']} (best {split} accuracy {best[f'{split}_accuracy']:.4f}); "
                      f"its test accuracy {best['test_accuracy']:.4f}; run in {workdir}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
