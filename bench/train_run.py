"""Whole-run throughput: images/s of `train.py` epochs against the train step alone, on the same model.

  python bench/train_run.py --enhancer urnet --enhancer-width 32 --classifier resnet18 --size 128 \
      --batch 16 [--train-size 320] [--epochs 5] [--threads N] [--conv-backend xla|onednn] [--out DIR] \
      [--step-img-s X] [--no-test-every-epoch] [--huge-pages]

Runs `train.py` (phase 2 only: `pretrain.epochs=0`) in a subprocess on a fixed synthetic data set
(`data.allow_synthetic=True`, prepared once under `--out` and reused), with the model, batch, image size
and SGD optimiser of `bench/train_step.py`, and watches the run's `metrics.jsonl`: an epoch's wall time
is the time between two of its rows appearing, so it holds everything the run does per epoch (the train
steps with their input pipeline and host reads, the evaluation of the validation and test splits, the
best-weights and periodic checkpoints, TensorBoard and metrics logging). The rows' own timings split it:
`eval_seconds` (the evaluation), `seconds` - `eval_seconds` (the training steps), and the rest (checkpoints,
logging). The first epoch compiles and is reported apart; the run's images/s is the training images of an
epoch over the median wall time of the later epochs, `steps_img_s` the same over the training steps alone.
`bench/train_step.py --skip-torch --skip-inference` times the JAX train step alone on a fixed batch, once
right before the run and once right after it, so that a machine whose speed drifts during the run shows as the
two disagreeing (`step_img_s_before`, `step_img_s_after`); `step_img_s` is their mean (or `--step-img-s` gives
it, and neither runs), `run_vs_step` = run images/s / step_img_s (`steps_vs_step`: the run's training steps
alone against it).

Prints a summary and, as the last line, `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/ is not a package)
from urnet_jax.config import CONV_BACKENDS  # noqa: E402  (imports no JAX)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
POLL_S = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enhancer", default="urnet")
    parser.add_argument("--enhancer-width", type=int, default=32)
    parser.add_argument("--classifier", default="resnet18", help="a classifier at its standard width")
    parser.add_argument("--size", type=int, default=128, help="image height = width, pixels")
    parser.add_argument("--batch", type=int, default=16, help="training batch (also the evaluation batch)")
    parser.add_argument("--train-size", type=int, default=320, help="training images per epoch")
    parser.add_argument("--per-class", type=int, default=40, help="synthetic source images per class")
    parser.add_argument("--epochs", type=int, default=5,
                        help="epochs (>= 2: the first one compiles; the median of the later ones is read)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--conv-backend", default=CONV_BACKENDS[0], choices=CONV_BACKENDS,
                        help="the models' convolutions (config.conv_backend)")
    common.add_host_memory_flags(parser, "run train.py and the step benchmark with transparent huge pages for "
                                 "malloc's large blocks ($URNET_JAX_HUGE_PAGES=1, urnet_jax.host_memory; default: "
                                 "malloc's own settings)")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "bench_train_run"),
                        help="the prepared data set (kept) and the run's workdir (replaced) go here")
    parser.add_argument("--step-img-s", type=float, default=None,
                        help="the step benchmark's images/s for this model (default: measured before and after "
                             "the run)")
    parser.add_argument("--step-rounds", type=int, default=3, help="timed blocks of each step benchmark")
    parser.add_argument("--test-every-epoch", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate the test split after every epoch (config.train.test_every_epoch; "
                             "--no-test-every-epoch: only after kept and last epochs)")
    args = parser.parse_args(argv)
    for name in ("enhancer_width", "size", "batch", "train_size", "per_class", "step_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first epoch compiles), got {args.epochs}")
    if args.train_size < args.batch:
        parser.error(f"--train-size ({args.train_size}) must hold at least one batch ({args.batch})")
    args.block_cache = common.resolve_block_cache(args.block_cache, args.conv_backend)
    return args


def config_overrides(args: argparse.Namespace, prepared_dir: pathlib.Path) -> dict[str, Any]:
    """The `--config.KEY=VALUE` settings of the run (on top of configs/urnet.py, the paper's protocol)."""
    return {
        "model.enhancer": args.enhancer, "model.enhancer_width": args.enhancer_width,
        "model.classifier": args.classifier, "model.classifier_width": 0,
        "data.allow_synthetic": True, "data.image_size": args.size, "data.synthetic_per_class": args.per_class,
        "data.train_size": args.train_size, "data.prepared_dir": str(prepared_dir),
        "pretrain.epochs": 0, "train.epochs": args.epochs, "batch_size": args.batch, "eval_batch_size": args.batch,
        "precision": args.precision, "conv_backend": args.conv_backend,
        "train.test_every_epoch": args.test_every_epoch,
    }


def run_training(args: argparse.Namespace,
                 out: pathlib.Path) -> tuple[list[dict[str, Any]], list[float], float, int]:
    """Runs train.py; returns (its metrics rows, the seconds since start at which each row appeared, the
    whole run's seconds, its peak resident memory in bytes: its own, from `os.wait4`). Exits with train.py's
    last stderr line if it fails."""
    workdir = out / "run"
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(REPO_ROOT / "configs" / "urnet.py"),
               f"--workdir={workdir}", "--noprogress",
               *(f"--config.{key}={value}" for key, value in config_overrides(args, out / "prepared").items())]
    metrics = workdir / "metrics.jsonl"
    arrivals: list[float] = []
    with open(out / "train.log", "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        size, peak_rss_bytes = 0, 0
        while True:
            finished, status, usage = os.wait4(process.pid, os.WNOHANG)
            running = finished == 0
            if not running:
                process.returncode = os.waitstatus_to_exitcode(status)
                peak_rss_bytes = usage.ru_maxrss * 1024  # KiB on Linux
            if metrics.exists() and metrics.stat().st_size != size:
                size = metrics.stat().st_size
                rows = metrics.read_text().count("\n")
                arrivals += [time.perf_counter() - started] * (rows - len(arrivals))
            if not running:
                break
            time.sleep(POLL_S)
        total = time.perf_counter() - started
    if process.returncode != 0:
        lines = (out / "train.log").read_text().strip().splitlines()
        sys.exit(f"error: train.py failed ({lines[-1] if lines else f'exit status {process.returncode}'}); "
                 f"see {out / 'train.log'}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return rows, arrivals, total, peak_rss_bytes


def step_images_per_second(args: argparse.Namespace) -> dict[str, Any]:
    """The RESULT of `bench/train_step.py` (JAX train step only) for the same model and batch."""
    command = [sys.executable, str(REPO_ROOT / "bench" / "train_step.py"), "--enhancer", args.enhancer,
               "--enhancer-width", str(args.enhancer_width), "--classifier", args.classifier,
               "--size", str(args.size), "--batch", str(args.batch), "--precision", args.precision,
               "--steps", "1", "--rounds", str(args.step_rounds), "--warmup", "1", "--skip-torch",
               "--skip-inference", "--conv-backend", args.conv_backend,
               "--block-cache" if args.block_cache else "--no-block-cache"]
    command += ["--huge-pages"] if args.huge_pages else []
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines or not lines[-1].startswith("RESULT "):
        stderr = completed.stderr.strip().splitlines()
        sys.exit(f"error: the step benchmark failed: {stderr[-1] if stderr else completed.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


def epoch_breakdown(rows: list[dict[str, Any]], arrivals: list[float], images_per_epoch: int) -> dict[str, Any]:
    """Per-epoch wall seconds (between rows appearing) split into the row's own `seconds` (training steps
    `seconds - eval_seconds`, evaluation `eval_seconds`) and the rest (checkpoints, logging); the run's
    images/s, and its training steps' alone, over the epochs after the first."""
    walls = [arrivals[0]] + [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    steady = walls[1:]
    inside = [row["seconds"] for row in rows[1:]]
    evaluation = [row["eval_seconds"] for row in rows[1:]]
    steps = [total - part for total, part in zip(inside, evaluation)]
    median_wall = statistics.median(steady)
    return {
        "first_epoch_wall_s": round(walls[0], 2),  # start-up, data loading, compilation included
        "epoch_wall_s": [round(w, 2) for w in steady],
        "epoch_metrics_s": [round(s, 2) for s in inside],
        "epoch_steps_s": [round(s, 2) for s in steps],
        "epoch_eval_s": [round(s, 2) for s in evaluation],
        "epoch_outside_metrics_s": [round(w - s, 2) for w, s in zip(steady, inside)],
        "epoch_wall_s_median": round(median_wall, 3),
        "run_img_s": round(images_per_epoch / median_wall, 3),
        "steps_img_s": round(images_per_epoch / statistics.median(steps), 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        threads = common.pin_threads(args.threads)  # inherited by train.py and the step benchmark
    except ValueError as error:
        sys.exit(f"error: {error}")
    common.use_host_memory_settings(args.huge_pages, args.block_cache, restart=argv is None)  # inherited
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_at_start = common.load_average()
    before = None if args.step_img_s is not None else step_images_per_second(args)
    rows, arrivals, total_s, run_peak_rss_bytes = run_training(args, out)
    if len(rows) != args.epochs or len(arrivals) != args.epochs:
        sys.exit(f"error: train.py wrote {len(rows)} metrics rows, expected {args.epochs}")
    after = None if args.step_img_s is not None else step_images_per_second(args)
    steps_per_epoch = rows[1]["step"] - rows[0]["step"]  # the rows' `step`: the global step at the epoch's end
    breakdown = epoch_breakdown(rows, arrivals, steps_per_epoch * args.batch)
    step_img_s = (args.step_img_s if after is None
                  else round(statistics.mean([before["jax_img_s"], after["jax_img_s"]]), 3))
    result = {
        **breakdown,
        "step_img_s": step_img_s,
        "step_img_s_before": None if before is None else before["jax_img_s"],
        "step_img_s_after": None if after is None else after["jax_img_s"],
        "run_vs_step": round(breakdown["run_img_s"] / step_img_s, 3),
        "steps_vs_step": round(breakdown["steps_img_s"] / step_img_s, 3),
        "steps_per_epoch": steps_per_epoch,
        "images_per_epoch": steps_per_epoch * args.batch,
        "run_total_s": round(total_s, 2),
        "run_peak_rss_bytes": run_peak_rss_bytes,
        "run_block_cache": next((line for line in (out / "train.log").read_text().splitlines()
                                 if line.startswith("block cache:")), None),  # train.py's own account
        "step_benchmark": None if after is None else {k: after[k] for k in ("jax_train", "jax_compile_s", "params")},
        "threads": threads,
        "cpu": common.cpu_description(),
        "load_avg_start": load_at_start,
        "load_avg_end": common.load_average(),
        "args": vars(args),
    }
    print(f"{args.enhancer}(width {args.enhancer_width}) + {args.classifier}, {args.size} px, batch {args.batch}, "
          f"{steps_per_epoch} steps/epoch, {threads} threads, {result['cpu']['model']}")
    print(f"train.py: first epoch {breakdown['first_epoch_wall_s']} s; later epochs {breakdown['epoch_wall_s']} s "
          f"wall, of which training steps {breakdown['epoch_steps_s']} s, evaluation {breakdown['epoch_eval_s']} s, "
          f"checkpoints+logging {breakdown['epoch_outside_metrics_s']} s")
    bracket = "" if after is None else f" (before the run {before['jax_img_s']}, after {after['jax_img_s']})"
    print(f"run {breakdown['run_img_s']} img/s (its training steps alone {breakdown['steps_img_s']}), step benchmark "
          f"{step_img_s} img/s{bracket}: run_vs_step {result['run_vs_step']}, steps_vs_step {result['steps_vs_step']}; "
          f"train.py's peak resident memory {run_peak_rss_bytes / 2**30:.2f} GiB")
    print(f"load average start {load_at_start} end {result['load_avg_end']}")
    common.print_result(result)
    return result


if __name__ == "__main__":
    main()
