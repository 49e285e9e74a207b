"""oneDNN convolutions for XLA on the CPU: an optional backend for the models' convolutions.

XLA's CPU convolutions (Eigen's kernels) are 1.2-2x slower per call than oneDNN's with NHWC activations,
the layout XLA already uses, and the convolutions are about three quarters of a train step's op time
(docs/BENCHMARKS.md). `conv` here runs a float32 convolution's forward pass, input gradient and kernel
gradient as three oneDNN primitives called through XLA's FFI (`onednn_conv.cc`, compiled on first use),
with `lax.conv_general_dilated`'s values and gradients up to float rounding.

It needs the `onednn` extra (`pip install -e ".[onednn]"`: oneDNN's library and headers) and a C++17
compiler (`$CXX`, else `c++`). The compiled library is cached under `$URNET_JAX_CACHE`, else
`$XDG_CACHE_HOME/urnet_jax`, else `~/.cache/urnet_jax`, keyed by the source, jaxlib's version and oneDNN's
paths. oneDNN runs its convolutions on its own OpenMP threads (as many as the process may use, or
`OMP_NUM_THREADS`), beside XLA's. XLA cannot split a call over devices: on a mesh of several devices it
gathers the batch around each call and every device computes all of it, so runs use it with one device.

Models use it through `layers.use_conv_backend("onednn")` (a run's `config.conv_backend`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from urnet_jax import native_build

Array = jax.Array

SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {"forward": "UrnetOnednnConvForward", "input_grad": "UrnetOnednnConvInputGrad",
            "kernel_grad": "UrnetOnednnConvKernelGrad"}


class OnednnUnavailable(native_build.BuildError):
    """The oneDNN backend cannot be built or loaded here (the message says why, in one line)."""


def _installed_file(distribution: str, suffix: str) -> Path:
    """The file of an installed distribution whose path ends with `suffix`."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise OnednnUnavailable(f"the onednn conv backend needs {distribution} (pip install -e \".[onednn]\")"
                                ) from None
    for file in files:
        if str(file).endswith(suffix):
            return Path(file.locate()).resolve()
    raise OnednnUnavailable(f"{distribution} is installed without {suffix}")


def build() -> Path:
    """Compiles `onednn_conv.cc` into the cache (once per source, jaxlib and oneDNN) -> the shared library."""
    header = _installed_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
    library = _installed_file("onednn-cpu-gomp", "libdnnl.so.3")
    include_dirs = [str(header.parents[2]), jax.ffi.include_dir()]
    return native_build.shared_library(
        SOURCE, compiler_env="CXX", default_compiler="c++",
        flags=["-std=c++17", *(f"-I{d}" for d in include_dirs), str(library), f"-Wl,-rpath,{library.parent}"],
        fingerprint=[importlib.metadata.version("jaxlib")], purpose="the onednn conv backend",
        error_type=OnednnUnavailable)


@functools.cache
def load() -> None:
    """Builds (if needed) and loads the library and registers its FFI targets with XLA, once per process."""
    path = build()
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError as error:  # e.g. libgomp (oneDNN's OpenMP runtime) missing
        raise OnednnUnavailable(f"loading {path.name} failed: {error}") from None
    for symbol in _TARGETS.values():
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


def available() -> str | None:
    """None when the backend loads here, else why not (one line)."""
    try:
        load()
    except OnednnUnavailable as error:
        return str(error)
    return None


def _call(pass_name: str, result_shape: tuple[int, ...], first: Array, second: Array,
          strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    (top, bottom), (left, right) = padding
    call = jax.ffi.ffi_call(_TARGETS[pass_name], jax.ShapeDtypeStruct(result_shape, jnp.float32),
                            vmap_method="sequential")  # under vmap: one call per example
    return call(first, second, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                pad_top=np.int64(top), pad_bottom=np.int64(bottom), pad_left=np.int64(left),
                pad_right=np.int64(right))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
         ) -> Array:
    """float32 conv2d of x (N, H, W, C_in) with kernel (KH, KW, C_in, C_out), strides (sh, sw) and zero padding
    ((top, bottom), (left, right)) -> (N, OH, OW, C_out), by oneDNN; `lax.conv_general_dilated`'s semantics."""
    return _forward(x, kernel, strides, padding)[0]


def _forward(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
             ) -> tuple[Array, tuple[Array, Array]]:
    load()
    (n, height, width, _), (kernel_h, kernel_w, _, out_channels) = x.shape, kernel.shape
    out_h = (height + sum(padding[0]) - kernel_h) // strides[0] + 1
    out_w = (width + sum(padding[1]) - kernel_w) // strides[1] + 1
    y = _call("forward", (n, out_h, out_w, out_channels), x, kernel, strides, padding)
    return y, (x, kernel)


def _backward(strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]],
              residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    grad = grad.astype(jnp.float32)
    x_grad = _call("input_grad", x.shape, grad, kernel, strides, padding)
    kernel_grad = _call("kernel_grad", kernel.shape, x, grad, strides, padding)
    return x_grad, kernel_grad


conv.defvjp(_forward, _backward)


_NO_PADDING = ((0, 0), (0, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_transpose(x: Array, kernel: Array, strides: tuple[int, int]) -> Array:
    """float32 transposed conv2d of x (N, H, W, C_in) with kernel (KH, KW, C_in, C_out) and strides (sh, sw),
    without padding -> (N, (H - 1) * sh + KH, (W - 1) * sw + KW, C_out), by oneDNN:
        y[n, sh * i + a, sw * j + b, o] += x[n, i, j, c] * kernel[a, b, c, o]   (`torch.nn.ConvTranspose2d`).

    A transposed conv is the input gradient of the conv with the same geometry and the kernel's channel axes
    swapped, so its three passes are `conv`'s three primitives: forward = that conv's input gradient, input
    gradient = its forward pass, kernel gradient = its kernel gradient (with the roles of x and the gradient
    swapped). No depth-to-space copies or matmuls as in XLA's lowering."""
    return _transpose_forward(x, kernel, strides)[0]


def _transpose_forward(x: Array, kernel: Array, strides: tuple[int, int]) -> tuple[Array, tuple[Array, Array]]:
    load()
    (n, height, width, _), (kernel_h, kernel_w, _, out_channels) = x.shape, kernel.shape
    swapped = jnp.transpose(kernel, (0, 1, 3, 2))  # (KH, KW, C_out, C_in): the kernel of the matching conv
    y_shape = (n, (height - 1) * strides[0] + kernel_h, (width - 1) * strides[1] + kernel_w, out_channels)
    return _call("input_grad", y_shape, x, swapped, strides, _NO_PADDING), (x, swapped)


def _transpose_backward(strides: tuple[int, int], residuals: tuple[Array, Array], grad: Array
                        ) -> tuple[Array, Array]:
    x, swapped = residuals
    grad = grad.astype(jnp.float32)
    x_grad = _call("forward", x.shape, grad, swapped, strides, _NO_PADDING)
    swapped_grad = _call("kernel_grad", swapped.shape, grad, x, strides, _NO_PADDING)
    return x_grad, jnp.transpose(swapped_grad, (0, 1, 3, 2))


conv_transpose.defvjp(_transpose_forward, _transpose_backward)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Any, padding: Any, **options: Any) -> Array:
    """`lax.conv_general_dilated` as Flax's `nn.Conv` calls it, for the 2-D NHWC / HWIO convolutions with
    explicit padding, one group and no dilation that `layers.conv` passes it: by `conv` in float32, by lax in
    other dtypes."""
    if lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32:
        return conv(lhs, rhs, tuple(int(s) for s in window_strides),
                    tuple((int(low), int(high)) for low, high in padding))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
