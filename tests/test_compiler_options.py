"""The library's XLA compiler options: CPU programs with YNNPACK reductions but XLA's convolutions, the same numbers."""

import collections
import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from urnet_jax import compiler_options, config as config_lib


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _batch_norm(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BatchNorm's training-mode statistics and normalisation over (N, H, W): the step's large reductions."""
    mean = x.mean((0, 1, 2))
    variance = ((x - mean) ** 2).mean((0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(variance + 1e-5), mean, variance


def ynn_fused_ops(hlo_text: str) -> collections.Counter:
    """How many of each op (convolution, reduce, ...) a compiled program runs inside YNNPACK fusions."""
    computations: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            lines = computations.setdefault(header.group(1), [])
        else:
            lines.append(line)
    fused = [re.search(r"calls=%([\w.\-]+)", line).group(1)
             for body in computations.values() for line in body if "__ynn_fusion" in line]
    return collections.Counter(op.group(1) for name in fused for line in computations[name]
                               if (op := re.search(r"= \S+ ([a-z\-]+)\(", line)))


@pytest.fixture
def fresh_selection(monkeypatch):
    monkeypatch.delenv(compiler_options.DEFAULTS_ENV, raising=False)
    yield
    compiler_options.use_cpu_options(compiler_options.DEFAULT_CPU_OPTIONS)


def _compiled(function, options_name: str, *args) -> jax.stages.Compiled:
    compiler_options.use_cpu_options(options_name)
    return jax.jit(function, compiler_options=compiler_options.for_platform("cpu")).lower(*args).compile()


def test_cpu_option_sets_send_reductions_not_convolutions_to_ynnpack_and_compute_the_same(fresh_selection):
    if jax.default_backend() != "cpu":
        pytest.skip("the options are for the CPU backend")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32, 32, 32), np.float32)  # YNNPACK takes convolutions from about this size
    w = rng.standard_normal((3, 3, 32, 32), np.float32) * 0.1
    assert compiler_options.for_platform("cpu") == compiler_options.CPU_OPTION_SETS["ynnpack_reductions"]
    assert config_lib.XLA_CPU_OPTIONS == tuple(compiler_options.CPU_OPTION_SETS)  # the config's names, default first
    assert config_lib.base_config().xla_cpu_options == compiler_options.DEFAULT_CPU_OPTIONS == "ynnpack_reductions"
    convolutions = {name: _compiled(_conv, name, x, w) for name in compiler_options.CPU_OPTION_SETS}
    activations = rng.standard_normal((8, 64, 64, 16), np.float32)  # XLA splits reductions from about this size
    norms = {name: _compiled(_batch_norm, name, activations) for name in compiler_options.CPU_OPTION_SETS}
    # XLA's defaults send the convolution to YNNPACK (else the sets no longer change anything: revisit them).
    assert ynn_fused_ops(convolutions["xla_defaults"].as_text())["convolution"] == 1
    assert ynn_fused_ops(convolutions["ynnpack_reductions"].as_text())["convolution"] == 0
    assert ynn_fused_ops(norms["ynnpack_reductions"].as_text())["reduce"] >= 2  # the mean and the variance
    assert "reduce-window" not in norms["ynnpack_reductions"].as_text()
    assert "reduce-window" in norms["no_ynnpack"].as_text()  # XLA's tree of partial sums, which is slow
    assert not ynn_fused_ops(convolutions["no_ynnpack"].as_text()) and not ynn_fused_ops(norms["no_ynnpack"].as_text())
    for name in ("ynnpack_reductions", "no_ynnpack"):
        np.testing.assert_allclose(np.asarray(convolutions[name](x, w)), np.asarray(convolutions["xla_defaults"](x, w)),
                                   rtol=1e-5, atol=1e-5)
        for got, expected in zip(norms[name](activations), norms["xla_defaults"](activations), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_other_platforms_unknown_sets_and_the_environment_variable(fresh_selection, monkeypatch):
    assert compiler_options.for_platform("gpu") == {}
    with pytest.raises(ValueError, match="xla_cpu_options must be one of ynnpack_reductions, no_ynnpack"):
        compiler_options.use_cpu_options("fast")
    monkeypatch.setenv(compiler_options.DEFAULTS_ENV, "1")
    assert compiler_options.for_platform("cpu") == {}


def test_the_library_jit_follows_the_selected_set(fresh_selection, monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("the options are for the CPU backend")
    real_jit, compiled_with = jax.jit, []

    def recording_jit(function, **kwargs):
        compiled_with.append(kwargs.get("compiler_options"))
        return real_jit(function, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)
    norm = compiler_options.jit(lambda x: _batch_norm(x)[0])
    x = np.random.default_rng(1).standard_normal((4, 32, 32, 32), np.float32)
    compiler_options.use_cpu_options("no_ynnpack")
    first = np.asarray(norm(x))
    norm(x)
    compiler_options.use_cpu_options("ynnpack_reductions")
    np.testing.assert_allclose(np.asarray(norm(x)), first, rtol=1e-5, atol=1e-5)
    sets = compiler_options.CPU_OPTION_SETS
    # The nested (traced) form, then one top-level program per selected set.
    assert compiled_with == [None, sets["no_ynnpack"], sets["ynnpack_reductions"]]


def test_the_eval_step_sends_no_convolution_to_ynnpack(fresh_selection, monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("the options are for the CPU backend")
    from tiny_run import tiny_config
    from urnet_jax import sharding, steps, train_state

    config, mesh = tiny_config(), sharding.data_mesh()
    model = train_state.build(config, 3)
    size = config.data.image_size
    variables = train_state.abstract_variables(model, ("enhancer", "classifier"), size)
    batch = {"image": jax.ShapeDtypeStruct((8, size, size, 3), np.uint8),
             "label": jax.ShapeDtypeStruct((8,), np.int32), "mask": jax.ShapeDtypeStruct((8,), np.bool_)}

    def compiled_text() -> str:
        return steps.make_eval_step(model, steps.JOINT, mesh).lower(variables, batch).compile().as_text()

    assert ynn_fused_ops(compiled_text())["convolution"] == 0
    monkeypatch.setenv(compiler_options.DEFAULTS_ENV, "1")
    assert ynn_fused_ops(compiled_text())["convolution"] > 0  # XLA's defaults would have used YNNPACK here


def test_a_run_is_trained_and_loaded_with_its_own_option_set(trained_run, fresh_selection):
    from urnet_jax import run_context, workdir

    compiler_options.use_cpu_options("xla_defaults")
    workdir.load_run(trained_run)
    assert compiler_options.selected_cpu_options() == config_lib.base_config().xla_cpu_options  # the run's
    config = config_lib.saved_config(json.loads((trained_run / "config.json").read_text()))
    config.xla_cpu_options = "no_ynnpack"
    run_context.make_context(config, trained_run, show_progress=False)
    assert compiler_options.selected_cpu_options() == "no_ynnpack"


def test_the_library_jit_nests_inside_other_transformations():
    double = compiler_options.jit(lambda x: 2 * x)
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: double(x) + 1)(x)), 2 * x + 1)
    assert jax.eval_shape(double, jax.ShapeDtypeStruct((3,), np.float32)).shape == (3,)
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda x: double(x).sum())(x)), np.full(3, 2.0))


class _ConvNorm(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return nn.BatchNorm(use_running_average=not train)(nn.Conv(3, (3, 3))(x))


def test_run_unoptimised_initialises_a_model_as_its_optimised_init_does():
    model = _ConvNorm()
    key, images = jax.random.PRNGKey(3), jax.random.uniform(jax.random.PRNGKey(4), (2, 16, 16, 3))
    got = compiler_options.run_unoptimised(model.init, key, images, train=False)  # `train` is static
    expected = jax.jit(model.init, static_argnames="train")(key, images, train=False)
    assert set(got) == {"params", "batch_stats"} and jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                 got, expected)
    assert float(np.abs(np.asarray(got["params"]["Conv_0"]["kernel"])).max()) > 0
