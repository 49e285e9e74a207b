"""Train- and inference-step throughput of urnet_jax against PyTorch mirrors of the same network.

  python bench/train_step.py --enhancer urnet --enhancer-width 32 --classifier resnet18 --size 128 \
      --batch 16 [--precision float32|bfloat16] [--steps 3] [--rounds 3] [--warmup 2] [--lead-in 0] \
      [--threads N] [--torch-variants eager,eager_channels_last,compile,compile_channels_last,compile_max_autotune] \
      [--memory] [--max-batch [--memory-budget-gb G]] [--conv-backend xla|onednn]

JAX side: the library's own jitted steps (`steps.make_train_step`: forward, softmax cross-entropy,
backward, SGD-momentum update, donated state; `steps.make_eval_step` for inference) on a batch
already on the device. Torch side: `bench/torch_reference.py`, the same network layer by layer with
torchvision's classifier, the same loss and `torch.optim.SGD(momentum, dampening=0)` (= optax's sgd
with momentum), the same metrics (loss, accuracy, all-finite check) and the same input (uint8 images
scaled to [0, 1] inside the step), in up to five variants: eager and `torch.compile`d (default mode,
and "max-autotune"), each in the contiguous (NCHW) or channels_last memory format (TORCH_VARIANTS).
All share one process and one thread count (CPU affinity + torch.set_num_threads); timed blocks of
`--steps` steps alternate JAX, torch variant 1, torch variant 2, ... (`--rounds` times), after
compilation and `--warmup` untimed steps each (and `--lead-in` untimed steps of the same framework right
before each block). Every side starts from the same weights (JAX enhancer -> torch, torchvision classifier ->
JAX), so the first steps' losses, gradients (the SGD momentum after one step) and BatchNorm statistics of JAX
and torch eager are compared and reported too; with `--against-fp32` (bf16 runs) each framework's first step is
taken again in float32, to show how much of their gradient difference is bf16 rounding. A torch variant that
fails (torch.compile without a C compiler, an unsupported op) is reported with its error and left out of the
timing.

`--memory` measures the peak memory of the train step of JAX and of torch eager, each in a fresh
subprocess (`--memory-probe`); `--max-batch` searches the largest batch whose step fits a memory budget
(CPU: peak resident memory of the process against MemAvailable; GPU: device peak against the card).

Prints a summary and, as the last line, `RESULT {json}` with jax_img_s, the torch variants' results,
speedup_vs_torch_eager / speedup_vs_torch_compile / speedup_vs_best_torch (median torch step time /
median JAX step time), the same for inference, compile seconds, memory, XLA's FLOP count of the step (and
MFU when the device's bf16 peak is known or --peak-tflops is given), the CPU model and its vector
extensions, load averages, versions and the arguments.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/ is not a package; common must come before JAX and torch)

from urnet_jax.config import CONV_BACKENDS, XLA_CPU_OPTIONS  # noqa: E402  (imports no JAX)
from urnet_jax.models import registry  # noqa: E402  (imports no JAX)

ENHANCERS = (registry.NO_ENHANCER, *registry.ENHANCER_NAMES)
# The torch side's variants: name -> (memory format, torch.compile mode or None for eager). "eager" is the
# reference of the first-step agreement check and is always measured.
TORCH_VARIANTS: dict[str, tuple[str, str | None]] = {
    "eager": ("contiguous", None),
    "eager_channels_last": ("channels_last", None),
    "compile": ("contiguous", "default"),
    "compile_channels_last": ("channels_last", "default"),
    "compile_max_autotune": ("contiguous", "max-autotune"),
}
MEMORY_PROBE_STEPS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enhancer", default="urnet", choices=ENHANCERS)
    parser.add_argument("--enhancer-width", type=int, default=32, help="channels of the enhancer's first level")
    parser.add_argument("--classifier", default="resnet18", help="a torchvision classifier name (full width)")
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="image height = width, pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="timed blocks per framework (alternating)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per framework before timing (>= 1)")
    parser.add_argument("--lead-in", type=int, default=0,
                        help="untimed steps before each timed block, every framework alike: the block then times "
                             "steps that follow steps, as in a training loop, not steps after the other "
                             "frameworks' blocks (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: all)")
    parser.add_argument("--xla-cpu-options", default=XLA_CPU_OPTIONS[0], choices=XLA_CPU_OPTIONS,
                        help="the XLA option set of the JAX programs on a CPU (urnet_jax.compiler_options)")
    parser.add_argument("--conv-backend", default=CONV_BACKENDS[0], choices=CONV_BACKENDS,
                        help="the JAX models' convolutions (urnet_jax.models.layers.use_conv_backend)")
    common.add_host_memory_flags(parser, "with --skip-torch: restart with transparent huge pages for malloc's large "
                                 "blocks, as train.py does with $URNET_JAX_HUGE_PAGES=1 (urnet_jax.host_memory; "
                                 "default: malloc's own settings)")
    parser.add_argument("--torch-variants", default=",".join(TORCH_VARIANTS),
                        help=f"comma-separated torch variants to time, among {', '.join(TORCH_VARIANTS)} "
                             "(eager is always included)")
    parser.add_argument("--memory", action="store_true",
                        help="measure the train step's peak memory of JAX and torch eager, each in a fresh process")
    parser.add_argument("--max-batch", action="store_true",
                        help="search the largest batch whose train step fits --memory-budget-gb (JAX and torch "
                             "eager, fresh processes; implies --memory)")
    parser.add_argument("--memory-budget-gb", type=float, default=None,
                        help="memory budget of --max-batch (default: MemAvailable on a CPU, the card's memory "
                             "on a GPU)")
    parser.add_argument("--memory-probe", default="", choices=("", "jax", "eager"),
                        help="internal: take the train step of one framework alone and print MEMORY {json}")
    parser.add_argument("--skip-torch", action="store_true", help="time the JAX steps only")
    parser.add_argument("--skip-inference", action="store_true", help="time the train steps only")
    parser.add_argument("--against-fp32", action="store_true",
                        help="with --precision bfloat16: also take each framework's first step in float32 from "
                             "the same weights and report how far its bf16 gradient is from its own fp32 one")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's bf16 peak for MFU (default: looked up from the device name)")
    parser.add_argument("--trace-dir", default="",
                        help="write a jax.profiler trace of 2 JAX train steps here and print the slowest XLA ops")
    args = parser.parse_args(argv)
    for name in ("enhancer_width", "num_classes", "size", "batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lead_in < 0:
        parser.error(f"--lead-in must be >= 0, got {args.lead_in}")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (the first step is checked against torch), got {args.warmup}")
    args.block_cache = common.resolve_block_cache(args.block_cache, args.conv_backend)
    if args.huge_pages and not args.skip_torch:
        parser.error("--huge-pages needs --skip-torch (beside torch the JAX step was slowest with huge pages)")
    if args.against_fp32 and (args.precision != "bfloat16" or args.skip_torch):
        parser.error("--against-fp32 needs --precision bfloat16 and the torch side")
    variants = [name.strip() for name in args.torch_variants.split(",") if name.strip()]
    unknown = sorted(set(variants) - set(TORCH_VARIANTS))
    if unknown:
        parser.error(f"unknown --torch-variants {', '.join(unknown)}; choose among {', '.join(TORCH_VARIANTS)}")
    args.torch_variants = [name for name in TORCH_VARIANTS if name in variants or name == "eager"]
    if args.memory_budget_gb is not None and args.memory_budget_gb <= 0:
        parser.error(f"--memory-budget-gb must be > 0, got {args.memory_budget_gb}")
    return args


# ----------------------------------------------------------------------------------------------------
# JAX


class JaxBench:
    """The library's train and eval steps for `model`, compiled ahead of time, on one fixed batch."""

    def __init__(self, model: Any, variables: dict, images_nhwc: Any, labels: Any, compile_eval: bool = True):
        import jax

        from urnet_jax import sharding, steps, train_state
        from urnet_jax.config import base_config

        self.jax = jax
        self.model = model
        mesh = sharding.data_mesh()
        optimizer = train_state.make_optimizer(base_config().optimizer, phase_steps=0)  # a constant lr
        variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        self.param_count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
        self.state = train_state.new_state(model, steps.JOINT, optimizer, variables, 0, jax.random.PRNGKey(0),
                                           sharding.replicated(mesh))
        self.rng = sharding.replicate(jax.random.PRNGKey(1), mesh)
        self.batch = sharding.global_batch({"image": images_nhwc, "label": labels}, mesh)
        self.eval_batch = sharding.global_batch(
            {"image": images_nhwc, "label": labels, "mask": labels >= 0}, mesh)

        started = time.perf_counter()
        def lower_train() -> Any:
            return steps.make_train_step(steps.JOINT, mesh).lower(self.state, self.batch, self.rng)

        train_lowered = lower_train()
        self.train_step = train_lowered.compile()
        self.train_compile_s = time.perf_counter() - started
        self.train_flops = _flops(train_lowered, lower_train)
        self.eval_step, self.eval_compile_s, self.eval_flops = None, None, None
        if compile_eval:
            started = time.perf_counter()

            def lower_eval() -> Any:
                return steps.make_eval_step(model, steps.JOINT, mesh).lower(self.state.variables, self.eval_batch)

            eval_lowered = lower_eval()
            self.eval_step = eval_lowered.compile()
            self.eval_compile_s = time.perf_counter() - started
            self.eval_flops = _flops(eval_lowered, lower_eval)
        self.train_memory_bytes = _compiled_memory_bytes(self.train_step)

    def run_train(self) -> Any:
        self.state, metrics = self.train_step(self.state, self.batch, self.rng)
        return metrics

    def run_eval(self) -> Any:
        return self.eval_step(self.state.variables, self.eval_batch)

    def synchronize(self, result: Any) -> None:
        self.jax.block_until_ready(result)

    def momentum_and_batch_stats(self) -> tuple[Any, Any]:
        """Host copies of the SGD momentum (= the gradient after one step) and the running statistics."""
        import optax

        trace = optax.tree_utils.tree_get(self.state.opt_state, "trace")
        return self.jax.device_get(trace), self.jax.device_get(self.state.batch_stats)

    def device_peak_bytes(self) -> int | None:
        stats = self.jax.devices()[0].memory_stats()
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None

    def device_memory_bytes(self) -> int | None:
        """The memory XLA may use on the device (None on a CPU)."""
        stats = self.jax.devices()[0].memory_stats()
        return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


_STARTED = time.perf_counter()


def _progress(message: str) -> None:
    """One line on stderr with the seconds since start, so a run cut off by a time limit shows where it was."""
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def _flops(lowered: Any, lower: Callable[[], Any]) -> float | None:
    """XLA's FLOP count of a lowered computation, before optimisation (None when none is given); `lower`
    lowers it again.

    Not the compiled one's: on a GPU the compiled program's convolutions are cuDNN custom calls, which
    XLA's cost analysis counts as 0 FLOPs (46 GFLOP instead of several TFLOP per UR-Net(64) + ResNet101
    train step on an H200). For the same reason, with the oneDNN backend (FFI calls) the FLOPs are those
    of the program lowered again with XLA's convolutions."""
    from urnet_jax.models import layers

    if layers.conv_backend() != "xla":
        with layers.conv_backend_scope("xla"):
            lowered = lower()
    analysis = lowered.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def _compiled_memory_bytes(compiled: Any) -> int | None:
    """XLA's static estimate of the step's memory: arguments + outputs - aliased (donated) + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes)


# ----------------------------------------------------------------------------------------------------
# torch


class TorchBench:
    """One torch variant (TORCH_VARIANTS): the mirror's train step (SGD momentum, dampening 0) and eval step
    on the same batch, eager or through `torch.compile` (compiled lazily, at the first call)."""

    def __init__(self, args: argparse.Namespace, variant: str, model: Any, images_nhwc: Any, labels: Any,
                 threads: int):
        import torch
        import torch.nn.functional as F

        import torch_reference
        from urnet_jax.config import base_config

        self.torch, self.F = torch, F
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.variant = variant
        memory_format, self.compile_mode = TORCH_VARIANTS[variant]
        self.memory_format = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        self.model = model
        self.param_count = torch_reference.parameter_count(model)
        self.optimizer_config = base_config().optimizer
        images = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
        self.images = images.to(self.device).contiguous(memory_format=self.memory_format)
        self.labels = torch.from_numpy(labels).long().to(self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=args.precision == "bfloat16")

    def start(self) -> None:
        """Moves the model (weights final) to the device, wraps it in torch.compile for a compiled variant
        and creates the optimizer."""
        self.model = self.model.to(self.device, memory_format=self.memory_format)
        self.forward = self.model if self.compile_mode is None else self.torch.compile(self.model,
                                                                                      mode=self.compile_mode)
        self.named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        config = self.optimizer_config
        self.optimizer = self.torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                              dampening=0.0, weight_decay=config.weight_decay)

    def _logits(self) -> Any:
        with self.autocast:
            return self.forward(self.images.float() / 255.0).float()

    def run_train(self) -> Any:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self._logits()
        loss = self.F.cross_entropy(logits, self.labels)
        loss.backward()
        self.optimizer.step()
        with self.torch.no_grad():
            accuracy = (logits.argmax(-1) == self.labels).float().mean()
            # Fused multi-tensor kernels instead of two launches per parameter (about 880 for UR-Net(64) +
            # ResNet101); a norm is finite iff every element is (short of overflow above ~1e19).
            params_finite = self.torch.isfinite(self.torch.stack(self.torch._foreach_norm(self.params))).all()
            finite = self.torch.isfinite(loss) & params_finite
        return {"loss": loss.detach(), "accuracy": accuracy, "finite": finite}

    def run_eval(self) -> Any:
        self.model.eval()
        with self.torch.inference_mode():
            logits = self._logits()
            mask = (self.labels >= 0).float()
            loss_sum = (self.F.cross_entropy(logits, self.labels, reduction="none") * mask).sum()
            correct = ((logits.argmax(-1) == self.labels).float() * mask).sum()
            return loss_sum, correct, mask.sum()

    def synchronize(self, result: Any) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def momentum_and_state(self) -> tuple[dict, dict]:
        """(state_dict with every parameter replaced by its SGD momentum buffer, state_dict), on the CPU."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        momentum = dict(state)
        for name, param in self.named_params:
            momentum[name] = self.optimizer.state[param]["momentum_buffer"].detach().cpu()
        return momentum, state

    def device_peak_bytes(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.device.type == "cuda" else None

    def device_memory_bytes(self) -> int | None:
        """The card's memory (None on a CPU)."""
        return (int(self.torch.cuda.get_device_properties(self.device).total_memory)
                if self.device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------
# The comparison


def _alternate(benches: dict[str, Any], run: str, args: argparse.Namespace
               ) -> dict[str, list[common.Block]]:
    """`args.rounds` timed blocks (`common.Block`: seconds per step) per framework, taken in alternation, each
    after `args.lead_in` untimed steps of its framework."""
    times: dict[str, list[common.Block]] = {name: [] for name in benches}
    for _ in range(args.rounds):
        for name, bench in benches.items():
            run_step = getattr(bench, run)
            for _ in range(args.lead_in):
                bench.synchronize(run_step())
            times[name].append(common.time_block(run_step, args.steps, bench.synchronize))
    return times


def _mfu(flops: float | None, seconds: float, peak_tflops: float | None) -> float | None:
    return round(flops / seconds / (peak_tflops * 1e12), 4) if flops and peak_tflops else None


def _relative_error(reference: Any, other: Any) -> float:
    """||other - reference|| / ||reference|| over every leaf of two same-structured trees."""
    import jax
    import numpy as np

    pairs = zip(jax.tree.leaves(reference), jax.tree.leaves(other), strict=True)
    squared_diff = squared_ref = 0.0
    for ref, oth in pairs:
        ref, oth = np.asarray(ref, np.float64), np.asarray(oth, np.float64)
        squared_diff += float(np.sum((oth - ref) ** 2))
        squared_ref += float(np.sum(ref**2))
    return (squared_diff / max(squared_ref, 1e-300)) ** 0.5


def _first_step_agreement(jax_bench: JaxBench, torch_bench: TorchBench, jax_metrics: Any, torch_metrics: Any,
                          template: Any, args: argparse.Namespace) -> dict[str, float]:
    """How closely the two first train steps (from the same weights, on the same batch) agree: losses,
    gradients (the SGD momentum after one step) and updated BatchNorm running statistics. `template`: the
    JAX variables (host copies; only their structure is used)."""
    jax_momentum, jax_batch_stats = jax_bench.momentum_and_batch_stats()
    torch_side = _torch_in_jax_layout(torch_bench, template, args)
    jax_loss, torch_loss = float(jax_metrics["loss"]), float(torch_metrics["loss"])
    return {
        "after_steps": int(jax_bench.jax.device_get(jax_bench.state.step)),  # 1: the first step alone
        "loss_jax": round(jax_loss, 6),
        "loss_torch": round(torch_loss, 6),
        "loss_rel_diff": abs(jax_loss - torch_loss) / max(abs(torch_loss), 1e-12),
        "grad_rel_err": _relative_error(torch_side["params"], jax_momentum),
        "batch_stats_rel_err": _relative_error(torch_side["batch_stats"], jax_batch_stats),
    }


def _torch_in_jax_layout(torch_bench: TorchBench, template: Any, args: argparse.Namespace) -> dict:
    """The torch side's SGD momentum (= its gradient after one step) as JAX-layout 'params', with its
    BatchNorm running statistics as 'batch_stats' (the momentum dict carries the state's buffers)."""
    import torch_reference

    momentum, _ = torch_bench.momentum_and_state()
    return torch_reference.jax_layout_variables(momentum, template, args.classifier, args.num_classes)


def _bf16_against_fp32(args: argparse.Namespace, config: Any, initial_variables: Any, initial_torch_model: Any,
                       images: Any, labels: Any, threads: int, jax_bench: JaxBench,
                       torch_bench: TorchBench) -> dict[str, float]:
    """Each framework's first step again in float32 from the same weights (`initial_variables`, host copies;
    `initial_torch_model`, the untouched mirror they were shared with): how far each bf16 gradient is from
    its own fp32 one, and how far the two fp32 gradients are from each other. Call right after the bf16
    benches' first step."""
    from urnet_jax import steps, train_state

    model = train_state.build(config, args.num_classes, steps.compute_dtype("float32"))
    jax_fp32 = JaxBench(model, initial_variables, images, labels)
    torch_fp32 = TorchBench(argparse.Namespace(**{**vars(args), "precision": "float32"}), "eager",
                            copy.deepcopy(initial_torch_model), images, labels, threads)
    torch_fp32.start()
    for bench in (jax_fp32, torch_fp32):
        bench.synchronize(bench.run_train())
    jax_grads = {"bf16": jax_bench.momentum_and_batch_stats()[0], "fp32": jax_fp32.momentum_and_batch_stats()[0]}
    torch_grads = {"bf16": _torch_in_jax_layout(torch_bench, initial_variables, args)["params"],
                   "fp32": _torch_in_jax_layout(torch_fp32, initial_variables, args)["params"]}
    return {
        "jax_bf16_vs_fp32_grad_rel_err": _relative_error(jax_grads["fp32"], jax_grads["bf16"]),
        "torch_bf16_vs_fp32_grad_rel_err": _relative_error(torch_grads["fp32"], torch_grads["bf16"]),
        "fp32_grad_rel_err": _relative_error(torch_grads["fp32"], jax_grads["fp32"]),
    }


def _trace_files(trace_dir: str) -> set[str]:
    """The jax.profiler trace files (*.xplane.pb) under `trace_dir`, at any depth."""
    import glob

    return set(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))


def op_labels(hlo_text: str) -> dict[str, str]:
    """The JAX op behind each instruction of a compiled program's entry computation (`hlo_text`: its HLO
    text), by instruction name; '' where none is found.

    An instruction is labelled with the first JAX `op_name` found on it or inside the computation it calls.
    XLA drops the `op_name` of some ops it rewrites (weight-gradient convolutions, the max-pool gradient's
    index ops): those take the label of their first labelled operand (up to 3 levels up), prefixed with
    'operand: '.
    """
    import re

    computations: dict[str, list[str]] = {}
    current, entry = None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and line.startswith("  "):
            computations[current].append(line)

    def own_label(lines: list[str], depth: int = 0) -> str:
        for line in lines:
            name = re.search(r'op_name="([^"]+)"', line)
            if name:
                return name.group(1)
            called = re.search(r"calls=%?([\w.\-]+)", line)
            if called and depth < 3 and called.group(1) in computations:
                found = own_label(computations[called.group(1)], depth + 1)
                if found:
                    return found
        return ""

    instructions = {}
    for line in computations.get(entry, []):
        match = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = ", line)
        if match:
            instructions[match.group(1)] = line

    def label(name: str, depth: int = 0) -> str:
        found = own_label([instructions[name]])
        if found or depth >= 3:
            return found
        for operand in re.findall(r"%([\w.\-]+)", instructions[name].split(" = ", 1)[1]):
            if operand in instructions and operand != name:
                found = label(operand, depth + 1)
                if found:
                    return found if found.startswith("operand: ") else "operand: " + found
        return ""

    return {name: label(name) for name in instructions}


def _slowest_xla_ops(trace_files: set[str], hlo_text: str, count: int = 15) -> list[dict[str, Any]]:
    """The `count` top-level XLA ops of the train step with the most traced time in `trace_files` (a trace of
    two steps; per step in the result), each with its JAX op (`op_labels`).

    Trace events are matched to the instructions of the step's entry computation by name. Wall-clock
    durations: on a busy CPU, ops that were descheduled look slower than they are.
    """
    import jax

    labels = op_labels(hlo_text)
    seconds: dict[str, float] = {}
    for path in sorted(trace_files):
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            for trace_line in plane.lines:
                for event in trace_line.events:
                    if event.name in labels:
                        seconds[event.name] = seconds.get(event.name, 0.0) + event.duration_ns / 1e9
    slowest = sorted(seconds.items(), key=lambda item: -item[1])[:count]
    return [{"op": name, "ms_per_step": round(total / 2 * 1e3, 2), "jax_op": labels[name]} for name, total in slowest]


def _build_model(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, Any]:
    """(config, JAX model, its initial variables, images (N, H, W, 3) uint8, labels (N,)) of the arguments;
    exits with one line for a bad model (unknown name, images too small for the enhancer's depth, ...)."""
    import jax
    import numpy as np

    from urnet_jax import steps, train_state
    from urnet_jax.config import base_config

    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    labels = generator.integers(0, args.num_classes, (args.batch,), dtype=np.int32)
    config = base_config()
    config.model.enhancer = args.enhancer
    config.model.enhancer_width = args.enhancer_width
    config.model.classifier = args.classifier
    config.model.classifier_width = 0
    try:
        model = train_state.build(config, args.num_classes, steps.compute_dtype(args.precision))
        # One compiled initialisation: an eager `model.init` compiles every op on its own, which takes
        # minutes on a GPU (each convolution is autotuned) for UR-Net(64) + ResNet101.
        _progress("initialising the JAX model")
        variables = train_state.init_variables(model, train_state.PHASE_PARTS[steps.JOINT], args.size,
                                               jax.random.PRNGKey(0))
    except ValueError as error:
        sys.exit(f"error: {error}")
    return config, model, variables, images, labels


# ----------------------------------------------------------------------------------------------------
# Memory


def _memory_probe(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """This process takes MEMORY_PROBE_STEPS train steps of one framework alone and reports its memory.

    `step_rss_growth_bytes`: the peak growth of the resident memory over its level before the first step
    (activations, gradients, optimiser buffers created by the step, workspaces); `peak_rss_bytes`: the
    process's whole peak (interpreter, libraries, weights, compilation included); `device_peak_bytes`:
    the framework's own device peak on a GPU."""
    _, model, variables, images, labels = _build_model(args)
    if args.memory_probe == "jax":
        bench: Any = JaxBench(model, variables, images, labels, compile_eval=False)
    else:
        import torch_reference

        bench = TorchBench(args, args.memory_probe, torch_reference.torch_model_like(model, args.classifier,
                                                                                     args.num_classes),
                           images, labels, threads)
        bench.start()
    with common.RssPeak() as rss:
        for _ in range(MEMORY_PROBE_STEPS):
            bench.synchronize(bench.run_train())
    memory = {"framework": args.memory_probe, "batch": args.batch,
              "step_rss_growth_bytes": rss.peak_growth_bytes, "peak_rss_bytes": common.process_peak_rss_bytes(),
              "device_peak_bytes": bench.device_peak_bytes(), "device_memory_bytes": bench.device_memory_bytes()}
    print("MEMORY " + json.dumps(memory, sort_keys=True), flush=True)
    return memory


def _probe_in_subprocess(args: argparse.Namespace, framework: str, batch: int) -> dict[str, Any]:
    """`_memory_probe` of `framework` at `batch` in a fresh process: its MEMORY dictionary, or {'batch',
    'error'} when the process failed (out of memory included: killed, or an allocation error)."""
    command = [sys.executable, os.path.abspath(__file__), "--enhancer", args.enhancer,
               "--enhancer-width", str(args.enhancer_width), "--classifier", args.classifier,
               "--num-classes", str(args.num_classes), "--size", str(args.size), "--batch", str(batch),
               "--precision", args.precision, "--xla-cpu-options", args.xla_cpu_options,
               "--conv-backend", args.conv_backend, "--memory-probe", framework]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    _progress(f"memory of the {framework} train step at batch {batch} (fresh process)")
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("MEMORY ")]
    if completed.returncode != 0 or not lines:
        stderr = completed.stderr.strip().splitlines()
        return {"batch": batch, "error": stderr[-1] if stderr else f"exit status {completed.returncode}"}
    return json.loads(lines[-1][len("MEMORY "):])


def used_bytes(probe: dict[str, Any]) -> int | None:
    """What a probe's step needs of the budget: the device peak on a GPU, else the process's peak RSS."""
    if "error" in probe:
        return None
    return probe["device_peak_bytes"] if probe["device_peak_bytes"] is not None else probe["peak_rss_bytes"]


def largest_batch(probe: Callable[[int], dict[str, Any]], start: int, budget_bytes: int,
                  known: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The largest batch whose `probe(batch)` fits `budget_bytes` (`used_bytes`; a failed probe does not fit).

    Memory is close to affine in the batch: probes at `start` and 2 * `start` give bytes per image and a
    fixed part, their prediction is probed, and bisection (to 1/16 of the batch) settles the rest. Halves
    `start` first while it does not fit. Returns {'max_batch' (0: not even 1 fits), 'probes': every probe
    in order, 'bytes_per_image', 'fixed_bytes' (None without a fit)}. `known`: probes already taken, by batch.
    """
    probes: list[dict[str, Any]] = []
    known = dict(known or {})

    def fits(batch: int) -> bool:
        probes.append(known.pop(batch) if batch in known else probe(batch))
        used = used_bytes(probes[-1])
        return used is not None and used <= budget_bytes

    low = start
    while not fits(low):
        if low == 1:
            return {"max_batch": 0, "probes": probes, "bytes_per_image": None, "fixed_bytes": None}
        low = max(1, low // 2)
    high, per_image, fixed = 2 * low, None, None
    if fits(high):
        first, second = used_bytes(probes[-2]), used_bytes(probes[-1])
        per_image = (second - first) / low
        fixed = first - per_image * low
        if per_image <= 0:  # nothing grows with the batch at this resolution: keep doubling
            low, high = high, 2 * high
            while fits(high):
                low, high = high, 2 * high
        else:
            predicted = int((budget_bytes - fixed) // per_image)
            low = high
            if predicted <= low:
                high = low + 1
            elif fits(predicted):
                low, high = predicted, predicted + 1  # the affine model says predicted + 1 does not fit
            else:
                high = predicted
    while high - low > max(1, low // 16):
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return {"max_batch": low, "probes": probes, "bytes_per_image": per_image and round(per_image),
            "fixed_bytes": fixed and round(fixed)}


def _memory_results(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of the JAX and torch eager train steps at --batch, and with --max-batch the largest batch
    that fits the budget, each measured in fresh processes."""
    memory: dict[str, Any] = {"method": "fresh process per framework and batch; CPU: getrusage peak RSS of the "
                                        "process and sampled RSS growth during the steps; GPU: the framework's "
                                        "device peak"}
    frameworks = ["jax"] if args.skip_torch else ["jax", "eager"]
    for framework in frameworks:
        key = "torch_eager" if framework == "eager" else framework
        if not args.max_batch:
            memory[key] = _probe_in_subprocess(args, framework, args.batch)
            continue
        probe = functools.partial(_probe_in_subprocess, args, framework)
        first = probe(args.batch)
        budget = (int(args.memory_budget_gb * 1e9) if args.memory_budget_gb else
                  first.get("device_memory_bytes") or common.available_memory_bytes())
        search = largest_batch(probe, args.batch, budget, known={args.batch: first})
        memory[key] = first
        memory[f"{key}_max_batch"] = {"budget_bytes": budget, **search}
    return memory


# ----------------------------------------------------------------------------------------------------
# The run


def _one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, at most 300 characters."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _first_steps(benches: dict[str, Any], run: str, failures: dict[str, str]) -> dict[str, tuple[Any, float, int]]:
    """Each bench's first `run` call: (its metrics, wall seconds, peak RSS growth). A compiled torch variant
    that raises is removed from `benches` and its error recorded in `failures`; any other error propagates."""
    first: dict[str, tuple[Any, float, int]] = {}
    for name, bench in list(benches.items()):
        _progress(f"first {name} {run.removeprefix('run_')} step")
        started = time.perf_counter()
        try:
            with common.RssPeak() as rss:
                metrics = getattr(bench, run)()
                bench.synchronize(metrics)
        except Exception as error:  # torch.compile's failures have no common base class
            if getattr(bench, "compile_mode", None) is None:
                raise
            failures[name] = _one_line(error)
            _progress(f"{name} failed: {failures[name]}")
            del benches[name]
            continue
        first[name] = (metrics, time.perf_counter() - started, rss.peak_growth_bytes)
    return first


def _torch_variant_result(name: str, error: str | None, train: list | None,
                          evals: list | None, first_train: tuple | None, first_eval: tuple | None,
                          flops: float | None, peak_tflops: float | None, batch: int) -> dict[str, Any]:
    """One torch variant's entry of RESULT['torch']: its timings, compile time (first call minus the median
    step, compiled variants), first-step loss, or the error it failed with."""
    memory_format, compile_mode = TORCH_VARIANTS[name]
    entry: dict[str, Any] = {"memory_format": memory_format, "compile_mode": compile_mode, "error": error}
    if error is not None:
        return entry
    summary = common.summarize(train, batch)
    seconds = summary["step_ms_median"] / 1e3
    entry.update(train=summary, img_s=summary["img_s"], first_step_s=round(first_train[1], 3),
                 first_step_loss=round(float(first_train[0]["loss"]), 6),
                 train_rss_growth_bytes=first_train[2],
                 train_tflop_s=round(flops / seconds / 1e12, 4) if flops else None,
                 mfu=_mfu(flops, seconds, peak_tflops))
    entry["compile_s"] = None if compile_mode is None else round(max(first_train[1] - seconds, 0.0), 2)
    if evals:
        eval_summary = common.summarize(evals, batch)
        entry.update(eval=eval_summary, eval_img_s=eval_summary["img_s"])
        entry["eval_compile_s"] = (None if compile_mode is None else
                                   round(max(first_eval[1] - eval_summary["step_ms_median"] / 1e3, 0.0), 2))
    return entry


def speedups(result: dict[str, Any]) -> dict[str, Any]:
    """JAX's speedups over torch eager, torch.compile (default mode, contiguous) and the fastest torch
    variant measured: median torch step time / median JAX step time, for training (wall, CPU and user CPU
    time: CPU time outside the kernel, i.e. without page faults) and inference. None where the variant was not
    measured or failed."""
    measured = {name: entry for name, entry in result["torch"].items() if entry["error"] is None}
    jax_train, jax_eval = result["jax_train"], result.get("jax_eval")

    def ratio(entry: dict | None, kind: str, key: str, jax_summary: dict | None) -> float | None:
        if entry is None or kind not in entry or jax_summary is None:
            return None
        return round(entry[kind][key] / jax_summary[key], 3)

    def fastest(kind: str, key: str) -> str:
        """The measured variant with the lowest `key` among those timed in `kind` ('train' or 'eval')."""
        return min((name for name in measured if kind in measured[name]), key=lambda name: measured[name][kind][key])

    def against_best(kind: str, key: str, jax_summary: dict | None) -> float | None:
        return ratio(measured[fastest(kind, key)], kind, key, jax_summary)

    out: dict[str, Any] = {
        "best_torch_variant": fastest("train", "step_ms_median"),
        "speedup_vs_torch_eager": ratio(measured.get("eager"), "train", "step_ms_median", jax_train),
        "speedup_vs_torch_compile": ratio(measured.get("compile"), "train", "step_ms_median", jax_train),
        "speedup_vs_best_torch": against_best("train", "step_ms_median", jax_train),
        "cpu_time_speedup_vs_torch_eager": ratio(measured.get("eager"), "train", "cpu_ms_median", jax_train),
        "cpu_time_speedup_vs_best_torch": against_best("train", "cpu_ms_median", jax_train),
        "user_cpu_time_speedup_vs_best_torch": against_best("train", "user_cpu_ms_median", jax_train),
    }
    if jax_eval is not None:
        out["eval_speedup_vs_torch_eager"] = ratio(measured.get("eager"), "eval", "step_ms_median", jax_eval)
        out["eval_speedup_vs_best_torch"] = against_best("eval", "step_ms_median", jax_eval)
        out["eval_user_cpu_time_speedup_vs_best_torch"] = against_best("eval", "user_cpu_ms_median", jax_eval)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        threads = common.pin_threads(args.threads)
    except ValueError as error:
        sys.exit(f"error: {error}")
    common.use_host_memory_settings(args.huge_pages, args.block_cache, restart=argv is None)
    common.prepare_gpu_allocators()
    from urnet_jax import compiler_options, host_memory

    compiler_options.use_cpu_options(args.xla_cpu_options)
    from urnet_jax.models import layers, onednn

    try:
        layers.use_conv_backend(args.conv_backend)
    except onednn.OnednnUnavailable as error:
        sys.exit(f"error: {error}")
    if args.memory_probe:
        return _memory_probe(args, threads)
    load_at_start = common.load_average()
    # Fresh processes, before this one holds any memory (on a GPU: any device memory).
    memory = _memory_results(args) if args.memory or args.max_batch else None
    import jax

    config, model, variables, images, labels = _build_model(args)
    torch_benches: dict[str, TorchBench] = {}
    if not args.skip_torch:
        import torch_reference

        _progress("building the torch mirrors")
        torch_reference.torch.manual_seed(0)  # torchvision's classifier init, shared with JAX below
        try:
            base_model = torch_reference.torch_model_like(model, args.classifier, args.num_classes)
            variables = torch_reference.share_initial_weights(variables, base_model, args.classifier,
                                                              args.num_classes)
        except ValueError as error:
            sys.exit(f"error: {error} (--skip-torch times the JAX side alone)")
        for name in args.torch_variants:
            torch_benches[name] = TorchBench(args, name, copy.deepcopy(base_model), images, labels, threads)
            torch_benches[name].start()
    # Host copies of the starting weights (the train step donates its state): the layout that torch's
    # tensors are mapped to, and the fp32 twins' start.
    initial_variables = jax.device_get(variables) if torch_benches else None
    _progress("compiling the JAX train and eval steps")
    jax_bench = JaxBench(model, variables, images, labels, compile_eval=not args.skip_inference)
    if torch_benches and torch_benches["eager"].param_count != jax_bench.param_count:
        sys.exit(f"error: the torch mirror has {torch_benches['eager'].param_count} parameters, "
                 f"JAX {jax_bench.param_count}")
    benches: dict[str, Any] = {"jax": jax_bench, **torch_benches}
    device = jax.devices()[0]

    # The first train steps all start from the same weights, so their results must agree: JAX and torch
    # eager are compared before any further warm-up step moves the weights and adds to the momentum.
    failures: dict[str, str] = {}
    first_train = _first_steps(benches, "run_train", failures)
    agreement = None
    if torch_benches:
        agreement = _first_step_agreement(jax_bench, torch_benches["eager"], first_train["jax"][0],
                                          first_train["eager"][0], initial_variables, args)
    if args.against_fp32:
        _progress("first train steps again in float32")
        agreement.update(_bf16_against_fp32(args, config, initial_variables, base_model, images, labels, threads,
                                            jax_bench, torch_benches["eager"]))
    for name, bench in benches.items():
        if args.warmup > 1:
            _progress(f"{args.warmup - 1} more {name} train step(s) before timing")
        for _ in range(args.warmup - 1):
            bench.synchronize(bench.run_train())
    _progress("timing the train steps")
    train_times = _alternate(benches, "run_train", args)
    _progress("median train step: " + ", ".join(
        f"{name} {common.summarize(blocks, args.batch)['step_ms_median']} ms" for name, blocks in train_times.items()))
    eval_times: dict[str, list[common.Block]] = {}
    first_eval: dict[str, tuple[Any, float, int]] = {}
    if not args.skip_inference:
        first_eval = _first_steps(benches, "run_eval", failures)
        for bench in benches.values():
            for _ in range(args.warmup - 1):
                bench.synchronize(bench.run_eval())
        eval_times = _alternate(benches, "run_eval", args)
    top_ops = None
    if args.trace_dir:  # after the timing, so that a slow profiler cannot cost the timings
        _progress("profiling two JAX train steps")
        earlier_traces = _trace_files(args.trace_dir)  # a reused folder keeps earlier runs' traces
        with jax.profiler.trace(args.trace_dir):
            for _ in range(2):
                jax_bench.synchronize(jax_bench.run_train())
        top_ops = _slowest_xla_ops(_trace_files(args.trace_dir) - earlier_traces, jax_bench.train_step.as_text())

    peak_tflops = common.peak_tflops_for(device.device_kind, args.peak_tflops)
    flops = jax_bench.train_flops
    jax_summary = common.summarize(train_times["jax"], args.batch)
    jax_seconds = jax_summary["step_ms_median"] / 1e3
    result: dict[str, Any] = {
        "device": f"{device.platform}:{device.device_kind}",
        "cpu": common.cpu_description(),
        "threads": threads,
        "xla_cpu_options": args.xla_cpu_options,
        "conv_backend": args.conv_backend,
        "params": jax_bench.param_count,
        "jax_compile_s": round(jax_bench.train_compile_s, 2),
        "jax_compilation_cache_dir": jax.config.jax_compilation_cache_dir or None,
        "jax_eval_compile_s": None if jax_bench.eval_compile_s is None else round(jax_bench.eval_compile_s, 2),
        "train_gflop_per_step": round(flops / 1e9, 3) if flops else None,
        "eval_gflop_per_step": round(jax_bench.eval_flops / 1e9, 3) if jax_bench.eval_flops else None,
        "jax_xla_step_memory_bytes": jax_bench.train_memory_bytes,
        "jax_device_peak_bytes": jax_bench.device_peak_bytes(),
        "jax_train": jax_summary,
        "jax_img_s": jax_summary["img_s"],
        "jax_first_step_loss": round(float(first_train["jax"][0]["loss"]), 6),
        "jax_train_rss_growth_bytes": first_train["jax"][2],
        "jax_train_tflop_s": round(flops / jax_seconds / 1e12, 4) if flops else None,
        "jax_mfu": _mfu(flops, jax_seconds, peak_tflops),
        "first_step_agreement": agreement,
        "jax_slowest_ops": top_ops,
        "peak_tflops_bf16": peak_tflops,
        "memory": memory,
        "load_avg_start": load_at_start,
        "load_avg_end": common.load_average(),
        "process_peak_rss_bytes": common.process_peak_rss_bytes(),
        "block_cache": host_memory.block_cache_stats(),
        "versions": common.environment(),
        "args": vars(args),
    }
    if eval_times:
        result["jax_eval"] = common.summarize(eval_times["jax"], args.batch)
        result["jax_eval_img_s"] = result["jax_eval"]["img_s"]
    if not args.skip_torch:
        result["torch"] = {
            name: _torch_variant_result(name, failures.get(name), train_times.get(name),
                                        eval_times.get(name), first_train.get(name), first_eval.get(name),
                                        flops, peak_tflops, args.batch)
            for name in args.torch_variants}
        result["torch_device_peak_bytes"] = torch_benches["eager"].device_peak_bytes()
        result["speedup_vs_torch_eager_per_round"] = [
            round(t.wall / j.wall, 3) for j, t in zip(train_times["jax"], train_times["eager"])]
        result.update(speedups(result))

    _print_summary(result, args)
    common.print_result(result)
    return result


def _print_summary(result: dict[str, Any], args: argparse.Namespace) -> None:
    cpu = result["cpu"]
    print(f"{args.enhancer}(width {args.enhancer_width}) + {args.classifier}, {args.size}x{args.size}, "
          f"batch {args.batch}, {args.precision}, {result['device']} ({cpu['model']}; "
          f"{' '.join(cpu['vector_extensions'])}), {result['threads']} threads, {result['params']:,} parameters")
    print(f"JAX compile: train step {result['jax_compile_s']} s, eval step {result['jax_eval_compile_s']} s; "
          f"XLA FLOPs per train step: {result['train_gflop_per_step']} GFLOP")
    rows = [("jax", result.get("jax_train"), result.get("jax_eval"), None)]
    for name, entry in (result.get("torch") or {}).items():
        if entry["error"] is not None:
            print(f"torch {name}: failed: {entry['error']}")
            continue
        rows.append((f"torch {name}", entry["train"], entry.get("eval"), entry["compile_s"]))
    for kind, index in (("train", 1), ("eval", 2)):
        for row in rows:
            summary = row[index]
            if summary:
                compiled = f"; compile {row[3]} s" if row[3] is not None and kind == "train" else ""
                print(f"{kind:5s} {row[0]:27s}: {summary['img_s']:9.2f} img/s (median {summary['step_ms_median']} "
                      f"ms/step, blocks {summary['step_ms_blocks']}; CPU {summary['cpu_ms_median']} ms/step, "
                      f"kernel {summary['kernel_cpu_ms_median']}; per thread {summary['thread_cpu_ms']}{compiled})")
    if "speedup_vs_torch_eager" in result:
        print(f"speedup (train): vs torch eager {result['speedup_vs_torch_eager']} (per round "
              f"{result['speedup_vs_torch_eager_per_round']}), vs torch.compile {result['speedup_vs_torch_compile']}, "
              f"vs the best torch ({result['best_torch_variant']}) {result['speedup_vs_best_torch']}; CPU time vs "
              f"the best torch {result['cpu_time_speedup_vs_best_torch']} (outside the kernel "
              f"{result['user_cpu_time_speedup_vs_best_torch']}); inference vs eager "
              f"{result.get('eval_speedup_vs_torch_eager')}, vs the best {result.get('eval_speedup_vs_best_torch')} "
              f"(outside the kernel {result.get('eval_user_cpu_time_speedup_vs_best_torch')})")
    if result["first_step_agreement"]:
        agreement = result["first_step_agreement"]
        print(f"first step, JAX vs torch eager from the same weights: loss {agreement['loss_jax']} vs "
              f"{agreement['loss_torch']}, gradient relative error {agreement['grad_rel_err']:.2e}, "
              f"running statistics relative error {agreement['batch_stats_rel_err']:.2e}")
        if "fp32_grad_rel_err" in agreement:
            print(f"gradient relative error, bf16 against fp32 of the same framework: JAX "
                  f"{agreement['jax_bf16_vs_fp32_grad_rel_err']:.2e}, torch "
                  f"{agreement['torch_bf16_vs_fp32_grad_rel_err']:.2e}; JAX fp32 against torch fp32 "
                  f"{agreement['fp32_grad_rel_err']:.2e}")
    for name, probe in (result["memory"] or {}).items():
        if name == "method":
            continue
        if name.endswith("_max_batch"):
            print(f"memory {name}: {probe['max_batch']} within {probe['budget_bytes'] / 1e9:.2f} GB "
                  f"({len(probe['probes'])} probes)")
        elif "error" in probe:
            print(f"memory {name}: failed: {probe['error']}")
        else:
            print(f"memory {name} at batch {probe['batch']}: step growth {probe['step_rss_growth_bytes'] / 1e9:.3f} GB, "
                  f"process peak {probe['peak_rss_bytes'] / 1e9:.3f} GB, device peak {probe['device_peak_bytes']}")
    for op in result["jax_slowest_ops"] or []:
        print(f"  {op['ms_per_step']:9.2f} ms  {op['op']:30s} {op['jax_op'][-90:]}")
    print(f"load average start {result['load_avg_start']} end {result['load_avg_end']}")


if __name__ == "__main__":
    main()
