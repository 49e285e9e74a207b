"""Stopping a run cleanly: a checkpoint after the current step, then `TrainingStopped`.

One process: SIGINT (Ctrl-C) or SIGTERM (e.g. a cluster's pre-emption notice) sets a `StopRequest`; a
second signal acts at once, as it would without this. Several processes (`jax.distributed`): a signal
reaches one of them but a checkpoint needs them all, so JAX's pre-emption service propagates SIGTERM and
`multihost_utils.reached_preemption_sync_point` names the step at which every process saves and stops.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
from jax.experimental import multihost_utils

from urnet_jax.errors import TrainingStopped

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether the training loop should save a checkpoint after the current step and stop."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def requested(self, global_step: int) -> bool:
        """Call once per step, with the number of steps taken: in a multi-process run, whether every
        process has reached the step at which they save together after a pre-emption notice."""
        if self.signal_number is None and multihost_utils.reached_preemption_sync_point(global_step):
            self.signal_number = signal.SIGTERM
        return self.signal_number is not None

    def stopped(self, saved_step: int | None) -> TrainingStopped:
        """The exception that ends the run once the checkpoint of `saved_step` is written."""
        return TrainingStopped(self.signal_number, (
            f"stopped by {signal.Signals(self.signal_number).name} after a checkpoint at step {saved_step}: "
            "run the same command again to resume"))


@contextlib.contextmanager
def stop_on_signals(announce: bool) -> Iterator[StopRequest]:
    """Yields the StopRequest that SIGINT and SIGTERM set while the block runs (`announce`: print a line
    to stderr when one arrives). Signals that the process ignores stay ignored (e.g. SIGINT in a
    background job). Handlers are installed only in the main thread of a single-process run; in a
    multi-process run SIGTERM is JAX's pre-emption service's, and SIGINT acts as usual."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield request
        return
    # getsignal gives None for a handler installed outside Python: restored as the default.
    previous = {number: signal.getsignal(number) or signal.SIG_DFL for number in STOP_SIGNALS}

    def request_stop(number: int, frame: Any) -> None:
        if request.signal_number is not None:  # the second signal: what it would have done
            signal.signal(number, previous[number])
            signal.raise_signal(number)
            return
        request.signal_number = number
        if announce:
            print(f"{signal.Signals(number).name}: stopping after the current step, once a checkpoint is saved "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(number, request_stop)
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
