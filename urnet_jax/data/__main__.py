"""Command line of the data layer.

  python -m urnet_jax.data prepare --config configs/urnet.py [--config.data.dir=DIR ...] [--out OUT]
      builds the data set (or reuses it) and prints per-class, per-split counts; writes OUT/manifest.csv
      and OUT/skipped.csv. --out defaults to config.data.prepared_dir.
  python -m urnet_jax.data examples --config configs/urnet.py --config.data.dir=DIR --out FIGURE.png
      writes a figure of raw cells next to their stain-free proxy.

A bad command line, config or data folder ends with one `error: ...` line and exit status 2.
"""

from __future__ import annotations

from absl import app, flags

from urnet_jax import cli
from urnet_jax.data.examples import write_examples_figure
from urnet_jax.data.prepare import prepare
from urnet_jax.errors import ConfigError

COMMANDS = ("prepare", "examples")

_CONFIG = cli.define_config_flag()
_OUT = flags.DEFINE_string("out", None, "prepare: output directory (default: config.data.prepared_dir); "
                                        "examples: output PNG")
_CELLS_PER_CLASS = flags.DEFINE_integer("cells-per-class", 2, "examples: cells shown per class", lower_bound=1)


def main(argv: list[str]) -> None:
    with cli.one_line_errors():
        if len(argv) != 2 or argv[1] not in COMMANDS:
            raise ConfigError(f"expected one command, {' or '.join(COMMANDS)} (got {' '.join(argv[1:]) or 'none'}); "
                              "see --help")
        config = cli.config_value(_CONFIG)
        if argv[1] == "prepare":
            out = _OUT.value or config.data.prepared_dir
            if not out:
                raise ConfigError("--out is required (or set config.data.prepared_dir)")
            summary = prepare(config.data, out)
            print(summary.format())
            print(f"manifest: {summary.out_dir}/manifest.csv, skipped files: {summary.out_dir}/skipped.csv")
        else:
            if not _OUT.value:
                raise ConfigError("--out FIGURE.png is required")
            print(f"wrote {write_examples_figure(config.data, _OUT.value, _CELLS_PER_CLASS.value)}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
