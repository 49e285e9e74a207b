"""The benchmark's torch mirror is the same network as the JAX model, and the benchmark CLI runs end to end."""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))

import common  # noqa: E402
import torch_reference  # noqa: E402
import train_run  # noqa: E402
import train_step  # noqa: E402

from urnet_jax import compiler_options, host_memory, models  # noqa: E402
from urnet_jax.config import base_config  # noqa: E402
from urnet_jax.models import layers, onednn  # noqa: E402
from urnet_jax.models.composite import build_model  # noqa: E402


def _perturbed_batch_stats(variables: dict, seed: int) -> dict:
    """Running statistics away from their (0, 1) init, so that eval mode exercises them."""
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(lambda v: np.asarray(v) + rng.uniform(0.1, 0.5, np.shape(v)).astype(np.float32),
                         variables.get("batch_stats", {}))
    return {"params": variables["params"], "batch_stats": stats}


@pytest.mark.parametrize("name", ["unet", "unetpp", "resunet", "urnet"])
def test_torch_enhancer_mirror_matches_jax(name):
    """Same parameter count, every JAX variable ported, same output in eval and train mode; odd sizes
    exercise the crop in `match_size`."""
    module = models.create(name, width=4, depth=3)
    images = np.random.default_rng(0).uniform(0, 1, (2, 20, 23, 3)).astype(np.float32)
    initial = compiler_options.run_unoptimised(module.init, jax.random.PRNGKey(0), jnp.asarray(images), train=False)
    variables = _perturbed_batch_stats(initial, 1)
    mirror = torch_reference.torch_enhancer_like(module)
    assert torch_reference.parameter_count(mirror) == sum(v.size for v in jax.tree.leaves(variables["params"]))
    torch_reference.port_enhancer_params(variables, mirror)
    for train in (False, True):
        expected, updates = module.apply(variables, jnp.asarray(images), train=train, mutable=["batch_stats"])
        mirror.train(train)
        with torch.no_grad():
            got = mirror(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got, np.asarray(expected), atol=2e-5)
    # Back to JAX layout: the parameters unchanged, the running statistics updated alike by the train step.
    back = torch_reference.enhancer_variables_from_torch(mirror.state_dict(), variables)
    chex.assert_trees_all_equal(back["params"], variables["params"])
    chex.assert_trees_all_close(back["batch_stats"], updates["batch_stats"], rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), back["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize("enhancer", ["urnet", "none"])
def test_full_model_mirror_has_same_parameter_count_and_logits(enhancer):
    config = base_config().model
    config.enhancer, config.enhancer_width, config.classifier = enhancer, 32, "resnet18"
    model = build_model(config, num_classes=3)
    images = np.random.default_rng(2).uniform(0, 1, (2, 96, 96, 3)).astype(np.float32)
    variables = compiler_options.run_unoptimised(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)),
                                                 train=False)
    mirror = torch_reference.torch_model_like(model, "resnet18", 3)
    assert torch_reference.parameter_count(mirror) == sum(v.size for v in jax.tree.leaves(variables["params"]))
    variables = torch_reference.share_initial_weights(_perturbed_batch_stats(variables, 3), mirror, "resnet18", 3)
    mirror.eval()
    with torch.no_grad():
        got = mirror(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(images))
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_port_rejects_a_different_architecture():
    jax_module = models.create("urnet", width=4, depth=3)
    variables = jax_module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
    other = torch_reference.torch_enhancer_like(models.create("resunet", width=4, depth=3))
    with pytest.raises(ValueError, match="no torch counterpart"):
        torch_reference.port_enhancer_params(variables, other)


def _run_script(script: str, *arguments: str, env: dict | None = None) -> dict:
    """The RESULT dictionary of `bench/<script> *arguments` (exit status 0 required)."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(REPO_ROOT / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", **(env or {}))
    command = [sys.executable, str(REPO_ROOT / "bench" / script), *arguments]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=1800,
                               check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    last_line = completed.stdout.strip().splitlines()[-1]
    assert last_line.startswith("RESULT ")
    return json.loads(last_line[len("RESULT "):])


def _run_benchmark(*arguments: str) -> dict:
    """The RESULT dictionary of a tiny benchmark run (UR-Net(4) + ResNet18, 96 px), on one thread."""
    return _run_script("train_step.py", "--enhancer", "urnet", "--enhancer-width", "4", "--classifier", "resnet18",
                       "--size", "96", "--threads", "1", *arguments)


def _cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would use, if one is installed."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


COMPILE_SKIP = "torch.compile needs a C++ compiler for the CPU (set CXX or install g++/clang++); none found"


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> dict:
    """One tiny benchmark run with torch eager and eager channels_last, the memory of JAX and torch eager
    measured in fresh processes, and a profile of two JAX train steps into a folder that already holds an
    earlier (here unreadable) trace, which the profile must leave out."""
    trace_dir = tmp_path_factory.mktemp("trace")
    (trace_dir / "earlier").mkdir()
    (trace_dir / "earlier" / "host.xplane.pb").write_bytes(b"not a trace")
    return _run_benchmark("--batch", "2", "--steps", "1", "--rounds", "2", "--warmup", "2", "--peak-tflops", "0.01",
                          "--torch-variants", "eager,eager_channels_last", "--memory", "--trace-dir", str(trace_dir),
                          "--no-block-cache")


@pytest.fixture(scope="module")
def compiled_result() -> dict:
    """A tiny benchmark run with the torch.compile variant (train step only: compiling the eval graph too
    doubles inductor's C++ compile time). Skipped where inductor has no C++ compiler."""
    if not _cxx_compiler():
        pytest.skip(COMPILE_SKIP)
    return _run_benchmark("--batch", "2", "--steps", "1", "--rounds", "2", "--warmup", "2",
                          "--torch-variants", "eager,compile", "--skip-inference")


def test_benchmark_cli_prints_result_and_the_two_first_steps_agree(tiny_result):
    """Both benchmark paths run (tiny sizes) and start from the same weights, so their first train steps
    (loss, gradients = SGD momentum after one step, BatchNorm running statistics) agree to fp32 rounding."""
    result = tiny_result
    eager = result["torch"]["eager"]
    for value in (result["jax_img_s"], result["jax_eval_img_s"], eager["img_s"], eager["eval_img_s"]):
        assert value > 0
    assert result["speedup_vs_torch_eager"] == pytest.approx(
        eager["train"]["step_ms_median"] / result["jax_train"]["step_ms_median"], rel=1e-2)
    assert result["device"].startswith("cpu")
    assert result["jax_compile_s"] > 0 and result["train_gflop_per_step"] > 0
    for summary in (result["jax_train"], eager["train"], result["jax_eval"]):
        assert 0 <= summary["kernel_cpu_ms_median"] <= summary["cpu_ms_median"]
    for summary in (result["jax_train"], eager["train"]):  # MFU: XLA's FLOPs / median step time / the given peak
        expected = result["train_gflop_per_step"] / (summary["step_ms_median"] / 1e3) / 10.0  # 0.01 TFLOP/s
        mfu = result["jax_mfu"] if summary is result["jax_train"] else eager["mfu"]
        assert mfu == pytest.approx(expected, rel=1e-2)
    assert len(result["jax_train"]["step_ms_blocks"]) == len(eager["train"]["step_ms_blocks"]) == 2
    agreement = result["first_step_agreement"]
    assert agreement["after_steps"] == 1  # measured before the second warm-up step
    assert agreement["loss_rel_diff"] < 1e-5
    assert agreement["batch_stats_rel_err"] < 1e-4
    # fp32 rounding through ResNet18's BatchNorms at batch 2 alone gives ~6e-3 (torch fp32 vs fp64).
    assert agreement["grad_rel_err"] < 2e-2


def test_profile_lists_the_slowest_ops_of_the_train_step(tiny_result):
    """--trace-dir: the train step's top-level XLA ops with the most traced time, slowest first, most of
    them labelled with the model's layers."""
    ops = tiny_result["jax_slowest_ops"]
    assert 0 < len(ops) <= 15
    times = [op["ms_per_step"] for op in ops]
    assert times == sorted(times, reverse=True) and times[-1] >= 0
    assert sum("EnhanceClassify" in op["jax_op"] for op in ops) >= len(ops) // 2


HLO_WITHOUT_SOME_OP_NAMES = """\
HloModule jit_step

%fused_transpose (param_0: f32[2,8,8,4]) -> f32[4,8,8,2] {
  %param_0 = f32[2,8,8,4]{3,2,1,0} parameter(0)
  ROOT %transpose.1 = f32[4,8,8,2] transpose(%param_0), metadata={op_name="jit(step)/enhancer/conv1/rev"}
}

ENTRY %main (images: f32[2,8,8,4], grads: f32[2,8,8,4]) -> f32[3,3,4,4] {
  %images = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %grads = f32[2,8,8,4]{3,2,1,0} parameter(1)
  %transpose_fusion = f32[4,8,8,2]{3,2,1,0} fusion(%images), kind=kLoop, calls=%fused_transpose
  %copy.3 = f32[4,8,8,2]{3,2,1,0} copy(%transpose_fusion)
  %iota.2 = s32[2,8,8,4]{3,2,1,0} iota(), iota_dimension=1
  ROOT %convolution.7 = f32[3,3,4,4] convolution(%copy.3, %grads), dim_labels=b01f_01io->b01f
}
"""


def test_op_labels_name_the_jax_op_and_fall_back_to_a_labelled_operand():
    """An op's own op_name (here inside the computation a fusion calls); an op XLA left without one takes its
    first labelled operand's, marked as such; an op with neither stays unlabelled."""
    labels = train_step.op_labels(HLO_WITHOUT_SOME_OP_NAMES)
    assert labels["transpose_fusion"] == "jit(step)/enhancer/conv1/rev"
    assert labels["copy.3"] == "operand: jit(step)/enhancer/conv1/rev"
    assert labels["convolution.7"] == "operand: jit(step)/enhancer/conv1/rev"
    assert labels["iota.2"] == labels["images"] == ""


@pytest.mark.parametrize("run", ["tiny_result", "compiled_result"])
def test_every_torch_variant_starts_from_the_same_weights(run, request):
    """Each variant is its own copy of the mirror, so every first step sees the same weights and batch: the
    same loss as JAX's first step (channels_last and compiled kernels differ only in rounding)."""
    result = request.getfixturevalue(run)
    for name, entry in result["torch"].items():
        assert entry["error"] is None, (name, entry["error"])
        assert entry["first_step_loss"] == pytest.approx(result["jax_first_step_loss"], rel=1e-4), name
        assert len(entry["train"]["step_ms_blocks"]) == 2, name


def test_compile_variant_is_timed_with_its_compile_time_apart(compiled_result):
    compiled = compiled_result["torch"]["compile"]
    assert compiled["error"] is None, compiled["error"]
    assert compiled["compile_mode"] == "default" and compiled["memory_format"] == "contiguous"
    # The first call compiles: its time minus a step's is the compile time, and it dwarfs a tiny step.
    assert compiled["compile_s"] > compiled["train"]["step_ms_median"] / 1e3
    assert compiled["compile_s"] == pytest.approx(
        compiled["first_step_s"] - compiled["train"]["step_ms_median"] / 1e3, abs=0.02)
    assert compiled_result["torch"]["eager"]["compile_s"] is None
    assert compiled_result["speedup_vs_torch_compile"] == pytest.approx(
        compiled["train"]["step_ms_median"] / compiled_result["jax_train"]["step_ms_median"], rel=1e-2)
    assert "eval" not in compiled and "eval_speedup_vs_torch_eager" not in compiled_result


@pytest.mark.parametrize("run", ["tiny_result", "compiled_result"])
def test_speedups_against_the_best_torch_variant_are_consistent(run, request):
    result = request.getfixturevalue(run)
    medians = {name: entry["train"]["step_ms_median"] for name, entry in result["torch"].items()}
    best = min(medians, key=medians.get)
    assert result["best_torch_variant"] == best
    assert result["speedup_vs_best_torch"] == pytest.approx(medians[best] / result["jax_train"]["step_ms_median"],
                                                            rel=1e-2)
    for key in ("speedup_vs_torch_eager", "speedup_vs_torch_compile"):
        if result[key] is not None:
            assert result["speedup_vs_best_torch"] <= result[key]
    assert result["cpu_time_speedup_vs_best_torch"] <= result["cpu_time_speedup_vs_torch_eager"]
    measured = [entry for entry in result["torch"].values() if entry["error"] is None]
    least_user = min(entry["train"]["user_cpu_ms_median"] for entry in measured)
    assert result["user_cpu_time_speedup_vs_best_torch"] == pytest.approx(
        least_user / result["jax_train"]["user_cpu_ms_median"], rel=1e-2)
    if "eval_speedup_vs_torch_eager" in result:
        assert result["eval_speedup_vs_best_torch"] <= result["eval_speedup_vs_torch_eager"]
        least_user = min(entry["eval"]["user_cpu_ms_median"] for entry in measured if "eval" in entry)
        assert result["eval_user_cpu_time_speedup_vs_best_torch"] == pytest.approx(
            least_user / result["jax_eval"]["user_cpu_ms_median"], rel=1e-2)


def test_result_records_the_cpu_and_the_memory_of_each_framework(tiny_result):
    cpu = tiny_result["cpu"]
    assert cpu["model"] and set(cpu["vector_extensions"]) <= set(common.VECTOR_EXTENSIONS)
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    assert ("avx2" in cpu["vector_extensions"]) == (" avx2" in flags)
    memory = tiny_result["memory"]
    for name in ("jax", "torch_eager"):
        probe = memory[name]
        assert "error" not in probe, probe
        assert probe["batch"] == 2 and probe["device_peak_bytes"] is None  # CPU: no device memory
        # A fresh process per framework: its peak holds the libraries and weights, above what the step adds.
        assert 0 < probe["step_rss_growth_bytes"] < probe["peak_rss_bytes"]
    assert tiny_result["block_cache"] is None and tiny_result["versions"]["block_cache"] is False  # refused


def test_bf16_gradient_differences_are_rounding_not_disagreement():
    """In bf16 the two frameworks' first gradients differ a lot; --against-fp32 shows that each one's bf16
    gradient is about as far from its own fp32 gradient, while the two fp32 gradients agree."""
    if jax.__version_info__ >= (0, 11):
        pytest.skip("bf16 on XLA:CPU gives wrong results with jaxlib 0.11 (docs/TRAINING.md, Precision)")
    agreement = _run_benchmark("--batch", "8", "--steps", "1", "--rounds", "1", "--warmup", "1",
                               "--precision", "bfloat16", "--against-fp32", "--skip-inference",
                               "--torch-variants", "eager")["first_step_agreement"]
    assert agreement["fp32_grad_rel_err"] < 2e-2
    for framework in ("jax", "torch"):
        own_rounding = agreement[f"{framework}_bf16_vs_fp32_grad_rel_err"]
        assert own_rounding > 10 * agreement["fp32_grad_rel_err"]
        assert agreement["grad_rel_err"] < 2 * own_rounding


def test_flop_count_includes_the_convolutions():
    """MFU divides by XLA's count of the lowered program, which counts a convolution as 2 * multiply-adds
    on every backend (a GPU's compiled program hides its convolutions in cuDNN calls, counted as 0; so do
    the oneDNN backend's FFI calls, counted from the program lowered again with XLA's convolutions)."""
    batch, size, in_channels, out_channels, kernel = 2, 12, 3, 5, 3
    images = jnp.zeros((batch, size, size, in_channels))
    variables = layers.conv(out_channels, kernel).init(jax.random.key(0), images)

    def lower():  # the conv module picks its backend when it is built, as in a model's compact __call__
        return jax.jit(layers.conv(out_channels, kernel).apply).lower(variables, images)

    out_size = size - kernel + 1
    expected = 2 * batch * out_size * out_size * out_channels * kernel * kernel * in_channels
    assert train_step._flops(lower(), lower) == expected
    if onednn.available() is None:
        layers.use_conv_backend("onednn")
        try:
            lowered = lower()
            assert "UrnetOnednnConvForward" in lowered.as_text()
            assert train_step._flops(lowered, lower) == expected and layers.conv_backend() == "onednn"
        finally:
            layers.use_conv_backend("xla")


@pytest.mark.parametrize("arguments, message", [
    (["--batch", "0"], "--batch must be >= 1"),
    (["--classifier", "resnet7", "--skip-torch"], "error: unknown classifier 'resnet7'"),
    (["--size", "8", "--skip-torch"], "needs H, W >= 16"),
    (["--against-fp32"], "--against-fp32 needs --precision bfloat16 and the torch side"),
    (["--torch-variants", "eager,compiled"], "unknown --torch-variants compiled"),
    (["--memory-budget-gb", "0"], "--memory-budget-gb must be > 0"),
    (["--lead-in", "-1"], "--lead-in must be >= 0"),
    (["--huge-pages"], "--huge-pages needs --skip-torch"),
    (["--enhancer", "rsgunet", "--size", "32"], "no torch mirror for enhancer RSGUNet (--skip-torch times"),
])
def test_benchmark_cli_rejects_bad_arguments_in_one_line(arguments, message):
    command = [sys.executable, str(REPO_ROOT / "bench" / "train_step.py"), *arguments]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert completed.returncode != 0
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_benchmark_needs_no_input_pipeline_packages():
    """The GPU machines have JAX, flax, optax and torch but not TensorFlow, tensorflow-datasets or grain:
    the models, the train step and the benchmark must import without them, and the benchmark's
    environment record must not need torch either (`--skip-torch` where torch is absent)."""
    blocked = ["grain", "tensorflow", "tensorflow_datasets", "torch", "torchvision"]
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); sys.path.insert(0, 'bench'); "
            "import common, train_step; from urnet_jax import port, sharding, steps, train_state, trainer, workdir; "
            "info = common.environment(); print(info['torch'], info['flax'] is not None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["None", "True"], result.stderr[-2000:]


class _FakeBench:
    """A bench whose first call fails (`error`) or returns metrics; `compile_mode` as TorchBench's."""

    def __init__(self, compile_mode: str | None, error: Exception | None = None):
        self.compile_mode, self.error = compile_mode, error

    def run_train(self) -> dict:
        if self.error is not None:
            raise self.error
        return {"loss": 1.0}

    def synchronize(self, result: dict) -> None:
        pass


def test_a_failing_compiled_variant_is_reported_and_left_out():
    benches = {"jax": _FakeBench(None), "compile": _FakeBench("default", RuntimeError("no compiler\nmore lines")),
               "eager": _FakeBench(None)}
    failures: dict[str, str] = {}
    first = train_step._first_steps(benches, "run_train", failures)
    assert list(benches) == list(first) == ["jax", "eager"]
    assert failures == {"compile": "RuntimeError: no compiler"}
    entry = train_step._torch_variant_result("compile", failures["compile"], None, None, None, None, None, None, 2)
    assert entry == {"memory_format": "contiguous", "compile_mode": "default", "error": "RuntimeError: no compiler"}
    # An eager side's failure is a bug of the benchmark, never hidden.
    with pytest.raises(ValueError):
        train_step._first_steps({"eager": _FakeBench(None, ValueError("bad"))}, "run_train", {})


def test_each_timed_block_follows_its_own_frameworks_lead_in_steps():
    calls: list[str] = []

    class Recording:
        def __init__(self, name: str):
            self.name = name

        def run_train(self) -> str:
            calls.append(self.name)
            return self.name

        def synchronize(self, result: str) -> None:
            calls.append(f"{result} done")

    benches = {"jax": Recording("jax"), "eager": Recording("eager")}
    args = argparse.Namespace(rounds=2, steps=2, lead_in=1)
    times = train_step._alternate(benches, "run_train", args)
    assert {name: len(blocks) for name, blocks in times.items()} == {"jax": 2, "eager": 2}
    one_round = ["jax", "jax done", "jax", "jax", "jax done", "eager", "eager done", "eager", "eager", "eager done"]
    assert calls == one_round * 2


def test_speedups_ignore_failed_variants_and_pick_the_fastest():
    def summary(step_ms: float, cpu_ms: float, user_cpu_ms: float) -> dict:
        return {"step_ms_median": step_ms, "cpu_ms_median": cpu_ms, "user_cpu_ms_median": user_cpu_ms}

    result = {"jax_train": summary(100, 100, 80), "torch": {
        "eager": {"error": None, "train": summary(120, 110, 60)},
        "eager_channels_last": {"error": None, "train": summary(80, 90, 88)},
        "compile": {"error": None, "train": summary(90, 70, 64)},
        "compile_max_autotune": {"error": "RuntimeError: failed", "memory_format": "contiguous"}}}
    got = train_step.speedups(result)
    assert got["best_torch_variant"] == "eager_channels_last"
    assert (got["speedup_vs_torch_eager"], got["speedup_vs_torch_compile"], got["speedup_vs_best_torch"]) == (1.2, 0.9, 0.8)
    assert (got["cpu_time_speedup_vs_torch_eager"], got["cpu_time_speedup_vs_best_torch"]) == (1.1, 0.7)
    assert got["user_cpu_time_speedup_vs_best_torch"] == 0.75  # eager: the least CPU time outside the kernel
    del result["torch"]["compile"]
    assert train_step.speedups(result)["speedup_vs_torch_compile"] is None


def _affine_probe(fixed: int, per_image: int, fails_above: int | None = None):
    """A memory probe: fixed + per_image * batch bytes; a failed (out-of-memory) process above `fails_above`."""
    probed: list[int] = []

    def probe(batch: int) -> dict:
        probed.append(batch)
        if fails_above is not None and batch > fails_above:
            return {"batch": batch, "error": "exit status -9"}
        return {"batch": batch, "peak_rss_bytes": fixed + per_image * batch, "device_peak_bytes": None}

    return probe, probed


def test_largest_batch_follows_the_affine_prediction_and_verifies_it():
    probe, probed = _affine_probe(fixed=1000, per_image=10)
    search = train_step.largest_batch(probe, start=4, budget_bytes=2005)
    assert search["max_batch"] == 100  # 1000 + 10 * 100 <= 2005 < 1000 + 10 * 101
    assert probed == [4, 8, 100]
    assert (search["bytes_per_image"], search["fixed_bytes"]) == (10, 1000)


def test_largest_batch_reuses_a_probe_already_taken():
    probe, probed = _affine_probe(fixed=1000, per_image=10)
    first = probe(4)
    search = train_step.largest_batch(probe, start=4, budget_bytes=2005, known={4: first})
    assert probed == [4, 8, 100] and search["probes"][0] is first and search["max_batch"] == 100


def test_largest_batch_bisects_when_the_prediction_does_not_fit():
    probe, probed = _affine_probe(fixed=1000, per_image=10, fails_above=60)  # e.g. killed for memory
    search = train_step.largest_batch(probe, start=4, budget_bytes=2005)
    assert 60 - 60 // 16 <= search["max_batch"] <= 60
    assert max(b for b in probed if b <= 60) == search["max_batch"]
    assert all("error" in p for p in search["probes"] if p["batch"] > 60)


def test_largest_batch_halves_a_start_that_does_not_fit():
    probe, probed = _affine_probe(fixed=1000, per_image=10)
    assert train_step.largest_batch(probe, start=16, budget_bytes=1035)["max_batch"] == 3
    assert probed[:4] == [16, 8, 4, 2]
    probe, _ = _affine_probe(fixed=1000, per_image=10)
    assert train_step.largest_batch(probe, start=2, budget_bytes=1005)["max_batch"] == 0


def test_cpu_description_reads_model_and_vector_extensions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU @ 2.0GHz\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                       "processor\t: 1\nmodel name\t: Example CPU @ 2.0GHz\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f\n")
    assert common.cpu_description(str(cpuinfo)) == {"model": "Example CPU @ 2.0GHz",
                                                     "vector_extensions": ["sse4_2", "avx", "avx2", "fma"]}


def test_timed_block_splits_out_the_kernel_time_of_page_faults():
    """A step that maps and touches fresh memory spends CPU time in the kernel (its page faults); a step that
    only computes on memory already mapped spends next to none there."""
    def fresh_pages() -> np.ndarray:
        return np.ones(64 << 20, np.uint8)  # 64 MiB: mapped afresh and zeroed by the kernel each call

    mapped = np.ones(1 << 20, np.float64)

    def compute() -> float:
        return sum(float(mapped @ mapped) for _ in range(50))

    faulting = common.time_block(fresh_pages, 20, lambda result: None)
    computing = common.time_block(compute, 20, lambda result: None)
    for wall, cpu, kernel, _ in (faulting, computing):
        assert wall > 0 and 0 <= kernel <= cpu + 1e-9
    assert faulting[2] > 0.2 * faulting[1]
    assert computing[2] < 0.2 * computing[1]
    summary = common.summarize([faulting, computing], batch=4)
    assert summary["kernel_cpu_ms_median"] == pytest.approx((faulting[2] + computing[2]) / 2 * 1e3, abs=0.01)
    user = [(faulting[1] - faulting[2]) * 1e3, (computing[1] - computing[2]) * 1e3]
    assert summary["user_cpu_ms_median"] == pytest.approx(sum(user) / 2, abs=0.01)


def test_timed_block_splits_the_cpu_time_by_thread():
    """A step whose work runs on a second thread beside the calling one (a thread that outlives the block, as a
    thread pool's do) shows two busy threads, each with about its share of the process's CPU time; a step on
    the calling thread alone shows one."""
    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    spun, release = threading.Event(), threading.Event()

    def helper() -> None:
        spin(0.3)
        spun.set()
        release.wait()

    pool_thread = threading.Thread(target=helper)

    def two_threads() -> None:
        pool_thread.start()
        spin(0.3)
        spun.wait()

    try:
        both = common.time_block(two_threads, 1, lambda result: None)
    finally:
        release.set()
        pool_thread.join()
    alone = common.time_block(lambda: spin(0.3), 1, lambda result: None)
    assert len(both.thread_cpu) >= 2 and min(both.thread_cpu[:2]) > 0.2
    assert sum(both.thread_cpu) == pytest.approx(both.cpu, abs=0.05)
    assert alone.thread_cpu[0] > 0.25 and sum(alone.thread_cpu[1:]) < 0.05
    summary = common.summarize([alone, both, both], batch=1)
    assert summary["thread_cpu_ms"] == [round(seconds * 1e3, 1) for seconds in both.thread_cpu]


def test_thread_cpu_seconds_reads_each_threads_user_and_kernel_ticks(tmp_path):
    """utime + stime of /proc's task stat lines, after a thread name that may hold spaces and parentheses."""
    ticks = os.sysconf("SC_CLK_TCK")
    for thread_id, name, utime, stime in ((101, "python", 250, 10), (102, "tf XLA (1)", 30, 0)):
        (tmp_path / str(thread_id)).mkdir()
        (tmp_path / str(thread_id) / "stat").write_text(
            f"{thread_id} ({name}) S 1 1 1 0 -1 4194560 100 0 0 0 {utime} {stime} 0 0 20 0 4 0 5 0 0\n")
    (tmp_path / "103").mkdir()  # a thread that ended before its stat line was read
    assert common.thread_cpu_seconds(str(tmp_path)) == {101: 260 / ticks, 102: 30 / ticks}
    assert common.thread_cpu_seconds(str(tmp_path / "missing")) == {}


def test_whole_run_benchmark_times_train_py_epochs_against_the_step(tmp_path):
    """train.py on the tiny model, with the block cache where it can be built: every epoch's wall time holds its
    metrics row's seconds (training + evaluation) plus checkpoints and logging; the ratio is the run's images/s over the
    mean of the step's, timed before and after the run; train.py's account of the block cache shows blocks reused."""
    cache = host_memory.block_cache_unavailable() is None  # else (no C compiler here) the run goes without it
    result = _run_script("train_run.py", "--enhancer-width", "4", "--size", "96", "--batch", "8", "--train-size", "32",
                         "--per-class", "8", "--epochs", "2", "--threads", "1", "--step-rounds", "1",
                         "--block-cache" if cache else "--no-block-cache", "--out", str(tmp_path))
    reused = re.fullmatch(r"block cache: (\d+) blocks reused, (\d+) mapped, .*", result["run_block_cache"] or "")
    assert (reused is not None and int(reused[1]) > int(reused[2]) > 0) if cache else result["run_block_cache"] is None
    assert result["steps_per_epoch"] == 4 and result["images_per_epoch"] == 32
    assert len(result["epoch_wall_s"]) == len(result["epoch_metrics_s"]) == 1
    assert result["epoch_wall_s"][0] >= result["epoch_metrics_s"][0] > 0
    assert result["run_img_s"] == pytest.approx(32 / result["epoch_wall_s_median"], rel=1e-2)
    assert result["run_vs_step"] == pytest.approx(result["run_img_s"] / result["step_img_s"], rel=1e-2)
    before, after = result["step_img_s_before"], result["step_img_s_after"]  # the step timed around the run
    assert before > 0 and after > 0 and result["step_img_s"] == pytest.approx((before + after) / 2, abs=1e-3)
    assert 0 < result["epoch_eval_s"][0] < result["epoch_metrics_s"][0]
    assert result["epoch_steps_s"][0] == pytest.approx(result["epoch_metrics_s"][0] - result["epoch_eval_s"][0],
                                                       abs=0.02)
    assert result["steps_vs_step"] == pytest.approx(result["steps_img_s"] / result["step_img_s"], rel=1e-2)
    assert result["first_epoch_wall_s"] > result["epoch_wall_s"][0]  # the first epoch compiles
    assert result["run_peak_rss_bytes"] > 200 * 2**20  # train.py's, with JAX and a model in it
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["phase"], row["epoch"]) for row in rows] == [(2, 1), (2, 2)]


def test_epoch_breakdown_splits_wall_time():
    rows = [{"seconds": 30.0, "eval_seconds": 2.0}, {"seconds": 4.0, "eval_seconds": 1.0},
            {"seconds": 5.0, "eval_seconds": 1.0}]
    got = train_run.epoch_breakdown(rows, arrivals=[40.0, 45.0, 51.0], images_per_epoch=60)
    assert got["first_epoch_wall_s"] == 40.0 and got["epoch_wall_s"] == [5.0, 6.0]
    assert got["epoch_steps_s"] == [3.0, 4.0] and got["epoch_eval_s"] == [1.0, 1.0]
    assert got["epoch_outside_metrics_s"] == [1.0, 1.0]
    assert got["run_img_s"] == pytest.approx(60 / 5.5, abs=1e-3)
    assert got["steps_img_s"] == pytest.approx(60 / 3.5, abs=1e-3)
