"""The oneDNN convolution backend: lax's values and gradients, its fallbacks, the models' wiring, a whole run
with it, and one-line errors when it cannot be built."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urnet_jax import config as config_lib, errors, trainer, workdir as workdir_lib
from urnet_jax.models import create, layers, onednn
from tiny_run import tiny_config

UNAVAILABLE = onednn.available()
needs_onednn = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"oneDNN backend not available: {UNAVAILABLE}")
TARGETS = ("UrnetOnednnConvForward", "UrnetOnednnConvInputGrad", "UrnetOnednnConvKernelGrad")


@pytest.fixture
def onednn_backend():
    """The oneDNN backend for the models traced in a test, the previous one again afterwards."""
    with layers.conv_backend_scope("onednn"):
        yield


def lax_conv(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")


# (input height, width, C_in, kernel size, C_out, strides, padding): 3x3 same-size convs, the enhancers' 3x3
# stride-2 downsampling (even and odd sizes), ResNet's 7x7 stem, a 1x1 shortcut, strides larger than the
# kernel's reach, unequal strides and asymmetric padding.
GEOMETRIES = [(8, 10, 3, 3, 5, (1, 1), ((1, 1), (1, 1))), (12, 12, 16, 3, 8, (2, 2), ((1, 1), (1, 1))),
              (7, 9, 3, 3, 5, (2, 2), ((1, 1), (1, 1))), (11, 12, 3, 7, 6, (2, 2), ((3, 3), (3, 3))),
              (6, 7, 4, 1, 8, (2, 2), ((0, 0), (0, 0))), (10, 8, 3, 3, 5, (3, 3), ((1, 1), (1, 1))),
              (9, 9, 2, 5, 3, (3, 3), ((0, 0), (0, 0))), (9, 10, 4, 3, 4, (1, 2), ((0, 2), (1, 0)))]


@needs_onednn
@pytest.mark.parametrize("height, width, in_channels, kernel_size, out_channels, strides, padding", GEOMETRIES)
def test_conv_values_and_gradients_equal_lax_conv(height, width, in_channels, kernel_size, out_channels, strides,
                                                  padding):
    rng = np.random.default_rng(height * width + kernel_size)
    x = jnp.asarray(rng.normal(size=(2, height, width, in_channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, in_channels, out_channels)), jnp.float32)
    expected_value, expected_vjp = jax.vjp(lambda x, k: lax_conv(x, k, strides, padding), x, kernel)
    value, vjp = jax.vjp(lambda x, k: onednn.conv(x, k, strides, padding), x, kernel)
    cotangent = jnp.asarray(rng.normal(size=expected_value.shape), jnp.float32)
    assert value.shape == expected_value.shape
    np.testing.assert_allclose(np.asarray(value), np.asarray(expected_value), rtol=1e-5, atol=1e-5)
    for grad, expected in zip(jax.jit(vjp)(cotangent), expected_vjp(cotangent)):
        assert grad.shape == expected.shape and grad.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-5, atol=1e-4)


# (input height, width, C_in, kernel size, C_out, strides): the U-Nets' 2x2 / 2 upsampling, overlapping windows,
# stride 1, stride > kernel (output pixels no input reaches) and unequal strides.
TRANSPOSE_GEOMETRIES = [(5, 6, 8, 2, 4, (2, 2)), (4, 5, 3, 3, 2, (2, 2)), (5, 5, 2, 3, 3, (1, 1)),
                        (3, 4, 2, 2, 3, (3, 3)), (4, 3, 3, 3, 2, (1, 2))]


@needs_onednn
@pytest.mark.parametrize("height, width, in_channels, kernel_size, out_channels, strides", TRANSPOSE_GEOMETRIES)
def test_conv_transpose_values_and_gradients_equal_the_conv_s_input_gradient(height, width, in_channels,
                                                                               kernel_size, out_channels, strides):
    rng = np.random.default_rng(height * width * kernel_size + strides[1])
    x = jnp.asarray(rng.normal(size=(2, height, width, in_channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, in_channels, out_channels)), jnp.float32)
    out_shape = (2, (height - 1) * strides[0] + kernel_size, (width - 1) * strides[1] + kernel_size, out_channels)
    no_padding = ((0, 0), (0, 0))

    def reference(x, kernel):  # torch's ConvTranspose2d: the input gradient of the matching conv
        swapped = jnp.transpose(kernel, (0, 1, 3, 2))
        _, conv_vjp = jax.vjp(lambda image: lax_conv(image, swapped, strides, no_padding), jnp.zeros(out_shape))
        return conv_vjp(x)[0]

    expected_value, expected_vjp = jax.vjp(reference, x, kernel)
    value, vjp = jax.vjp(lambda x, k: onednn.conv_transpose(x, k, strides), x, kernel)
    assert value.shape == out_shape
    np.testing.assert_allclose(np.asarray(value), np.asarray(expected_value), rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    for grad, expected in zip(jax.jit(vjp)(cotangent), expected_vjp(cotangent)):
        assert grad.shape == expected.shape
        np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_conv_general_dilated_calls_onednn_in_float32_and_lax_otherwise():
    x, kernel = jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    padding, options = ((1, 1), (1, 1)), {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}

    def program(x, kernel):
        conv = functools.partial(onednn.conv_general_dilated, window_strides=(1, 1), padding=padding, **options)
        return str(jax.make_jaxpr(conv)(x, kernel))

    assert TARGETS[0] in program(x, kernel)
    half = program(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert "ffi_call" not in half and "conv_general_dilated" in half


@needs_onednn
def test_models_traced_with_the_backend_compute_xla_s_loss_and_gradients(onednn_backend):
    enhancer, classifier = create("urnet", width=4), create("resnet18", num_classes=3, width=4)
    x = jax.random.uniform(jax.random.key(0), (2, 96, 96, 3))
    labels = jnp.array([0, 2])

    def init(backend):
        layers.use_conv_backend(backend)
        return (enhancer.init(jax.random.key(1), x, train=False),
                classifier.init(jax.random.key(2), x, train=False))

    variables = init("xla")

    def loss(params):
        enhanced, _ = enhancer.apply({**variables[0], "params": params[0]}, x, train=True, mutable=["batch_stats"])
        logits, _ = classifier.apply({**variables[1], "params": params[1]}, enhanced, train=True,
                                     mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

    params = (variables[0]["params"], variables[1]["params"])
    expected_loss, expected_grads = jax.jit(jax.value_and_grad(loss))(params)
    xla_program = str(jax.make_jaxpr(jax.grad(loss))(params))
    layers.use_conv_backend("onednn")
    program = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert all(target in program for target in TARGETS)
    assert "conv_general_dilated" not in program  # every conv of both models (one group each) is oneDNN's
    assert "select_and_scatter_add" not in program  # ResNet's max pool: `max_pool_by_phase`
    # The decoder's transposed convs (one per level) are oneDNN's: none of their 3 matmuls per level is left.
    up_convs = sum(1 for name in variables[0]["params"] if name.endswith("_transpose"))
    assert up_convs > 0 and xla_program.count("dot_general") - program.count("dot_general") == 3 * up_convs
    onednn_loss, grads = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(onednn_loss), float(expected_loss), rtol=1e-5)
    for grad, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-3,
                                   atol=1e-4 * float(jnp.abs(expected).max()) + 1e-7)


@needs_onednn
def test_tiny_run_with_the_backend_trains_like_the_xla_run(prepared, reference_run, tmp_path):
    trainer.train_and_evaluate(tiny_config(prepared, conv_backend="onednn"), tmp_path, show_progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["conv_backend"] == "onednn"
    rows, expected = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                      for run in (tmp_path, reference_run))
    assert [(row["phase"], row["epoch"]) for row in rows] == [(row["phase"], row["epoch"]) for row in expected]
    # Phase 1 (the enhancer's convs and transposed convs): the same run up to float rounding (two epochs of
    # kernel gradients summed in oneDNN's order: 1.6e-5 apart in val_mse when measured).
    for row, expected_row in zip(rows[:2], expected[:2]):
        for key in ("train_loss", "val_psnr", "val_mse"):
            np.testing.assert_allclose(row[key], expected_row[key], rtol=1e-4)
    # Phase 2 of this tiny run is chaotic at its learning rate (XLA's option set 'no_ynnpack' instead of the
    # default moves its first epoch's loss by 1.7%), so only its course is compared.
    assert all(np.isfinite(row["train_loss"]) for row in rows[2:]) and rows[3]["train_loss"] < rows[2]["train_loss"]
    layers.use_conv_backend("xla")
    loaded = workdir_lib.load_run(tmp_path)
    assert layers.conv_backend() == "onednn" and loaded.config.conv_backend == "onednn"


def test_unknown_backend_and_onednn_on_several_devices_are_config_errors():
    with pytest.raises(errors.ConfigError, match="conv_backend must be one of xla, onednn, got 'mkl'"):
        layers.use_conv_backend("mkl")
    config = tiny_config(conv_backend="onednn")
    with pytest.raises(errors.ConfigError, match="runs on one device"):
        config_lib.validate(config, device_count=2)


def fake_compiler(directory: pathlib.Path, stderr: str) -> str:
    """A 'compiler' that prints `stderr` and fails."""
    script = directory / "fake-c++"
    script.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_build_that_cannot_run_says_why_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("URNET_JAX_CACHE", str(tmp_path / "cache"))
    if UNAVAILABLE is None:  # the extra is installed: fail the compiler
        monkeypatch.setenv("CXX", fake_compiler(tmp_path, "onednn_conv.cc:1:1: error: no such header\nmore"))
        with pytest.raises(onednn.OnednnUnavailable, match=r"^compiling onednn_conv.cc failed: "
                                                            r"onednn_conv.cc:1:1: error: no such header$"):
            onednn.build()
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        with pytest.raises(onednn.OnednnUnavailable, match="needs a compiler"):
            onednn.build()
        assert not list((tmp_path / "cache").glob("*.so"))
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("URNET_JAX_CACHE", str(tmp_path / "file" / "cache"))
        with pytest.raises(onednn.OnednnUnavailable, match="cannot create the build cache .*set URNET_JAX_CACHE"):
            onednn.build()
    with pytest.raises(onednn.OnednnUnavailable, match=r"needs no-such-onednn \(pip install"):
        onednn._installed_file("no-such-onednn", "libdnnl.so.3")
    assert issubclass(onednn.OnednnUnavailable, errors.ConfigError)  # the entry points print it as one line


def test_loading_a_run_falls_back_to_xla_when_onednn_is_unavailable(trained_run, tmp_path, monkeypatch, caplog):
    workdir = tmp_path / "run"
    os.symlink(trained_run, workdir)
    saved = json.loads((trained_run / "config.json").read_text())
    monkeypatch.setattr(workdir_lib, "_saved_config",
                        lambda path: config_lib.saved_config({**saved, "conv_backend": "onednn"}))

    def unavailable():
        raise onednn.OnednnUnavailable("the onednn conv backend needs onednn-cpu-gomp")

    monkeypatch.setattr(onednn, "load", unavailable)
    loaded = workdir_lib.load_run(workdir)
    assert layers.conv_backend() == "xla" and loaded.variables
    assert "loading the run with XLA's convolutions instead" in caplog.text


@needs_onednn
def test_export_of_a_model_traced_with_the_backend_uses_xla_s_convolutions(onednn_backend, tmp_path):
    import ml_collections

    from urnet_jax import compiler_options
    from urnet_jax.export import export_model
    from urnet_jax.models.composite import build_model

    model = build_model(ml_collections.ConfigDict(
        {"enhancer": "urnet", "classifier": "resnet18", "enhancer_width": 4, "classifier_width": 4}), 3)
    variables = compiler_options.run_unoptimised(model.init, jax.random.key(0), jnp.zeros((1, 96, 96, 3)),
                                                 train=False)
    # A SavedModel cannot hold the oneDNN FFI calls (jax2tf refuses to serialise them): the export traces
    # the model with XLA's convolutions, and the backend of this process is the same afterwards.
    summary = export_model(model, variables, ["a", "b", "c"], 96, tmp_path / "exported")
    assert max(summary.parity.values()) < 1e-4
    assert layers.conv_backend() == "onednn"
