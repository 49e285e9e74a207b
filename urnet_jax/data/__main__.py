"""Command line of the data layer.

  python -m urnet_jax.data prepare --config configs/urnet.py [--config.data.dir=DIR ...] --out OUT
      builds the data set (or reuses it) and prints per-class, per-split counts; writes OUT/manifest.csv
      and OUT/skipped.csv. --out defaults to config.data.prepared_dir.
  python -m urnet_jax.data examples --config configs/urnet.py --config.data.dir=DIR --out FIGURE.png
      writes a figure of raw cells next to their stain-free proxy.

Errors (bad config, unusable data) are reported in one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from urnet_jax.data.errors import DataError

COMMANDS = ("prepare", "examples")


def _usage(flag_values: flags.FlagValues) -> str:
    return __doc__ + "\nFlags:\n" + flag_values.get_help()


def _parse(argv: list[str]):
    """-> (command, config, flag values); raises ValueError with a one-line message on bad arguments."""
    flag_values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", None, "config file (e.g. configs/urnet.py)",
                                                  flag_values=flag_values, sys_argv=argv)
    flags.DEFINE_string("out", None, "prepare: output directory; examples: output PNG", flag_values=flag_values)
    flags.DEFINE_integer("cells_per_class", 2, "examples: cells shown per class", flag_values=flag_values)
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        print(_usage(flag_values))
        raise SystemExit(0)
    try:
        positional = flag_values(argv)[1:]
    except (AttributeError, KeyError) as error:  # ml_collections: an override of a key the config lacks
        key = str(error).strip("\"'")
        overrides = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
        names = [name for name in overrides if f".{key}" in name]
        raise ValueError(f"unknown config key in a --config.* override: {names[0] if names else key}") from None
    except flags.UnrecognizedFlagError as error:
        if error.flagname.startswith("config."):
            raise ValueError(f"unknown config key in a --config.* override: --{error.flagname}") from None
        raise ValueError(str(error).splitlines()[0]) from None
    except flags.Error as error:
        raise ValueError(str(error).splitlines()[0]) from None
    if len(positional) != 1 or positional[0] not in COMMANDS:
        raise ValueError(f"expected one command, {' or '.join(COMMANDS)} (got {' '.join(positional) or 'none'}); "
                         "see --help")
    if not flag_values["config"].present:
        raise ValueError("--config is required")
    try:
        config = config_flag.value
        config.data  # a config file that failed to load raises here, on first use
    except Exception as error:  # loading the config file runs its code: report any failure in one line
        raise ValueError(f"cannot load the config: {' '.join(str(error).split())}") from None
    return positional[0], config, flag_values


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 data error, 2 usage error)."""
    argv = list(sys.argv if argv is None else argv)
    try:
        command, config, flag_values = _parse(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = flag_values["out"].value
    try:
        if command == "prepare":
            out = out or config.data.prepared_dir
            if not out:
                raise DataError("--out is required (or set config.data.prepared_dir)")
            from urnet_jax.data.prepare import prepare

            summary = prepare(config.data, out)
            print(summary.format())
            print(f"manifest: {summary.out_dir}/manifest.csv, skipped files: {summary.out_dir}/skipped.csv")
        else:
            if not out:
                raise DataError("--out FIGURE.png is required")
            from urnet_jax.data.examples import write_examples_figure

            print(f"wrote {write_examples_figure(config.data, out, flag_values['cells_per_class'].value)}")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
