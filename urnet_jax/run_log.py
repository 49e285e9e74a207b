"""What a training run prints and writes as it goes: its first lines, the time estimate, config.json,
metrics.jsonl rows and TensorBoard events (process 0 only)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
from tqdm import tqdm

from urnet_jax.run_context import RunContext
from urnet_jax.steps import JOINT, PRETRAIN
from urnet_jax.workdir import TIMING_KEYS, Position

# The metrics of an epoch's log line, per phase (those the row has).
LOGGED_METRICS = {
    PRETRAIN: ("train_loss", "val_mse", "val_psnr", "val_input_psnr", "saturated_fraction", "test_mse", "test_psnr"),
    JOINT: ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy", "test_loss",
            "test_accuracy", "test_balanced_accuracy"),
}


def rough_duration(seconds: float) -> str:
    """'42 s', '12 min', '3.5 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def announce_estimate(context: RunContext, phase: int, seconds_per_step: float) -> None:
    """Prints the estimated time of one epoch and of the whole phase (training steps only)."""
    epochs, per_epoch = context.phase_epochs[phase], seconds_per_step * context.steps_per_epoch
    tqdm.write(f"phase {phase}: {seconds_per_step:.3g} s/step, about {rough_duration(per_epoch)} per epoch, "
               f"{rough_duration(per_epoch * epochs)} for its {epochs} epoch(s) (without evaluation)")


def open_outputs(context: RunContext, position: Position | None, resume_step: int | None) -> Any:
    """Writes config.json and metrics.jsonl (the restored history) and opens the TensorBoard writer
    (dropping events after `resume_step`). Returns the writer; None on processes other than the first."""
    if not context.is_main:
        return None
    workdir = context.workdir
    (workdir / "config.json").write_text(json.dumps(context.config.to_dict(), indent=2, sort_keys=True) + "\n")
    rows = position.history if position else []
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return summary_writer(workdir / "tensorboard", resume_step)


def summary_writer(logdir: str | os.PathLike, purge_step: int | None = None) -> Any:
    """A tensorboardX SummaryWriter writing to `logdir`, dropping events after `purge_step` (None: none).

    tensorboardX imports torch whenever torch is installed, only to accept torch tensors, which a run never
    logs; that import would add about a second of start-up and half a GB of memory to every run. So unless
    torch is already loaded, it is hidden while tensorboardX is imported (`import torch` then raises
    ImportError, which tensorboardX handles).
    """
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter  # deferred: only process 0 writes events
    finally:
        if hidden and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir), purge_step=purge_step)


def record_epoch(context: RunContext, writer: Any, row: dict[str, Any]) -> None:
    """Appends an epoch's row to metrics.jsonl and TensorBoard, and prints it."""
    if not context.is_main:
        return
    with open(context.workdir / "metrics.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")
    for key, value in row.items():
        if key not in ("phase", "epoch", "step", *TIMING_KEYS) and isinstance(value, float):
            writer.add_scalar(f"phase{row['phase']}/{key}", value, row["step"])
    writer.flush()
    shown = " ".join(f"{key} {row[key]:.4f}" for key in LOGGED_METRICS[row["phase"]] if row.get(key) is not None)
    best = f", best on {row['selected_on']}" if row["best"] else ""
    tqdm.write(f"phase {row['phase']} epoch {row['epoch']}/{context.phase_epochs[row['phase']]}: {shown} "
               f"({row['seconds']:.1f} s{best})")


def print_start(context: RunContext, position: Position | None, saved_step: int | None) -> None:
    """The run's first lines: model, data and devices, and whether it resumes or is already complete."""
    split, config = context.info.num_examples, context.config
    print(f"training {config.model.enhancer} + {config.model.classifier} on {split['train']} train / "
          f"{split.get('val', 0)} val / {split['test']} test images ({len(context.info.class_names)} classes, "
          f"{context.image_size} px), {jax.device_count()} device(s), batch {config.batch_size}, "
          f"{context.steps_per_epoch} steps/epoch")
    print("model selection (best, pretrain_best) on the validation split" if context.selection_split == "val" else
          "model selection (best, pretrain_best) on the TEST split: the paper's protocol, optimistic")
    if position is not None and position.is_complete(context.phase_epochs):
        print(f"the run in {context.workdir} is complete (checkpoint step {saved_step})")
    elif position is not None:
        print(f"resuming from checkpoint step {saved_step} (phase {position.phase}, epoch "
              f"{position.epoch + 1}, step {position.step_in_epoch})")
