"""The library's XLA compiler options: CPU programs without YNNPACK convolutions, the same numbers."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from urnet_jax import compiler_options


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.fixture
def fresh_cache():
    compiler_options.for_platform.cache_clear()
    yield
    compiler_options.for_platform.cache_clear()


def test_cpu_programs_compile_without_ynnpack_fusions_and_compute_the_same(fresh_cache):
    if jax.default_backend() != "cpu":
        pytest.skip("the options are for the CPU backend")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32, 32, 32), np.float32)  # YNNPACK takes convolutions from about this size
    w = rng.standard_normal((3, 3, 32, 32), np.float32) * 0.1
    options = compiler_options.for_platform("cpu")
    assert options == compiler_options.CPU_OPTIONS  # this jaxlib knows the option
    library = jax.jit(_conv, compiler_options=options).lower(x, w).compile()
    default = jax.jit(_conv).lower(x, w).compile()
    assert "ynn_fusion" not in library.as_text()
    assert "ynn_fusion" in default.as_text()  # else the option no longer changes anything: revisit it
    np.testing.assert_allclose(np.asarray(compiler_options.jit(_conv)(x, w)), np.asarray(default(x, w)),
                               rtol=1e-5, atol=1e-5)


def test_other_platforms_and_the_environment_variable_get_xla_defaults(fresh_cache, monkeypatch):
    assert compiler_options.for_platform("gpu") == {}
    monkeypatch.setenv(compiler_options.DEFAULTS_ENV, "1")
    assert compiler_options.for_platform("cpu") == {}


def test_the_eval_step_is_compiled_with_the_options_of_its_mesh(fresh_cache, monkeypatch):
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

    assert "ynn_fusion" not in compiled_text()
    monkeypatch.setenv(compiler_options.DEFAULTS_ENV, "1")
    compiler_options.for_platform.cache_clear()
    assert "ynn_fusion" in compiled_text()  # XLA's defaults would have used YNNPACK here


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
