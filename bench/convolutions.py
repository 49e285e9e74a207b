"""Per-convolution times of XLA's CPU kernels against torch's (oneDNN), and how each gains from more threads.

    python bench/convolutions.py [--threads 1,2] [--batch 16] [--repeats 5]

For each 3x3 convolution shape of UR-Net(32) + ResNet18 at 128 px (`SHAPES`), times the three convolutions
a train step runs: the forward pass, the input gradient ('dgrad') and the weight gradient ('wgrad'), for
JAX (`lax.conv_general_dilated` and its `jax.vjp`, jitted with the library's compiler options
(`urnet_jax.compiler_options`; `URNET_JAX_XLA_DEFAULTS=1`: XLA's defaults), NHWC / HWIO), for JAX with oneDNN's
kernels (`urnet_jax.models.onednn.conv`, 'jax_onednn', where that backend can be built) and for torch in both memory
formats (`aten.convolution` and `aten.convolution_backward`, NCHW and channels_last). Each thread count
runs in a fresh subprocess pinned to that many CPUs (XLA sizes its thread pool when it starts), so
`threads_speedup` = time at the first count / time at the last one says which kernels use a second core.

Times are the median over `--repeats` calls of wall milliseconds and process CPU milliseconds, after one
warm-up call. The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/ is not a package)

# (height = width, input channels, output channels, stride) of the step's convolutions.
SHAPES = ((128, 32, 32, 1), (128, 64, 32, 1), (64, 64, 64, 1), (128, 32, 32, 2), (32, 128, 128, 1),
          (16, 256, 256, 1), (8, 512, 512, 1))
KINDS = ("fwd", "dgrad", "wgrad")
FRAMEWORKS = ("jax", "jax_onednn", "torch_nchw", "torch_channels_last")


def _median_ms(call: Callable[[], Any], repeats: int) -> dict[str, float]:
    call()  # warm-up (compiles on the JAX side)
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus)}


def _jax_calls(size: int, c_in: int, c_out: int, stride: int, batch: int, by_onednn: bool
               ) -> dict[str, Callable[[], Any]]:
    import jax
    import numpy as np

    from urnet_jax import compiler_options
    from urnet_jax.models import onednn

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch, size, size, c_in), np.float32))
    w = jax.device_put(rng.standard_normal((3, 3, c_in, c_out), np.float32) * 0.05)

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        if by_onednn:
            return onednn.conv(x, w, (stride, stride), ((1, 1), (1, 1)))
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = jax.device_put(rng.standard_normal(conv(x, w).shape, np.float32))
    forward = compiler_options.jit(conv)  # the library's options (URNET_JAX_XLA_DEFAULTS=1: XLA's)
    dgrad = compiler_options.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    wgrad = compiler_options.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {"fwd": lambda: forward(x, w).block_until_ready(),
            "dgrad": lambda: dgrad(x, w, g).block_until_ready(),
            "wgrad": lambda: wgrad(x, w, g).block_until_ready()}


def _torch_calls(size: int, c_in: int, c_out: int, stride: int, batch: int,
                 channels_last: bool) -> dict[str, Callable[[], Any]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=generator)
    w = torch.randn(c_out, c_in, 3, 3, generator=generator) * 0.05
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    conv = torch.ops.aten.convolution
    arguments = ([stride, stride], [1, 1], [1, 1], False, [0, 0], 1)
    y = conv(x, w, None, *arguments)
    g = torch.randn(y.shape, generator=generator)
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    backward = torch.ops.aten.convolution_backward

    def gradient(mask: list[bool]) -> Callable[[], Any]:
        return lambda: backward(g, x, w, None, *arguments, mask)

    return {"fwd": lambda: conv(x, w, None, *arguments),
            "dgrad": gradient([True, False, False]), "wgrad": gradient([False, True, False])}


def measure(threads: int, batch: int, repeats: int) -> dict[str, Any]:
    """{framework: {shape name: {kind: {'wall_ms', 'cpu_ms'}}}} in this process, pinned to `threads` CPUs
    (without 'jax_onednn' where that backend cannot be built)."""
    common.pin_threads(threads)
    import torch

    from urnet_jax.models import onednn

    torch.set_num_threads(threads)
    unavailable = onednn.available()
    if unavailable:
        print(f"no jax_onednn column: {unavailable}", file=sys.stderr)
    frameworks = [framework for framework in FRAMEWORKS if framework != "jax_onednn" or not unavailable]
    results: dict[str, Any] = {framework: {} for framework in frameworks}
    for shape in SHAPES:
        name = shape_name(shape)
        calls = {"jax": _jax_calls(*shape, batch, by_onednn=False),
                 "torch_nchw": _torch_calls(*shape, batch, channels_last=False),
                 "torch_channels_last": _torch_calls(*shape, batch, channels_last=True)}
        if not unavailable:
            calls["jax_onednn"] = _jax_calls(*shape, batch, by_onednn=True)
        for framework in frameworks:
            with torch.no_grad():
                results[framework][name] = {kind: _median_ms(calls[framework][kind], repeats) for kind in KINDS}
    return results


def shape_name(shape: tuple[int, int, int, int]) -> str:
    size, c_in, c_out, stride = shape
    return f"{size}px {c_in}->{c_out}" + (f" s{stride}" if stride > 1 else "")


def _run_subprocess(threads: int, batch: int, repeats: int) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--probe-threads", str(threads), "--batch", str(batch),
               "--repeats", str(repeats)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("PROBE ")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"the {threads}-thread probe failed: {tail}")
    return json.loads(lines[-1][len("PROBE "):])


def print_table(per_threads: dict[int, Any], metric: str) -> None:
    counts = sorted(per_threads)
    frameworks = list(per_threads[counts[0]])
    print(f"\n{metric} per call (threads {' / '.join(map(str, counts))}), batch of the run:")
    print(f"{'shape':<20}" + "".join(f"{framework + ' ' + kind:>28}" for framework in frameworks for kind in KINDS))
    for shape in SHAPES:
        name = shape_name(shape)
        cells = [" / ".join(f"{per_threads[count][framework][name][kind][metric]:.0f}" for count in counts)
                 for framework in frameworks for kind in KINDS]
        print(f"{name:<20}" + "".join(f"{cell:>28}" for cell in cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, one process each")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_threads is not None:
        print("PROBE " + json.dumps(measure(args.probe_threads, args.batch, args.repeats)))
        return
    counts = [int(count) for count in args.threads.split(",")]
    load_before = common.load_average()
    per_threads = {count: _run_subprocess(count, args.batch, args.repeats) for count in counts}
    frameworks = list(per_threads[counts[0]])
    for metric in ("wall_ms", "cpu_ms"):
        print_table(per_threads, metric)
    totals = {count: {framework: {kind: sum(per_threads[count][framework][shape_name(shape)][kind]["wall_ms"]
                                            for shape in SHAPES) for kind in KINDS} for framework in frameworks}
              for count in counts}
    first, last = counts[0], counts[-1]
    speedup = {framework: {kind: totals[first][framework][kind] / totals[last][framework][kind] for kind in KINDS}
               for framework in frameworks}
    print(f"\nsum over the shapes, wall ms, {first} -> {last} threads (speedup):")
    for framework in frameworks:
        print(f"  {framework:<20}" + "  ".join(
            f"{kind} {totals[first][framework][kind]:.0f} -> {totals[last][framework][kind]:.0f} "
            f"({speedup[framework][kind]:.2f}x)" for kind in KINDS))
    common.print_result({"batch": args.batch, "repeats": args.repeats, "thread_counts": counts,
                         "per_threads": {str(count): per_threads[count] for count in counts},
                         "total_wall_ms": {str(count): totals[count] for count in counts},
                         "threads_speedup": speedup, "cpu": common.cpu_description(),
                         "load_average_before": load_before, "load_average_after": common.load_average(),
                         **common.environment()})


if __name__ == "__main__":
    main()
