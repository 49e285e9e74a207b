"""Checkpoints on disk: orbax `CheckpointManager`s holding, per step, a pytree and a small JSON record.

A training run keeps three of them side by side under `<workdir>/checkpoints/` (see `workdir`):
`periodic/` (rotating, the resume point), `best/` and `pretrain_best/` (kept apart, so rotation never
removes them). Saves are synchronous and orbax writes each step to a temporary directory that it renames
once complete, so a process killed mid-save leaves the previous steps intact and no half-written step
visible. A step whose files were damaged later is detected at restore time (orbax raises) and skipped
with a warning in favour of the previous one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from urnet_jax.errors import NoReadableCheckpoint

_STATE = "state"
_META = "meta"
QUARANTINE_DIR = "corrupt"


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint read back: its step, its pytree (the target's structure and shardings), its record."""

    step: int
    state: Any
    meta: dict[str, Any]


def _on_host(leaf: Any) -> Any:
    """A jax.Array whose whole value this process holds (replicated or local), copied to a numpy array; other
    leaves as they are. orbax writes host arrays about twice as fast as device arrays (no per-leaf sharding
    record or replica bookkeeping: 0.63 s instead of 1.43 s a save for 500 small arrays on a busy 2-core CPU),
    only process 0 writes them, and they read back into any target sharding."""
    if isinstance(leaf, jax.Array) and (leaf.is_fully_replicated or leaf.is_fully_addressable):
        return np.asarray(leaf)
    return leaf


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


class CheckpointStore:
    """One orbax CheckpointManager over `directory`; every step holds a pytree 'state' and JSON 'meta'.

    `max_to_keep=None` keeps every step. Saving a step that already exists replaces it (a resumed run
    redoes, bit for bit, the work of a step that a crash left behind). `for_writing=False` opens an
    existing directory for reading only: nothing is created or cleaned up.
    """

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int | None = None, for_writing: bool = True):
        self.directory = pathlib.Path(directory).expanduser().resolve()  # orbax needs an absolute path
        self._for_writing = for_writing
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=for_writing,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=for_writing,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))

    def steps(self) -> list[int]:
        """Every complete step on disk, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes `state` (pytree of arrays) and `meta` (JSON-serialisable dict) as `step`."""
        if step in self._manager.all_steps():
            self._manager.delete(step)
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(jax.tree.map(_on_host, state)),
                                       _META: ocp.args.JsonSave(meta)}),
            force=True,
        )
        if not saved:
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")

    def restore_meta(self, step: int) -> dict[str, Any]:
        """The JSON record of `step` alone (cheap: no arrays are read)."""
        return self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]

    def restore(self, step: int, target: Any, partial: bool = False) -> Restored:
        """Reads `step` into the structure, dtypes and shardings of `target` (a pytree of ShapeDtypeStruct).

        `partial`: `target` may hold a subset of the saved tree's top-level keys (e.g. only 'params' and
        'batch_stats' of a train state); only those are read. A store reads either partially or fully
        (orbax binds the state's reader on first use)."""
        state_args = (ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(target))
                      if partial else ocp.args.StandardRestore(target))
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: state_args, _META: ocp.args.JsonRestore()}))
        # orbax may return plain containers for custom nodes; put the leaves back into target's structure.
        state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored[_STATE]))
        return Restored(step, state, restored[_META])

    def restore_latest(self, target_for: Callable[[dict[str, Any]], Any], partial: bool = False) -> Restored | None:
        """The newest step that reads back completely (`partial`: see `restore`); None when the directory
        holds no step.

        `target_for(meta)` gives the restore target of a step from its JSON record (it may raise to reject
        a step, e.g. for a configuration mismatch: that error propagates and nothing is touched). Steps
        that fail to read are skipped with a warning; once an older step restores, a store opened for
        writing moves the unreadable newer ones to `<directory>/../corrupt/` (kept, not deleted) so that
        new saves can take their step numbers. Raises NoReadableCheckpoint when steps exist but none reads back.
        """
        unreadable: list[int] = []
        last_error = ""
        for step in reversed(self.steps()):
            try:
                meta = self.restore_meta(step)
            except Exception as error:  # orbax/tensorstore raise many types for damaged files
                last_error = _first_line(error)
                unreadable.append(step)
                logging.warning("checkpoint %s/%d is unreadable (%s); trying the previous one",
                                self.directory, step, last_error)
                continue
            target = target_for(meta)
            try:
                restored = self.restore(step, target, partial)
            except Exception as error:
                last_error = _first_line(error)
                unreadable.append(step)
                logging.warning("checkpoint %s/%d is unreadable (%s); trying the previous one",
                                self.directory, step, last_error)
                continue
            if self._for_writing:
                self._quarantine(unreadable)
            return restored
        if unreadable:
            raise NoReadableCheckpoint(
                f"no checkpoint in {self.directory} could be read (newest error: {last_error})")
        return None

    def _quarantine(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            quarantine = self.directory.parent / QUARANTINE_DIR
            quarantine.mkdir(parents=True, exist_ok=True)
            for step in steps:
                destination = quarantine / f"{self.directory.name}_{step}_{int(time.time())}"
                shutil.move(str(self.directory / str(step)), str(destination))
                logging.warning("moved unreadable checkpoint %s/%d to %s", self.directory, step, destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine {self.directory}")
        self._manager.reload()

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.close()
