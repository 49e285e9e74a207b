"""Every exception the library raises on purpose; each message is one line meant for the user.

The library raises these; only the entry points (`urnet_jax.cli.one_line_errors`) turn them into
`error: <message>` on stderr and an exit status.
"""

from __future__ import annotations


class UrnetError(Exception):
    """Base class: a problem the user can act on, described in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UrnetError):
    """An invalid command line or configuration value, or a workdir of another configuration."""


class DataError(UrnetError):
    """Bad input data (an unreadable folder, an empty class, a damaged prepared data set)."""


class PortError(UrnetError, ValueError):
    """A state_dict or checkpoint that does not fit the requested model."""


class RunError(UrnetError):
    """A run that cannot go on (non-finite loss, unusable checkpoint)."""


class NoReadableCheckpoint(UrnetError):
    """Every step of a non-empty checkpoint directory failed to restore."""


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; the message is one line. A
    KeyboardInterrupt, so that handlers of ordinary errors let it through."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.signal_number = signal_number
